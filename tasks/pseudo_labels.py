"""Prefect tasks of the pseudo-label stage."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from tqdm import tqdm

from bbam.atomic import atomic_write, atomic_write_json
from bbam.data.coco import coco_image_ids, load_coco_json
from bbam.data.palette import check_class_labels
from bbam.labeling import baseline_quality, label_dataset
from bbam.mcg import make_source
from bbam.pseudo_labels import proposal_skip_counts, write_coco_pseudo_gt
from tasks.attribution_config import engine_config, shard_dir
from tasks.caching import stage_cache
from tasks.params import BASELINES_NAME, PSEUDO_DIR, load_split, split_paths
from tasks.pseudo_label_config import proposal_config, refine_config


def pseudo_label_workers(params: dict) -> int:
    """`pseudo_labels.workers` processes (0 = one per CPU core)."""
    workers = int(params.get("pseudo_labels", {}).get("workers", 1))
    return workers if workers > 0 else os.cpu_count() or 1


@task(
    name="make-pseudo-labels",
    retries=1,
    retry_delay_seconds=5,
    **stage_cache("pseudo_labels", PSEUDO_DIR),
)
def make_pseudo_labels(params: dict, attribution_dir: str, out_dir: str) -> dict:
    """Refine every instance's map, write COCO pseudo GT, semantic PNGs and a manifest."""
    split = params["attribution"]["split"]
    dataset = load_split(params, split)
    annotation_json, _ = split_paths(params, split)
    # the semantic PNGs are uint8 class maps: fail here, not once per image
    check_class_labels(range(1, len(dataset.classes) + 1), f"{annotation_json} (semantic PNGs)")
    manifest = pq.read_table(Path(attribution_dir) / "manifest.parquet").to_pylist()
    shard_dirs = {
        s: shard_dir(attribution_dir, s) for s in range(int(params["attribution"]["num_shards"]))
    }
    refine_cfg = refine_config(params)
    mcg_cfg, mcg_dir = proposal_config(params)
    source = make_source(mcg_cfg, mcg_dir) if mcg_cfg.enabled else None
    align = engine_config(params).align_corners  # maps are upsampled as they were optimised
    out = Path(out_dir)
    baselines = bool(params.get("pseudo_labels", {}).get("baselines", True))
    image_ids = coco_image_ids(annotation_json)
    with tqdm(total=len(dataset.records), desc="pseudo labels", unit="img") as bar:
        annotations, rows, errors, scores = label_dataset(
            dataset,
            image_ids,
            manifest,
            shard_dirs,
            out / "semantic",
            refine_cfg,
            mcg_cfg if mcg_cfg.enabled else None,
            source,
            align_corners=align,
            progress=bar.update,
            workers=pseudo_label_workers(params),
            baselines=baselines,
        )
    source_json = load_coco_json(annotation_json)
    # An image that failed has no labels, not "no objects": listed, it would train as background.
    failed = {image_ids.get(e["image_id"]) for e in errors}
    write_coco_pseudo_gt(
        out / f"instances_{split}.json",
        [image for image in source_json["images"] if int(image["id"]) not in failed],
        source_json["categories"],
        annotations,
    )
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    atomic_write(out / "manifest.parquet", lambda f: pq.write_table(table, f))
    # What the evaluate report shows beside BBAM, scored here once, where the masks are.
    quality = baseline_quality(rows, scores) if baselines else None
    if quality is not None:
        atomic_write_json(out / BASELINES_NAME, quality)
    else:
        (out / BASELINES_NAME).unlink(missing_ok=True)

    def mean_pct(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(100 * float(np.mean(values)), 2) if values else None

    fallbacks = Counter(r["fallback"] for r in rows)
    # what each instance's map came from: ok, no_positive, failed, missing (no current row)
    statuses = Counter(r["attribution_status"] for r in rows)
    return {
        "images": len(dataset.records),
        "instances": len(rows),
        # not labelled (skipped rows of the attribution manifest): regions, not objects
        "crowd_regions": sum(i.iscrowd for r in dataset.records for i in r.instances),
        "image_errors": errors,
        "mean_instance_iou_vs_gt": mean_pct("iou_gt"),
        # the box-only baselines on the same instances (pseudo_labels.baselines)
        "mean_instance_iou_grabcut": mean_pct("iou_gt_grabcut"),
        "mean_instance_iou_box": mean_pct("iou_gt_box"),
        "baselines": quality,
        "empty_fg": sum(bool(r["empty_fg"]) for r in rows),
        "fallbacks": dict(fallbacks),
        "attribution_status": dict(statuses),
        "mcg_used": sum(bool(r["mcg_used"]) for r in rows),
        "mcg_skipped": proposal_skip_counts(rows),
    }
