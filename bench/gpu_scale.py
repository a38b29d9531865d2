"""Benchmark: what BBAM costs at the paper's scale, and a projection for VOC train_aug.

A ResNet-50-FPN Faster R-CNN at the paper's test size (short side 800, long side at most
1333; torchvision's 256-channel FPN and 1024-d box head) runs `reference` and `fast` (at
several batch sizes) on the same instances. For each it measures:

- the fixed cost per instance (jitter pass, positives, set-up) and the cost per instance per
  Adam step, from two runs of different fixed step counts (their difference cancels the
  fixed part; early stopping off, so both runs do exactly that many steps);
- peak GPU memory;
- the achieved FLOP/s of the masked forward+backward (torch.utils.flop_counter on one step)
  against a bf16 matmul peak measured on the same device in the same run.

Then, at the largest batch size, what each speed-up of the engine is worth (batch norms
folded into the convolutions, cuDNN's algorithm search, the crop window), and with
--profile the CUDA kernels one step spends its time in.

What a step costs depends on the detector's shape and the image size, not on its weights, and
no detector of this size can be trained inside a GPU check. So the detector is randomly
initialised, and its two last layers are set so that every jitter is classified as the
instance's class and regressed onto itself: every jitter within the IoU thresholds is a
positive (the table's "positives" column says how many). How many steps `fast` takes before it stops early,
and how well its maps agree with the reference's, depend on the weights: bench.attribution
measures those on a trained detector, and `--fast-iterations` brings its figure here.

    python -m bench.gpu_scale [--fast-iterations N] [--batch-sizes 1 8 32 64]

Merges `gpu_scale` into bench/results.json (or --results).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bbam.attribution import (
    AttributionConfig,
    AttributionItem,
    attribute_instances,
    profile_config,
)
from bbam.detector import fold_batchnorm, make_heads_fn
from bbam.device import resolve_device
from bench.attribution import (
    dense_flops_per_s,
    detector_items,
    flops_per_instance_iteration,
    log,
    run,
)
from bench.results import RESULTS, merge_results
from tasks.params import load_params

# PASCAL VOC 2012 trainval detection statistics (the devkit's): 27,450 objects in 11,540
# images. train_aug's 10,582 images are a subset, so their count is projected at that rate.
VOC_TRAIN_AUG_IMAGES = 10_582
VOC_OBJECTS_PER_IMAGE = 27_450 / 11_540
# The reference code's cost estimated from its settings, not measured: ~250 V100-hours.
REFERENCE_CODE_V100_HOURS = 250.0
# A small object's side in the 800-px image (torchvision pools boxes under 112 px from P2).
SMALL_SIDE = 80.0
SMALL_ROW = "fast_small"
PAPER_DETECTOR = {
    "arch": "resnet50_fpn",
    "weights": None,
    "weights_backbone": None,
    "min_size": 800,
    "max_size": 1333,
    "anchor_sizes": [32, 64, 128, 256, 512],
    "fpn_channels": 256,
    "representation_size": 1024,
}


def self_confirming(model: torch.nn.Module, label: int) -> torch.nn.Module:
    """Set the box predictor so that every proposal is classified as ``label`` and regressed
    onto itself (zero deltas): the step's cost is unchanged, and every jitter close enough to
    the box is a positive."""
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.zero_()
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[label] = 10.0
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    return model


def step_costs(
    heads, items, config: AttributionConfig, device: torch.device, steps: tuple[int, int]
) -> dict:
    """Fixed seconds per instance and seconds per instance-step, from runs of two step counts."""
    short, long = steps
    fixed_steps = {
        k: dataclasses.replace(config, iterations=k, early_stop=False) for k in (short, long)
    }
    # warm-up on the same runs' shapes: allocations and cuDNN's algorithm search for each
    # shape happen here, not in the timed short run (where they would shrink the difference)
    attribute_instances(heads, items, fixed_steps[short], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, t_short = run(heads, items, fixed_steps[short], device)
    results, t_long = run(heads, items, fixed_steps[long], device)
    n = len(items)
    ok = [r for r in results if r.status == "ok"]
    step_s = max(t_long - t_short, 0.0) / (long - short) / n
    return {
        "batch_size": config.batch_size,
        "instances": n,
        "ok": len(ok),
        "fixed_ms_per_instance": 1000 * max(t_short / n - short * step_s, 0.0),
        "ms_per_instance_step": 1000 * step_s,
        "positives_per_instance": float(np.mean([r.stats["positives"] for r in ok])) if ok else 0.0,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def ablation(
    plain_model, items, config: AttributionConfig, device, steps, compile_backbone: bool = False
) -> dict[str, dict]:
    """Per-step cost with and without each of the engine's speed-ups; with
    ``compile_backbone``, also the folded backbone under torch.compile (a candidate, not
    used by the engine: its compile time is in the warm-up, not in the figures)."""
    folded_model = fold_batchnorm(copy.deepcopy(plain_model)).to(device)
    folded = make_heads_fn(folded_model)
    plain = make_heads_fn(plain_model.to(device))
    variants = {
        "batch norms as layers": (plain, config),
        "batch norms folded (default)": (folded, config),
        "folded + cuDNN search": (folded, dataclasses.replace(config, cudnn_benchmark=True)),
        "folded + crop window 1.0": (folded, dataclasses.replace(config, crop_context=1.0)),
        "folded + crop window 0.5": (folded, dataclasses.replace(config, crop_context=0.5)),
    }
    every_level = make_heads_fn(folded_model, all_levels=True)
    variants["folded, every pyramid level built"] = (every_level, config)
    if compile_backbone:
        compiled = make_heads_fn(copy.deepcopy(folded_model), compile_backbone=True)
        variants["folded + torch.compile(backbone body)"] = (compiled, config)
    out = {}
    for name, (heads, cfg) in variants.items():
        try:
            out[name] = step_costs(heads, items, cfg, device, steps)
        except Exception as exc:  # a candidate that fails must not cost the measured rows
            out[name] = {"batch_size": cfg.batch_size, "error": f"{type(exc).__name__}: {exc}"}
    return out


def shrunk(item: AttributionItem, side: float) -> AttributionItem:
    """``item`` with its box replaced by a ``side`` x ``side`` box on the same centre: small
    objects, whose proposals pool from the finest pyramid level (the dearest)."""
    x0, y0, x1, y1 = item.box.reshape(4).tolist()
    cx, cy, h = (x0 + x1) / 2, (y0 + y1) / 2, side / 2
    return dataclasses.replace(item, box=torch.tensor([cx - h, cy - h, cx + h, cy + h]))


def profile_step(heads, items, config: AttributionConfig, device, path: Path) -> None:
    """The kernels three steps of ``config`` spend their time in, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    cfg = dataclasses.replace(config, iterations=3, early_stop=False)
    attribute_instances(heads, items, cfg, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run(heads, items, cfg, device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30))


def seconds_per_instance(costs: dict, iterations: float) -> float:
    return (costs["fixed_ms_per_instance"] + iterations * costs["ms_per_instance_step"]) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--reference-instances", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 12], metavar=("SHORT", "LONG"))
    parser.add_argument(
        "--fast-iterations", type=float, default=None,
        help="fast's mean Adam steps per instance on a trained detector (bench.attribution); "
        "default: the profile's cap (an upper bound)",
    )  # fmt: skip
    parser.add_argument("--detector", type=str, default=None, help="JSON of detector keys")
    parser.add_argument("--peak-size", type=int, default=8192, help="matmul size for the peak")
    parser.add_argument("--ablation-steps", type=int, nargs=2, default=[2, 8])
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--profile", type=Path, default=None, help="write the kernel table here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON to merge into")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    params = copy.deepcopy(load_params(args.params))
    detector_keys = dict(PAPER_DETECTOR)
    if args.detector:
        detector_keys.update(json.loads(args.detector))
    params["detector"].update(detector_keys)
    needed = max(max(args.batch_sizes) * 2, args.reference_instances, 8)
    log(f"{detector_keys['arch']} at short side {detector_keys['min_size']}, random weights")
    plain_model, items, _ = detector_items(params, None, args.split, needed, fold_norms=False)
    plain_model = self_confirming(plain_model, label=1)
    items = [dataclasses.replace(it, label=1) for it in items][:needed]
    heads = make_heads_fn(fold_batchnorm(copy.deepcopy(plain_model)).to(device))
    hw = tuple(items[0].image.shape[-2:]) if items else None
    log(f"{len(items)} instances on images resized to {hw}")

    reference = profile_config("reference")
    fast = profile_config("fast")
    fast_iterations = args.fast_iterations or float(fast.iterations)
    rows: dict[str, dict] = {}
    log(f"reference on {min(args.reference_instances, len(items))} instances")
    rows["reference"] = step_costs(
        heads, items[: args.reference_instances], reference, device, tuple(args.steps)
    )
    for bs in args.batch_sizes:
        cfg = dataclasses.replace(fast, batch_size=bs)
        log(f"fast, batch size {bs}, on {min(max(2 * bs, 8), len(items))} instances")
        try:
            rows[f"fast_bs{bs}"] = step_costs(
                heads, items[: max(2 * bs, 8)], cfg, device, tuple(args.steps)
            )
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows[f"fast_bs{bs}"] = {"batch_size": bs, "error": "out of GPU memory"}
    small_bs = max(args.batch_sizes)
    log(f"fast, batch size {small_bs}, boxes shrunk to {SMALL_SIDE} px (finest pyramid level)")
    small_items = [shrunk(it, SMALL_SIDE) for it in items[: 2 * small_bs]]
    try:
        small = step_costs(
            heads, small_items, dataclasses.replace(fast, batch_size=small_bs), device,
            tuple(args.steps),
        )  # fmt: skip
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        small = {"batch_size": small_bs, "error": "out of GPU memory"}
    fast_rows = {k: v for k, v in rows.items() if k != "reference" and "error" not in v}
    best = min(fast_rows, key=lambda k: seconds_per_instance(fast_rows[k], fast_iterations))
    rows[SMALL_ROW] = small

    log("FLOPs per instance-step and the bf16 matmul peak")
    use_amp = fast.amp and device.type == "cuda"
    peak = dense_flops_per_s(device, torch.bfloat16 if use_amp else torch.float32, n=args.peak_size)
    best_cfg = dataclasses.replace(fast, batch_size=fast_rows[best]["batch_size"])
    for name, cfg in (("reference", reference), (best, best_cfg)):
        flops = flops_per_instance_iteration(heads, items, cfg, device)
        row = rows[name]
        row["gflop_per_instance_step"] = flops / 1e9
        row["tflops_achieved"] = flops / (row["ms_per_instance_step"] / 1000) / 1e12
        row["fraction_of_bf16_peak"] = row["tflops_achieved"] * 1e12 / peak

    largest = dataclasses.replace(fast, batch_size=max(args.batch_sizes))
    variants = {}
    if not args.no_ablation:
        log(f"speed-ups one by one at batch size {largest.batch_size}")
        variants = ablation(
            plain_model, items[: largest.batch_size], largest, device,
            tuple(args.ablation_steps), compile_backbone=args.compile,
        )  # fmt: skip
    if args.profile:
        log(f"profiling 3 steps at batch size {largest.batch_size} -> {args.profile}")
        profile_step(heads, items[: largest.batch_size], largest, device, args.profile)

    for name, row in rows.items():
        if "error" not in row:
            steps = float(reference.iterations) if name == "reference" else fast_iterations
            row["iterations_per_instance"] = steps
            row["instances_per_s"] = 1.0 / seconds_per_instance(row, steps)
    voc_instances = VOC_TRAIN_AUG_IMAGES * VOC_OBJECTS_PER_IMAGE
    hours = {
        name: voc_instances / rows[name]["instances_per_s"] / 3600 for name in ("reference", best)
    }
    if "error" not in small:
        hours["fast_small_objects"] = voc_instances / small["instances_per_s"] / 3600
    speedup = rows[best]["instances_per_s"] / rows["reference"]["instances_per_s"]

    fmt = "{:<11} {:>5} {:>9} {:>9} {:>8} {:>12} {:>6} {:>8} {:>8} {:>8} {:>8}"
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"{detector_keys['arch']}, images {hw}; bf16 peak {peak / 1e12:.1f} TFLOP/s")  # fmt: skip
    print(fmt.format("profile", "batch", "instances", "positives", "fixed ms", "ms/inst-step",
                     "steps", "inst/s", "peak GiB", "TFLOP/s", "of peak"))  # fmt: skip
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<11} {row['batch_size']:>5}  {row['error']}")
            continue
        tf = row.get("tflops_achieved")
        print(
            fmt.format(
                name, row["batch_size"], row["instances"], f"{row['positives_per_instance']:.0f}",
                f"{row['fixed_ms_per_instance']:.1f}",
                f"{row['ms_per_instance_step']:.2f}", f"{row['iterations_per_instance']:.0f}",
                f"{row['instances_per_s']:.2f}",
                "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}",
                "-" if tf is None else f"{tf:.1f}",
                "-" if tf is None else f"{100 * row['fraction_of_bf16_peak']:.1f} %",
            )
        )  # fmt: skip
    for name, row in variants.items():
        if "error" in row:
            print(f"  bs {largest.batch_size}, {name:<40} {row['error'][:200]}")
            continue
        print(
            f"  bs {largest.batch_size}, {name:<40} {row['ms_per_instance_step']:7.2f} ms/inst-step"
            f"  fixed {row['fixed_ms_per_instance']:6.1f} ms  peak {row['peak_memory_gib'] or 0:.1f} GiB"
        )
    print(
        f"fast ({best}) / reference: {speedup:.1f}x instances/s. VOC train_aug "
        f"({VOC_TRAIN_AUG_IMAGES} images, ~{voc_instances:.0f} instances): reference "
        f"{hours['reference']:.1f} GPU-hours, fast {hours[best]:.2f} GPU-hours "
        f"(the reference code's own estimate: ~{REFERENCE_CODE_V100_HOURS:.0f} V100-hours)"
    )
    if "fast_small_objects" in hours:
        print(
            f"if every instance were a small object ({SMALL_ROW}): fast "
            f"{hours['fast_small_objects']:.2f} GPU-hours"
        )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "detector": detector_keys,
        "image_hw": list(hw) if hw else None,
        "bf16_peak_tflops": peak / 1e12,
        "rows": rows,
        "speedups_at_largest_batch": variants,
        "best_fast": best,
        "speedup": speedup,
        "fast_iterations_source": "measured" if args.fast_iterations else "profile cap",
        "voc_train_aug_instances": voc_instances,
        "voc_train_aug_gpu_hours": {
            "reference": hours["reference"],
            "fast": hours[best],
            "fast_small_objects": hours.get("fast_small_objects"),
        },
        "reference_code_v100_hours_estimate": REFERENCE_CODE_V100_HOURS,
    }
    if not args.no_write:
        merge_results("gpu_scale", result, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
