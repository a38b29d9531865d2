"""One prepared check for a lent GPU machine, without Prefect or DVC (its image has neither).

1. the library's tests on CUDA (tests/test_cuda.py: AMP, channels_last, both segmenters, a
   CPU checkpoint resumed on the GPU; and the engine and detector tests, the detector's
   training picking CUDA by itself);
2. the synthetic default and its detector, made there with the library (as the pipeline's
   prepare_data and train_detector stages would);
3. bench/attribution.py on that detector: `reference` vs `fast` where batching can pay.

The GPU image lacks pycocotools, defusedxml and pydensecrf: `make gpu-wheels` puts them in
.whl/ here (see README, "Checking on a GPU"); this script installs them there first.

    python3 -m bench.gpu_check --out "$OUT"

Writes gpu.json, pytest.txt, detector.json and results.json (the `attribution` object).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_cuda.py",
    "tests/test_attribution.py",
    "tests/test_detector.py",
]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def install_carried_wheels(site: Path = Path("/tmp/site")) -> None:
    """pip-install .whl/* (wheels, or an sdist built there) into `site`, put it on the path."""
    carried = sorted((ROOT / ".whl").glob("*.whl")) + sorted((ROOT / ".whl").glob("*.tar.gz"))
    carried = [path for path in carried if not _installed(path.name.split("-")[0])]
    if not carried:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-build-isolation", "--target", str(site), *map(str, carried)]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT)]))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_tests(out: Path) -> int:
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *TESTS]
    with open(out / "pytest.txt", "w") as handle:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    print((out / "pytest.txt").read_text()[-3000:], flush=True)
    return proc.returncode


def train_synthetic_detector(params_path: Path) -> dict:
    """The pipeline's first two stages, through the library (what their flows call)."""
    from bbam.data.prepare import prepare_dataset
    from bbam.train_detector import train_detector
    from tasks.detector import detector_config, detector_params_hash
    from tasks.params import DETECTOR_DIR, load_params, load_split, split_paths

    params = load_params(params_path)
    if params["data"]["name"] != "synthetic":
        raise SystemExit(
            f"{params_path}: the GPU check generates its data: use data.name synthetic"
        )
    root = Path(params["data"]["root"])
    if not split_paths(params, "train")[0].exists():
        prepare_dataset(
            "synthetic", root, None, root.parent / "downloads", synthetic=params.get("synthetic")
        )
    config = detector_config(params)
    digest = detector_params_hash(params, config)
    return train_detector(
        load_split(params, "train"), load_split(params, "val"), DETECTOR_DIR, config, digest,
        progress=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check")))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--reference-instances", type=int, default=8)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    install_carried_wheels()

    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    (args.out / "gpu.json").write_text(json.dumps(info, indent=2))
    log(f"torch {info}")
    status = {}
    if not args.skip_tests:
        log("tests on CUDA")
        status["pytest_rc"] = run_tests(args.out)
    log("synthetic data and detector")
    detector = train_synthetic_detector(args.params)
    (args.out / "detector.json").write_text(json.dumps(detector, indent=2))
    log(f"detector: {detector}")
    from bench import attribution

    log("attribution bench")
    status["bench_rc"] = attribution.main(
        [
            "--detector", "runs/detector/model.pt", "--params", str(args.params),
            "--split", "train", "--instances", str(args.instances),
            "--reference-instances", str(args.reference_instances),
            "--results", str(args.out / "results.json"),
        ]
    )  # fmt: skip
    log(f"done: {status}")
    return int(any(status.values()))


if __name__ == "__main__":
    sys.exit(main())
