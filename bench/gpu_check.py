"""One prepared check for a lent GPU machine, without Prefect or DVC (its image has neither).

1. the synthetic default and its detector, made there with the library (as the pipeline's
   prepare_data and train_detector stages would: fine-tuning the committed CPU-trained
   weights on the GPU);
2. bench/attribution.py on that detector: `reference` vs `fast`, speed and agreement (raw
   and refined, beside the reference's own seed-to-seed agreement);
3. bench/gpu_scale.py: the paper's detector size and image size, per-step costs at several
   batch sizes, FLOP/s against the device's bf16 peak, a VOC train_aug projection (with the
   steps per instance that step 2 measured);
4. the library's tests on CUDA (tests/test_cuda.py: AMP, channels_last, both segmenters, a
   CPU checkpoint resumed on the GPU; and the detector tests, its training picking CUDA by
   itself), last and under --test-timeout, so that a hang costs the benches nothing.

Each step runs even when an earlier one failed; the summary says which did.

The GPU image lacks pycocotools, defusedxml and pydensecrf2 (the demo's colour_crf
refinement): `make gpu-wheels` puts them in .whl/ here
(see README, "Checking on a GPU"); this script installs them there first.

    python3 -m bench.gpu_check --out "$OUT"

Writes gpu.json, pytest.txt, detector.json and results.json (`attribution`, `gpu_scale`,
`gpu_check`) under --out. A run kept under bench/gpu_runs/ prints again with
`python -m bench.gpu_check --show bench/gpu_runs/FILE.json`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# test_attribution runs on "cpu" by name: on the GPU machine it would only cost time.
TESTS = ["tests/test_cuda.py", "tests/test_detector.py"]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def install_carried_wheels(site: Path = Path("/tmp/site")) -> None:
    """pip-install .whl/* (wheels, or an sdist built there) into `site`, put it on the path."""
    # on the path first: a warm machine keeps what an earlier run installed there
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT)]))
    importlib.invalidate_caches()
    carried = sorted((ROOT / ".whl").glob("*.whl")) + sorted((ROOT / ".whl").glob("*.tar.gz"))
    carried = [path for path in carried if not _installed(path.name.split("-")[0])]
    if not carried:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-build-isolation", "--target", str(site), *map(str, carried)]
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_tests(out: Path, timeout_s: float) -> int:
    """pytest on TESTS (in 4 processes where pytest-xdist is there); 124 past ``timeout_s``."""
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *TESTS]
    if _installed("pytest-xdist"):
        cmd += ["-n", "4"]
    with open(out / "pytest.txt", "w") as handle:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print((out / "pytest.txt").read_text()[-3000:], flush=True)
    return rc


def prepare_synthetic(params: dict) -> None:
    """The prepare_data stage, through the library (the GPU check generates its data)."""
    from bbam.data.prepare import prepare_dataset
    from tasks.params import split_paths

    if params["data"]["name"] != "synthetic":
        raise SystemExit("the GPU check generates its data: use data.name synthetic")
    root = Path(params["data"]["root"])
    if not split_paths(params, "train")[0].exists():
        prepare_dataset(
            "synthetic", root, None, root.parent / "downloads", synthetic=params.get("synthetic")
        )


def train_synthetic_detector(params: dict) -> dict:
    """The train_detector stage, through the library (what its flow calls)."""
    from bbam.train_detector import train_detector
    from tasks.detector_config import detector_config, detector_params_hash
    from tasks.params import DETECTOR_DIR, load_split

    config = detector_config(params)
    digest = detector_params_hash(params, config)
    return train_detector(
        load_split(params, "train"), load_split(params, "val"), DETECTOR_DIR, config, digest,
        progress=False,
    )  # fmt: skip


def summary(results: dict) -> list[str]:
    """The issue's goals against a run's results (bench/results.json objects)."""
    lines = []
    attribution, scale = results.get("attribution"), results.get("gpu_scale")
    if attribution:
        lines.append(
            f"demo detector: fast {attribution['fast_instances_per_s']:.1f} inst/s vs reference "
            f"{attribution['reference_instances_per_s']:.2f} ({attribution['speedup']:.0f}x); "
            f"refined agreement {attribution['refined_agreement_iou']:.3f} "
            f"(reference vs itself {attribution['reference_self_refined_agreement_iou']:.3f})"
        )
        runs = {"without the CPU caps": attribution.get("fast_profile_defaults")}
        runs.update({f"with {k}": v for k, v in (attribution.get("fast_variants") or {}).items()})
        for name, v in runs.items():
            if v:
                second = v.get("refined_agreement_iou_next_seed")
                lines.append(
                    f"fast {name}: {v['iterations_per_instance']:.0f} steps/inst, "
                    f"refined agreement {v['refined_agreement_iou']:.3f}"
                    + ("" if second is None else f" (next seed: {second:.3f})")
                )
    if scale:
        best = scale["rows"][scale["best_fast"]]
        lines.append(
            f"paper scale ({scale['detector']['arch']}, {scale['image_hw']}): fast "
            f"{scale['speedup']:.0f}x reference (goal >= 50x); masked forward+backward at "
            f"{100 * best.get('fraction_of_bf16_peak', float('nan')):.1f} % of "
            f"{scale['bf16_peak_tflops']:.0f} TFLOP/s bf16 (goal >= 40 %); VOC train_aug "
            f"{scale['voc_train_aug_gpu_hours']['fast']:.2f} GPU-hours (goal <= 2), reference "
            f"{scale['voc_train_aug_gpu_hours']['reference']:.1f}"
        )
        small = scale["voc_train_aug_gpu_hours"].get("fast_small_objects")
        if small:
            lines.append(
                f"VOC train_aug if every instance were a small object: {small:.2f} GPU-hours"
            )
    return lines


def show(path: Path) -> int:
    """Print a kept run: its status, the paper-scale table's rows and the goals."""
    results = json.loads(path.read_text())
    check = results.get("gpu_check", {})
    print(f"{path}: {check.get('device')} ({check.get('torch')}), status {check.get('status')}")
    scale = results.get("gpu_scale")
    if scale:
        print(f"{'profile':<11} {'batch':>5} {'ms/inst-step':>12} {'inst/s':>8} {'peak GiB':>8}")
        rows = sorted(
            scale["rows"].items(), key=lambda kv: (kv[0] != "reference", kv[1]["batch_size"])
        )
        for name, row in rows:
            if "error" in row:
                print(f"{name:<11} {row['batch_size']:>5}  {row['error']}")
            else:
                print(
                    f"{name:<11} {row['batch_size']:>5} {row['ms_per_instance_step']:>12.2f} "
                    f"{row['instances_per_s']:>8.2f} {row['peak_memory_gib'] or 0:>8.1f}"
                )
    print("\n".join(summary(results)))
    return 0


STEPS = ("detector", "attribution", "gpu_scale", "tests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check")))
    # relative to the repo root, where the check runs: kept runs cite no machine's paths
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--reference-instances", type=int, default=20)
    parser.add_argument(
        "--fast-iterations", type=float, default=None,
        help="fast's steps per instance for gpu_scale when the attribution step is not run",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", default=[], help="passed to bench.attribution"
    )
    parser.add_argument("--compile", action="store_true", help="gpu_scale's torch.compile row")
    parser.add_argument("--test-timeout", type=float, default=180.0)
    parser.add_argument("--show", type=Path, default=None, help="print a kept run and exit")
    args = parser.parse_args(argv)
    if args.show:
        return show(args.show)
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    install_carried_wheels()

    import torch

    from bench import attribution, gpu_scale
    from bench.results import merge_results
    from tasks.params import load_params

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    (args.out / "gpu.json").write_text(json.dumps(info, indent=2))
    log(f"torch {info}")
    params = load_params(args.params)
    prepare_synthetic(params)
    results_path = args.out / "results.json"
    status: dict[str, object] = {}
    seconds: dict[str, float] = {}

    def step(name: str, fn):
        log(name)
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception:  # one failed step must not cost the others' device time
            traceback.print_exc()
            value = "failed"
        seconds[name] = round(time.perf_counter() - t0, 1)
        status[name] = value
        log(f"{name}: {value} ({seconds[name]} s)")
        return value

    def detector() -> str:
        trained = train_synthetic_detector(params)
        (args.out / "detector.json").write_text(json.dumps(trained, indent=2))
        return "ok"

    def demo_attribution() -> int:
        weights = "runs/detector/model.pt"
        if status.get("detector") != "ok":  # still measure, on the committed weights
            weights = params["detector"]["weights"]
        return attribution.main(
            [
                "--detector", weights, "--params", str(args.params), "--split", "train",
                "--instances", str(args.instances),
                "--reference-instances", str(args.reference_instances),
                "--results", str(results_path),
                *[arg for text in args.variant for arg in ("--variant", text)],
            ]
        )  # fmt: skip

    def scale() -> int:
        argv = ["--params", str(args.params), "--results", str(results_path)]
        argv += ["--profile", str(args.out / "profile.txt")]
        if args.compile:
            argv.append("--compile")
        measured = {}
        if results_path.exists():
            measured = json.loads(results_path.read_text()).get("attribution", {})
        plain = measured.get("fast_profile_defaults") or {}
        iterations = plain.get("iterations_per_instance") or args.fast_iterations
        if iterations:
            argv += ["--fast-iterations", str(iterations)]
        return gpu_scale.main(argv)

    run = {
        "detector": detector,
        "attribution": demo_attribution,
        "gpu_scale": scale,
        "tests": lambda: torch.cuda.empty_cache() or run_tests(args.out, args.test_timeout),
    }
    for name in STEPS:
        if name in args.steps:
            step(name, run[name])
    ok = all(v in (0, "ok") for v in status.values())
    check = {**info, "status": status, "seconds": seconds, "ok": ok}
    merge_results("gpu_check", check, results_path)
    log("\n".join(summary(json.loads(results_path.read_text()))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
