"""Benchmark: segmentation networks trained under full / bbam / box supervision, scored on val.

Trains the CPU default Mask R-CNN (resnet18_fpn) and DeepLabV3 (resnet18) once per supervision,
evaluates semantic mIoU and instance AP50 (VOC protocol) on the val split, prints a table and
merges `segmenters` into bench/results.json (read-modify-write, atomic).

    python -m bench.segmenters --data-root data/synthetic --pseudo runs/pseudo_labels

--pseudo holds the pseudo-label stage output: `instances_train.json` (COCO, fg RLE + `ignore`)
and `semantic/<image_id>.png`. Without them the bbam rows are skipped (reported as null).
Paper (VOC, BBAM vs full): 96.7% of the semantic mIoU, 92.2% of the instance AP50.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bbam.data.coco import read_coco
from bbam.evaluate import semantic_miou, voc_instance_metrics, write_metrics
from bbam.segmenters.instance import InstanceTrainConfig, predict_instances, train_instance
from bbam.segmenters.semantic import SemanticTrainConfig, predict_semantic, train_semantic
from bbam.segmenters.targets import SUPERVISIONS, render_label_map
from bench.results import merge_results


def _ratio(weak: float | None, full: float | None) -> float | None:
    return weak / full if weak is not None and full else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--pseudo", type=Path, default=Path("runs/pseudo_labels"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_segmenters"))
    parser.add_argument("--supervisions", nargs="+", default=list(SUPERVISIONS))
    parser.add_argument("--ins-epochs", type=int, default=InstanceTrainConfig.epochs)
    parser.add_argument("--sem-epochs", type=int, default=SemanticTrainConfig.epochs)
    parser.add_argument("--limit-train", type=int, default=0, help="use the first N train images")
    parser.add_argument("--limit-val", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-write", action="store_true", help="do not touch results.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    images = args.data_root / "VOC2012" / "JPEGImages"
    train = read_coco(args.data_root / "annotations" / "instances_train.json", images)
    val = read_coco(args.data_root / "annotations" / "instances_val.json", images)
    classes = train.classes
    train_recs = train.records[: args.limit_train or None]
    val_recs = val.records[: args.limit_val or None]
    pseudo_json = args.pseudo / "instances_train.json"
    pseudo_sem = args.pseudo / "semantic"
    gts = [render_label_map(r, "mask") for r in val_recs]

    rows: dict[str, dict[str, float | None]] = {}
    for sup in args.supervisions:
        if sup == "bbam" and not (pseudo_json.is_file() and pseudo_sem.is_dir()):
            print(f"skipping bbam: {pseudo_json} or {pseudo_sem} missing", file=sys.stderr)
            rows[sup] = {"sem_miou": None, "ins_ap50": None}
            continue
        t0 = time.time()
        sem_cfg = SemanticTrainConfig(supervision=sup, epochs=args.sem_epochs, device=args.device)
        sem = train_semantic(
            train_recs, classes, args.out / f"semantic_{sup}", sem_cfg, pseudo_sem, progress=False
        )
        preds = [
            label
            for _, label in predict_semantic(sem.model, val_recs, args.device, scale=sem_cfg.scale)
        ]
        miou = semantic_miou(zip(preds, gts, strict=True), len(classes) + 1)["miou"]
        t1 = time.time()
        ins_cfg = InstanceTrainConfig(supervision=sup, epochs=args.ins_epochs, device=args.device)
        ins = train_instance(
            train_recs, classes, args.out / f"instance_{sup}", ins_cfg, pseudo_json, progress=False
        )
        dets = predict_instances(ins.model, val_recs, args.device)
        ap = voc_instance_metrics(val_recs, dets, len(classes) + 1)
        t2 = time.time()
        rows[sup] = {"sem_miou": miou, "ins_ap50": ap["ap50"], "ins_abo": ap["abo"]}
        print(
            f"{sup:5s} semantic mIoU {miou:.4f} ({t1 - t0:.0f}s)  "
            f"instance AP50 {ap['ap50']:.4f} ABO {ap['abo']:.4f} ({t2 - t1:.0f}s)",
            flush=True,
        )

    def get(sup: str, key: str) -> float | None:
        return rows.get(sup, {}).get(key)

    result = {
        "sem_miou_full": get("full", "sem_miou"),
        "sem_miou_bbam": get("bbam", "sem_miou"),
        "sem_miou_box": get("box", "sem_miou"),
        "sem_ratio": _ratio(get("bbam", "sem_miou"), get("full", "sem_miou")),
        "ins_ap50_full": get("full", "ins_ap50"),
        "ins_ap50_bbam": get("bbam", "ins_ap50"),
        "ins_ap50_box": get("box", "ins_ap50"),
        "ins_ap50_ratio": _ratio(get("bbam", "ins_ap50"), get("full", "ins_ap50")),
    }
    print(f"\n{'metric':16s} {'full':>8s} {'bbam':>8s} {'box':>8s} {'bbam/full':>10s}")
    for key, label in (("sem_miou", "semantic mIoU"), ("ins_ap50", "instance AP50")):
        vals = [get(s, key) for s in SUPERVISIONS]
        cells = " ".join(f"{v:8.4f}" if v is not None else f"{'-':>8s}" for v in vals)
        ratio = _ratio(vals[1], vals[0])
        print(f"{label:16s} {cells} {ratio if ratio is None else f'{ratio:10.3f}'}")
    write_metrics(args.out / "metrics.json", {"segmenters": result, "rows": rows})
    if not args.no_write:
        merge_results("segmenters", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
