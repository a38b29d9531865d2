"""``make bench``: reproduce the pipeline, then measure it; writes bench/results.json.

Objects written (each by its own script or step, merged into one file):
- ``detector``: box AP of the pipeline's detector and the fraction of instances with at
  least one positive proposal (train and val);
- ``attribution``: ``reference`` vs ``fast`` on the same instances (bench.attribution);
- ``attribution_baseline``: the perturbation baseline, ``mean`` vs ``blur``, on the same train
  instances: map precision and refined IoU with GT (bench.attribution_baseline);
- ``pseudo_labels``: pseudo-mask mIoU of BBAM variants and baselines (bench.pseudo_labels);
- ``refine_modes``: what each refinement mode keeps of GT and degraded GT-derived maps on a real
  photo and on synthetic images, next to the filled box and GrabCut (bench.refine_modes);
- ``segmenters``: weak / full / box supervision for both networks and the ratios;
- ``scale``: 1 vs 2 workers and merging 10^6 manifest rows (bench.scale);
- ``data_check``: images verified per second by the data stage, demo set and 10k synthetic
  images (bench.data_check);
- ``demo_quality``: the demo run's headline numbers (percent), read from its metrics files.

Nothing here is a test: numbers are printed and recorded, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.results import RESULTS, merge_results
from flows.show_metrics import no_positive_percent

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(list(args), cwd=ROOT, env=env, check=True)


def detector_object(params_path: str, proposals: int) -> dict:
    import torch

    from bench.detector import positive_fraction
    from tasks.detector import load_detector_from_params
    from tasks.params import load_params, load_split

    params = load_params(params_path)
    metrics = json.loads((ROOT / "metrics/detector.json").read_text())
    out = {
        "train_seconds": metrics["train_seconds"],
        "box_ap50": metrics["box_ap50"],
        "box_ap": metrics["box_ap"],
        "epochs": metrics["epochs"],
    }
    for split in ("val", "train"):
        dataset = load_split(params, split, with_masks=False)
        model = load_detector_from_params(params, len(dataset.classes) + 1, torch.device("cpu"))
        fraction, count = positive_fraction(model, dataset.records, proposals)
        out[f"positive_fraction_{split}"] = fraction
        out[f"instances_{split}"] = count
    out["positive_fraction"] = out["positive_fraction_val"]
    return out


def segmenters_object(params_path: str) -> dict:
    """Weak and full come from the pipeline run; the box baseline is trained here."""
    from tasks.evaluate import evaluate_instance, evaluate_semantic
    from tasks.params import load_params
    from tasks.segmenters import train_segmenter

    evaluation = json.loads((ROOT / "metrics/evaluation.json").read_text())
    if "box" not in evaluation:
        params = load_params(params_path)
        train_segmenter.fn(params, "instance", "box")
        train_segmenter.fn(params, "semantic", "box")
        sem = evaluate_semantic.fn(params, "box")
        ins = evaluate_instance.fn(params, "box")["voc"]
        evaluation["box"] = {"sem_miou": 100 * sem["miou"], "ins_ap50": 100 * ins["ap50"]}

    def get(sup: str, key: str) -> float | None:
        return evaluation.get(sup, {}).get(key)

    out = {}
    for sup in ("full", "bbam", "box"):
        out[f"sem_miou_{sup}"] = get(sup, "sem_miou")
        out[f"ins_ap50_{sup}"] = get(sup, "ins_ap50")
    full_sem, full_ins = out["sem_miou_full"], out["ins_ap50_full"]
    out["sem_ratio"] = 100 * out["sem_miou_bbam"] / full_sem if full_sem else None
    out["ins_ap50_ratio"] = 100 * out["ins_ap50_bbam"] / full_ins if full_ins else None
    return out


def demo_quality_object(metrics_dir: Path = ROOT / "metrics") -> dict:
    """What `make demo` printed, in percent: the detector, positives, pseudo masks beside the
    box-only baselines, and both segmenters under full and BBAM supervision."""

    def load(name: str) -> dict:
        return json.loads((metrics_dir / f"{name}.json").read_text())

    detector, attribution = load("detector"), load("attribution")
    pseudo, evaluation = load("pseudo_labels"), load("evaluation")
    return {
        "detector_ap50": round(100 * detector["box_ap50"], 2),
        "no_positive_fraction": (
            None if (percent := no_positive_percent(attribution)) is None else round(percent, 2)
        ),
        "miou_bbam": pseudo.get("mean_instance_iou_vs_gt"),
        "miou_grabcut": pseudo.get("mean_instance_iou_grabcut"),
        "miou_box": pseudo.get("mean_instance_iou_box"),
        "sem_miou_full": evaluation.get("full", {}).get("sem_miou"),
        "sem_miou_bbam": evaluation.get("bbam", {}).get("sem_miou"),
        "ins_ap50_full": evaluation.get("full", {}).get("ins_ap50"),
        "ins_ap50_bbam": evaluation.get("bbam", {}).get("ins_ap50"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--skip", nargs="*", default=[], help="objects to skip")
    parser.add_argument("--reference-instances", type=int, default=6)
    parser.add_argument("--fast-instances", type=int, default=32)
    args = parser.parse_args()
    os.chdir(ROOT)
    started = time.perf_counter()
    run("dvc", "repro")
    from tasks.params import load_params

    params = load_params(args.params)
    data = params["data"]
    merge_results("demo_quality", demo_quality_object())
    if "detector" not in args.skip:
        merge_results("detector", detector_object(args.params, 200))
    if "attribution" not in args.skip:
        run(
            sys.executable, "-m", "bench.attribution", "--detector", "runs/detector/model.pt",
            "--params", args.params, "--split", "train",
            "--instances", str(args.fast_instances),
            "--reference-instances", str(args.reference_instances),
        )  # fmt: skip
    if "attribution_baseline" not in args.skip:
        run(sys.executable, "-m", "bench.attribution_baseline", "--params", args.params)
    if "pseudo_labels" not in args.skip:
        run(
            sys.executable, "-m", "bench.pseudo_labels",
            "--annotations", data["train_json"], "--image-root", data["train_images"],
            "--maps", "runs/attribution", "--results", str(RESULTS), "--params", args.params,
        )  # fmt: skip
    if "refine_modes" not in args.skip:
        run(sys.executable, "-m", "bench.refine_modes", "--results", str(RESULTS))
    if "segmenters" not in args.skip:
        merge_results("segmenters", segmenters_object(args.params))
    if "scale" not in args.skip:
        run(sys.executable, "-m", "bench.scale")
    if "data_check" not in args.skip:
        run(sys.executable, "-m", "bench.data_check", "--params", args.params)
    results = json.loads(RESULTS.read_text())
    print(f"\nbench finished in {time.perf_counter() - started:.0f} s -> {RESULTS}")
    for key, value in results.items():
        print(f"\n[{key}]")
        for name, number in value.items():
            if not isinstance(number, dict | list):
                print(f"  {name:<32} {number}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
