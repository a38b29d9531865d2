"""Benchmark: train the CPU-default detector on the synthetic set, measure what BBAM needs.

BBAM can only explain an instance that has at least one *positive* jittered proposal, so
besides box AP50 this reports the fraction of val instances with >= 1 positive among
`--proposals` jitters (each coordinate moved by U(-0.3, 0.3) x box w/h, clipped; positive iff
the argmax over all logits incl. background is the GT label and IoU(decoded box of that
class, GT box) > 0.8), measured in the resized image as the attribution stage sees it.

    python -m bench.detector --data-root data/synthetic --out runs/bench_detector
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from bbam.data.coco import read_coco
from bbam.data.images import load_rgb
from bbam.detector import freeze, prepare_images, roi_head_forward
from bbam.train_detector import DetectorTrainConfig, detector_from_config, train_detector
from bench.results import merge_results


def jitter_boxes(
    box: np.ndarray, n: int, height: int, width: int, rng: np.random.Generator, frac: float = 0.3
) -> np.ndarray:
    """n proposals around `box` (xyxy), each coordinate offset independently, clipped."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    offsets = rng.uniform(-frac, frac, size=(n, 4)) * np.array([w, h, w, h])
    out = box[None, :] + offsets
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32)


@torch.no_grad()
def positive_fraction(model, records, n_proposals: int, seed: int = 0, iou_thresh: float = 0.8):
    rng = np.random.default_rng(seed)
    hits, total = 0, 0
    for record in records:
        instances = [inst for inst in record.instances if not inst.iscrowd]
        if not instances:
            continue
        batch, _, sizes = prepare_images(model, [load_rgb(record.path)])
        h, w = sizes[0]
        ratio = np.array([w / record.width, h / record.height] * 2, dtype=np.float32)
        gts = [np.asarray(inst.box, dtype=np.float32) * ratio for inst in instances]
        proposals = [jitter_boxes(gt, n_proposals, h, w, rng) for gt in gts]
        out = roi_head_forward(model, batch, [torch.from_numpy(np.concatenate(proposals))])
        for k, (inst, gt) in enumerate(zip(instances, gts, strict=True)):
            sl = slice(k * n_proposals, (k + 1) * n_proposals)
            logits, boxes = out.logits[sl], out.boxes[sl, inst.label]
            iou = box_iou(boxes, torch.from_numpy(gt)[None]).squeeze(1)
            positive = (logits.argmax(1) == inst.label) & (iou > iou_thresh)
            hits += bool(positive.any())
            total += 1
    return hits / max(total, 1), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_detector"))
    parser.add_argument("--epochs", type=int, default=None, help="override the config default")
    parser.add_argument("--proposals", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    root = args.data_root
    image_root = root / "VOC2012" / "JPEGImages"
    train = read_coco(root / "annotations" / "instances_train.json", image_root, with_masks=False)
    val = read_coco(root / "annotations" / "instances_val.json", image_root, with_masks=False)
    overrides = {} if args.epochs is None else {"epochs": args.epochs}
    config = DetectorTrainConfig(**overrides)
    params_hash = hashlib.sha256(
        json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
    ).hexdigest()[:16]
    metrics = train_detector(train, val, args.out, config, params_hash, not args.no_progress)

    model = detector_from_config(config, len(train.classes) + 1, weights=args.out / "model.pt")
    fraction, n_instances = positive_fraction(freeze(model), val.records, args.proposals)

    result = {
        "train_seconds": metrics["train_seconds"],
        "box_ap50": round(metrics["box_ap50"], 4),
        "positive_fraction": round(fraction, 4),
        "epochs": config.epochs,
    }
    rows = [
        ("config", f"{config.arch} {config.min_size}/{config.max_size} x{config.epochs} ep"),
        ("train images / val instances", f"{len(train.records)} / {n_instances}"),
        ("train seconds", f"{result['train_seconds']:.1f}"),
        (
            "box AP / AP50 / AP75",
            "{box_ap:.3f} / {box_ap50:.3f} / {box_ap75:.3f}".format(**metrics),
        ),
        (f"val instances with >=1 positive of {args.proposals}", f"{fraction:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    merge_results("detector", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
