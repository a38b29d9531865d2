"""Benchmark: the perturbation baseline (`mean` vs `blur`) on the same instances and detector.

For the first --instances non-crowd train instances with a GT mask, BBAM runs with the
pipeline's engine settings (params' profile and overrides) twice, once per baseline, and each
map is scored against the GT mask:
- `top_band_precision`: of the box pixels whose normalised map is >= 0.8, the share on the
  object (the object fills `gt_fill` of its box, which is what a map with no information gets);
- `refined_reference`: mean IoU of the fg mask after the reference refinement;
- `refined_params`: mean IoU after the refinement of --params (`refine:`).
GrabCut and the filled box are scored on the same instances. Merges `attribution_baseline`
into bench/results.json (percent). Nothing here is asserted.

    python -m bench.attribution_baseline --params params.yaml --detector runs/detector/model.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from bbam.attribution import attribute_instances, map_to_image
from bbam.baselines import box_mask, grabcut_mask, mask_iou
from bbam.data.masks import box_slices
from bbam.refine import RefineConfig, normalise_in_box, refine_instance
from bench.refine_modes import mode_configs
from bench.results import RESULTS, merge_results

BASELINES = ("mean", "blur")


def load_instances(params: dict, detector: Path, n: int):
    """The detector's heads and the first ``n`` train instances with a GT mask."""
    from bbam.detector import make_heads_fn
    from bench.attribution import detector_items

    model, items, inputs = detector_items(params, detector, "train", n, with_masks=True)
    return make_heads_fn(model), items[:n], inputs


def score(results, truth, refine_params: RefineConfig, align: bool) -> dict[str, float]:
    reference = mode_configs()["reference"]
    precision, ref_iou, params_iou = [], [], []
    for r in results:
        if r.status != "ok":
            continue
        rgb, box, gt = truth[r.key]
        heat = map_to_image(r.grid, r.resized_hw, rgb.shape[:2], align, valid_hw=r.valid_hw)
        sl = box_slices(box, *gt.shape)
        top = normalise_in_box(heat, sl) >= 0.8
        precision.append((top & gt).sum() / max(int(top.sum()), 1))
        ref_iou.append(mask_iou(gt, refine_instance(heat, box, rgb, reference).fg))
        params_iou.append(mask_iou(gt, refine_instance(heat, box, rgb, refine_params).fg))
    return {
        "instances_ok": len(precision),
        "top_band_precision": round(100 * float(np.mean(precision)), 2),
        "refined_reference": round(100 * float(np.mean(ref_iou)), 2),
        "refined_params": round(100 * float(np.mean(params_iou)), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    from tasks.attribution_config import engine_config
    from tasks.params import load_params
    from tasks.pseudo_label_config import refine_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--detector", type=Path, default=Path("runs/detector/model.pt"))
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    heads, items, truth = load_instances(params, args.detector, args.instances)
    engine = engine_config(params)
    refine = refine_config(params)
    out: dict = {"instances": len(items), "params_refine_mode": refine.mode}
    gts = list(truth.values())
    out["gt_fill"] = round(100 * float(np.mean([
        gt.sum() / max(int(box_mask(box, *gt.shape).sum()), 1) for _, box, gt in gts
    ])), 2)  # fmt: skip
    out["grabcut"] = round(
        100 * float(np.mean([mask_iou(g, grabcut_mask(i, b)) for i, b, g in gts])), 2
    )
    out["box"] = round(
        100 * float(np.mean([mask_iou(g, box_mask(b, *g.shape)) for _, b, g in gts])), 2
    )
    for baseline in BASELINES:
        config = dataclasses.replace(engine, baseline=baseline)
        started = time.perf_counter()
        results = attribute_instances(heads, items, config, "cpu")
        seconds = time.perf_counter() - started
        out[baseline] = {**score(results, truth, refine, config.align_corners),
                         "seconds_per_instance": round(seconds / max(len(items), 1), 3)}  # fmt: skip
    print(f"{len(items)} train instances; object fills {out['gt_fill']} % of its box; "
          f"GrabCut {out['grabcut']}, filled box {out['box']} (mean IoU, %)")  # fmt: skip
    print(f"{'baseline':<10}{'top-band precision':>20}{'refined: reference':>20}"
          f"{'refined: ' + refine.mode:>20}{'s/instance':>12}")  # fmt: skip
    for baseline in BASELINES:
        row = out[baseline]
        print(f"{baseline:<10}{row['top_band_precision']:>20}{row['refined_reference']:>20}"
              f"{row['refined_params']:>20}{row['seconds_per_instance']:>12}")  # fmt: skip
    if not args.no_write:
        merge_results("attribution_baseline", out, args.results)
    return out


if __name__ == "__main__":
    main()
