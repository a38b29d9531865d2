"""Benchmark: BBAM `reference` vs `fast` profiles on the same instances, in one run.

Measures instances/s and ms per (instance-)iteration of each profile, the agreement of the
two (mean IoU of the maps thresholded at 0.5), and the achieved FLOP/s of `fast` against
this machine's dense matmul throughput measured in the same run (heads forward+backward
FLOPs from torch.utils.flop_counter on one iteration). Merges `attribution` into
bench/results.json.

The reference is not reproducible to the pixel across seeds (its 1000 random jitters pick
different positives), so the run also measures the reference against itself with the next seed:
`reference_self_agreement_iou` is the ceiling any faster variant can be expected to reach, and
`agreement_relative` = agreement_iou / that ceiling.

What a user keeps is the pseudo mask, not the raw map: `refined_agreement_iou` compares the
fg masks both maps become after the pipeline's refinement (rank rule, blur, CRF: `refine` of
--params; the reference defaults for the toy setup), with the reference's own seed-to-seed
figure beside it (`reference_self_refined_agreement_iou`).

    python -m bench.attribution                                  # toy detector, synthetic
    python -m bench.attribution --detector runs/detector/model.pt --params params.yaml

`--variant iterations=100,lr=0.05` (repeatable) also runs fast's profile with those changes on
the reference's instances: what a step budget costs in agreement (`fast_variants`).

With a trained torchvision detector the `detector` section of --params gives its
architecture. `--reference-instances` bounds the slow side (the first N instances; the
fast side runs all `--instances` and agreement is measured on the common ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from bbam.attribution import (
    AttributionConfig,
    AttributionItem,
    AttributionResult,
    attribute_instances,
    map_to_image,
    profile_config,
    profile_fields,
)
from bbam.device import resolve_device, set_torch_threads
from bbam.heads import HeadsFn
from bbam.refine import RefineConfig, refine_instance
from bbam.toy_detector import ToyDetector, toy_scene
from bench.results import RESULTS, merge_results
from tasks.params import load_params
from tasks.pseudo_label_config import refine_config


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# What refining a map needs, per item key: the RGB image the pipeline refines on and the box
# in its coordinates (`refined_masks`).
RefineInputs = dict[str, tuple[np.ndarray, np.ndarray]]


def toy_setup(n_instances: int, seed: int, size: int = 128) -> tuple[HeadsFn, list, dict]:
    """Synthetic scenes of 1-3 textured disks; small strides suit the small images."""
    rng = np.random.default_rng(seed)
    items: list[AttributionItem] = []
    det = ToyDetector().eval()
    n_img = 0
    while len(items) < n_instances:
        disks: list[tuple[float, float, float, int]] = []
        for _ in range(int(rng.integers(1, 4)) * 20):
            if len(disks) == 3:
                break
            r = float(rng.uniform(10, 24))
            cx, cy = (float(v) for v in rng.uniform(r + 2, size - r - 2, 2))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 4) ** 2 for x, y, q, _ in disks):
                disks.append((cx, cy, r, int(rng.integers(1, 3))))
        img, boxes, _ = toy_scene((size, size), disks)
        for k, (box, disk) in enumerate(zip(boxes, disks, strict=True)):
            items.append(AttributionItem(f"toy{n_img:03d}_{k}", img, box, disk[3]))
        n_img += 1
    return det, items[:n_instances], {"stride_coefs": (4.0, 12.0)}


def toy_refine_inputs(items: list[AttributionItem]) -> RefineInputs:
    """The toy images are their own RGB (min-max scaled to uint8); boxes are already in it."""
    out: RefineInputs = {}
    for it in items:
        img = it.image.detach().float()
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
        rgb = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out[it.key] = (np.ascontiguousarray(rgb), it.box.numpy().astype(np.float32))
    return out


def detector_items(
    params: dict,
    detector: Path | str | None,
    split: str,
    limit: int,
    with_masks: bool = False,
    fold_norms: bool = True,
) -> tuple[torch.nn.Module, list[AttributionItem], dict[str, tuple]]:
    """The trained detector (frozen, CPU) and up to ``limit`` non-crowd instances of ``split``
    as items on the detector's resized images, with per key (RGB image, box in it, GT mask or
    None) for refining and scoring."""
    from bbam.data.images import load_rgb
    from bbam.detector import freeze, prepare_images
    from bbam.train_detector import detector_from_config
    from tasks.detector_config import detector_config
    from tasks.params import load_split

    data = load_split(params, split, with_masks=with_masks)
    model = detector_from_config(detector_config(params), len(data.classes) + 1, weights=detector)
    model = freeze(model, fold_norms)
    items: list[AttributionItem] = []
    inputs: dict[str, tuple] = {}
    for record in data.records:
        instances = [
            i for i in record.instances if not i.iscrowd and (i.has_mask or not with_masks)
        ]
        if not instances:
            continue
        rgb = load_rgb(record.path)
        batch, _, sizes = prepare_images(model, [rgb])
        h, w = sizes[0]
        ratio = torch.tensor([w / record.width, h / record.height] * 2, dtype=torch.float32)
        image = batch[0].detach()
        for inst in instances:
            box = np.asarray(inst.box, dtype=np.float32)
            key = f"{record.image_id}_{inst.instance_id}"
            items.append(AttributionItem(key, image, torch.as_tensor(box) * ratio,
                                         int(inst.label), (h, w)))  # fmt: skip
            inputs[key] = (rgb, box, inst.mask.astype(bool) if with_masks else None)
        if len(items) >= limit:
            break
    return model, items, inputs


def real_setup(
    args: argparse.Namespace, device: torch.device
) -> tuple[HeadsFn, list, dict, RefineInputs]:
    from bbam.detector import make_heads_fn

    params = load_params(args.params)
    overrides = dict(params["attribution"].get("overrides") or {})
    # room for screening out no-positive ones
    model, items, inputs = detector_items(params, args.detector, args.split, 3 * args.instances)
    refine_inputs: RefineInputs = {key: (rgb, box) for key, (rgb, box, _) in inputs.items()}
    return make_heads_fn(model.to(device)), items, overrides, refine_inputs


def dense_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Best-of-5 throughput of an n x n matmul: the machine's practical dense peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / (4 if device.type == "cuda" else 1))
    return 2.0 * n**3 / best


def flops_per_instance_iteration(heads, items, config: AttributionConfig, device) -> float:
    """FLOPs of one batched iteration (heads forward + backward to the masks) per instance:
    the difference between runs of 2 and 1 iterations cancels the reference pass."""
    items = items[: config.batch_size]
    counts = []
    for iters in (1, 2):
        cfg = dataclasses.replace(config, iterations=iters, early_stop=False)
        with FlopCounterMode(display=False) as counter:
            res = attribute_instances(heads, items, cfg, device)
        counts.append(counter.get_total_flops())
    ok = max(sum(r.status == "ok" for r in res), 1)
    return (counts[1] - counts[0]) / ok


def refined_masks(
    results: list[AttributionResult], inputs: RefineInputs, refine: RefineConfig, align: bool
) -> dict[str, np.ndarray]:
    """The fg pseudo mask each map becomes in the pipeline (upsampled to the image, refined)."""
    out = {}
    for r in results:
        if r.status != "ok" or r.key not in inputs:
            continue
        rgb, box = inputs[r.key]
        heat = map_to_image(r.grid, r.resized_hw, rgb.shape[:2], align, valid_hw=r.valid_hw)
        out[r.key] = refine_instance(heat, box, rgb, refine).fg
    return out


def mask_agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Mean IoU of the masks two runs made of the same instances."""
    ious = []
    for key in a.keys() & b.keys():
        union = (a[key] | b[key]).sum()
        ious.append(1.0 if union == 0 else float((a[key] & b[key]).sum() / union))
    return float(np.mean(ious)) if ious else float("nan")


def parse_variant(text: str) -> dict:
    """``"iterations=100,lr=0.05"`` -> {"iterations": 100, "lr": 0.05} (YAML scalars)."""
    changes = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in AttributionConfig.__dataclass_fields__:
            raise SystemExit(
                f"--variant {text!r}: {part!r} is not FIELD=VALUE of AttributionConfig"
            )
        changes[key.strip()] = yaml.safe_load(value)
    return changes


def run(heads, items, config, device) -> tuple[list[AttributionResult], float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = attribute_instances(heads, items, config, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return results, time.perf_counter() - t0


def thresholded_maps(results: list[AttributionResult]) -> dict[str, np.ndarray]:
    """Each ok map on its resized image, thresholded at 0.5."""
    return {
        r.key: map_to_image(r.grid, r.resized_hw, r.resized_hw, valid_hw=r.valid_hw) > 0.5
        for r in results
        if r.status == "ok"
    }


def agreement(a: list[AttributionResult], b: list[AttributionResult]) -> tuple[float, int]:
    """Mean IoU of the thresholded maps of the instances both runs explained, and how many."""
    ma, mb = thresholded_maps(a), thresholded_maps(b)
    return mask_agreement(ma, mb), len(ma.keys() & mb.keys())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", type=Path, default=None, help="trained model.pt")
    parser.add_argument("--split", default="val")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--reference-instances", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
        help="also run fast's profile with these AttributionConfig changes on the reference's "
        "instances (repeatable), e.g. iterations=100,lr=0.05",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="do not touch results.json")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON to merge into")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    device = resolve_device(args.device)

    if args.detector is not None:
        heads, items, overrides, refine_inputs = real_setup(args, device)
        refine = refine_config(load_params(args.params))
        source = f"detector {args.detector}, data of {args.params} ({args.split})"
    else:
        heads, items, overrides = toy_setup(args.instances, args.seed)
        refine_inputs, refine = toy_refine_inputs(items), RefineConfig()
        source = "toy detector on synthetic disks (128x128)"
    if not items:
        print("no instances found", file=sys.stderr)
        return 1
    n_ref = min(args.reference_instances, len(items))
    # Shared settings (e.g. stride_reference_size) apply to both sides; the reference keeps
    # its own numbers (300 steps, 1000 jitters, ...) even where params override them for fast.
    reference_overrides = {
        k: v for k, v in overrides.items() if k not in profile_fields("reference")
    }
    ref_cfg = profile_config("reference", seed=args.seed, **reference_overrides)
    # The perturbation baseline is a choice of method, not a shortcut (bench.attribution_baseline
    # compares them): fast keeps the reference's here, so agreement measures the shortcuts alone.
    fast_cfg = profile_config("fast", seed=args.seed, **{**overrides, "baseline": ref_cfg.baseline})

    log(f"{len(items)} instances from {source}; screening for positives (also a warm-up)")
    # Both profiles are timed on the same instances, all with positives: a no_positive
    # instance costs one forward pass and would flatter whichever side has more of them.
    screen = attribute_instances(heads, items, dataclasses.replace(ref_cfg, iterations=1), device)
    screened_out = sum(r.status != "ok" for r in screen)
    items = [it for it, r in zip(items, screen, strict=True) if r.status == "ok"][: args.instances]
    log(f"{screened_out} instances without positives left out; {len(items)} remain")
    if not items:
        print("no instance has a positive proposal", file=sys.stderr)
        return 1
    n_ref = min(args.reference_instances, len(items))
    fast_res, fast_s = run(heads, items, fast_cfg, device)
    log(f"fast: {fast_s:.1f} s; reference on {n_ref} instances")
    ref_res, ref_s = run(heads, items[:n_ref], ref_cfg, device)
    log(f"reference: {ref_s:.1f} s; reference again with seed {args.seed + 1}")
    ref2_res, _ = run(
        heads, items[:n_ref], dataclasses.replace(ref_cfg, seed=args.seed + 1), device
    )
    self_iou, _ = agreement(ref_res, ref2_res)
    # What the pipeline makes of the maps: the refined fg pseudo masks (refine params).
    ref_masks = refined_masks(ref_res, refine_inputs, refine, ref_cfg.align_corners)
    ref2_masks = refined_masks(ref2_res, refine_inputs, refine, ref_cfg.align_corners)
    refined_self = mask_agreement(ref_masks, ref2_masks)
    # params may cap `fast` for a CPU budget; the profile's own settings (only the shared
    # ones from params) show what the cap costs in agreement.
    plain_cfg = profile_config("fast", seed=args.seed, **reference_overrides)

    def on_reference_instances(cfg: AttributionConfig, overrides: dict) -> dict:
        """`cfg` on the reference's instances: speed and agreement with the reference."""
        res, seconds = run(heads, items[:n_ref], cfg, device)
        masks = refined_masks(res, refine_inputs, refine, cfg.align_corners)
        # the same setting with the next seed against the next seed's reference: a second
        # sample of its agreement (20 instances leave a few hundredths of noise)
        res2, _ = run(heads, items[:n_ref], dataclasses.replace(cfg, seed=cfg.seed + 1), device)
        masks2 = refined_masks(res2, refine_inputs, refine, cfg.align_corners)
        return {
            "instances_per_s": n_ref / seconds,
            "speedup": (n_ref / seconds) / (n_ref / ref_s),
            "agreement_iou": agreement(ref_res, res)[0],
            "refined_agreement_iou": mask_agreement(ref_masks, masks),
            "refined_agreement_iou_next_seed": mask_agreement(ref2_masks, masks2),
            "iterations_per_instance": sum(r.stats["iterations"] for r in res) / n_ref,
            "overrides": overrides,
        }

    plain = None
    if plain_cfg != fast_cfg:
        log("fast with the profile's own settings, on the reference's instances")
        plain = on_reference_instances(plain_cfg, reference_overrides)
    variants = {}
    for text in args.variant:
        changes = parse_variant(text)
        log(f"fast with {changes}, on the reference's instances")
        variants[text] = on_reference_instances(
            dataclasses.replace(plain_cfg, **changes), {**reference_overrides, **changes}
        )
    log("measuring FLOPs")

    ref_iters = sum(r.stats["iterations"] for r in ref_res)
    fast_iters = sum(r.stats["iterations"] for r in fast_res)
    ref_ips = n_ref / ref_s
    fast_ips = len(items) / fast_s
    iou, n_pairs = agreement(ref_res, fast_res[:n_ref])
    refined_iou = mask_agreement(
        ref_masks, refined_masks(fast_res[:n_ref], refine_inputs, refine, fast_cfg.align_corners)
    )

    amp = fast_cfg.amp and device.type == "cuda"
    peak = dense_flops_per_s(device, torch.bfloat16 if amp else torch.float32)
    peak_ref = peak if not amp else dense_flops_per_s(device, torch.float32)
    f_fast = flops_per_instance_iteration(heads, items, fast_cfg, device)
    f_ref = flops_per_instance_iteration(heads, items, ref_cfg, device)
    util_fast = f_fast * fast_iters / fast_s / peak
    util_ref = f_ref * ref_iters / ref_s / peak_ref

    row = "{:<10} {:>9} {:>12} {:>12} {:>14} {:>10} {:>10}"
    print(f"source: {source}; device: {device}; threads: {torch.get_num_threads()}")
    print(row.format("profile", "instances", "inst/s", "ms/iter", "iters/inst", "GFLOP/s", "util"))
    for name, n, ips, s, iters, f, util in (
        ("reference", n_ref, ref_ips, ref_s, ref_iters, f_ref, util_ref),
        ("fast", len(items), fast_ips, fast_s, fast_iters, f_fast, util_fast),
    ):
        print(
            row.format(
                name,
                n,
                f"{ips:.3f}",
                f"{1000 * s / max(iters, 1):.2f}",
                f"{iters / n:.1f}",
                f"{f * iters / s / 1e9:.2f}",
                f"{util:.4f}",
            )
        )
    if plain is not None:
        print(
            f"fast without the params caps ({plain['iterations_per_instance']:.0f} iters/inst): "
            f"{plain['instances_per_s']:.3f} inst/s, speedup {plain['speedup']:.1f}x, "
            f"agreement IoU {plain['agreement_iou']:.3f} "
            f"(refined masks {plain['refined_agreement_iou']:.3f}; next seed "
            f"{plain['refined_agreement_iou_next_seed']:.3f})"
        )
    for text, v in variants.items():
        print(
            f"fast with {text} ({v['iterations_per_instance']:.0f} iters/inst): "
            f"{v['instances_per_s']:.3f} inst/s, speedup {v['speedup']:.1f}x, agreement IoU "
            f"{v['agreement_iou']:.3f} (refined masks {v['refined_agreement_iou']:.3f}; next seed "
            f"{v['refined_agreement_iou_next_seed']:.3f})"
        )
    status = {
        p: sum(r.status == "no_positive" for r in res)
        for p, res in (("ref", ref_res), ("fast", fast_res))
    }
    print(
        f"speedup {fast_ips / ref_ips:.1f}x; agreement IoU {iou:.3f} over {n_pairs} instances "
        f"(reference vs itself, next seed: {self_iou:.3f}); refined pseudo masks: "
        f"{refined_iou:.3f} (reference vs itself {refined_self:.3f}); "
        f"dense peak {peak / 1e9:.1f} GFLOP/s; no_positive {status}"
    )
    result = {
        "reference_instances_per_s": ref_ips,
        "fast_instances_per_s": fast_ips,
        "speedup": fast_ips / ref_ips,
        "agreement_iou": iou,
        "reference_self_agreement_iou": self_iou,
        "agreement_relative": iou / self_iou if self_iou > 0 else float("nan"),
        "refined_agreement_iou": refined_iou,
        "reference_self_refined_agreement_iou": refined_self,
        "flops_utilization": util_fast,
        "flops_utilization_reference": util_ref,
        "ms_per_iter_reference": 1000 * ref_s / max(ref_iters, 1),
        "ms_per_iter_fast": 1000 * fast_s / max(fast_iters, 1),
        "iterations_per_instance_fast": fast_iters / len(items),
        "instances": {"reference": n_ref, "fast": len(items), "agreement_pairs": n_pairs},
        "screened_out_no_positive": screened_out,
        "fast_profile_defaults": plain,
        "fast_variants": variants,
        "no_positive": status,
        "source": source,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dense_peak_gflops": peak / 1e9,
    }
    if not args.no_write:
        merge_results("attribution", result, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
