"""Prefect tasks: score each trained segmenter on val, pseudo labels on train, write the report."""

from __future__ import annotations

import numpy as np
from PIL import Image
from prefect import task

from bbam.data.coco import coco_image_ids, decode_segmentation, load_coco_json, read_coco
from bbam.data.images import load_rgb
from bbam.data.palette import label_png
from bbam.data.records import DataError, ImageRecord
from bbam.evaluate import (
    PerImage,
    coco_metrics_from_records,
    pseudo_label_quality,
    records_with_gt_masks,
    semantic_miou,
    voc_instance_metrics,
)
from bbam.segmenters.instance import load_instance_model, predict_instances
from bbam.segmenters.semantic import load_semantic_model, predict_semantic
from bbam.segmenters.targets import render_label_map
from tasks.caching import stage_cache
from tasks.params import PSEUDO_DIR, REPORTS_DIR, load_split, split_paths
from tasks.segmenters import segmenter_config, segmenter_dir


def masked_val_records(params: dict, records: list[ImageRecord]) -> tuple[list[ImageRecord], int]:
    """The val images that mask metrics can score, and how many were left out (box-only)."""
    kept, left_out = records_with_gt_masks(records)
    if not kept:
        raise DataError(
            f"{split_paths(params, 'val')[0]}: no val image has a GT mask for every instance; "
            "mask metrics need them (boxes alone can be labelled, not evaluated)"
        )
    return kept, len(left_out)


def _val_and_model(params: dict, kind: str, supervision: str, load_fn):
    """(val dataset, its records with GT masks, how many were left out, config, trained model)
    for the `kind` ("instance" | "semantic") segmenter trained under `supervision`."""
    val = load_split(params, "val")
    records, left_out = masked_val_records(params, val.records)
    config = segmenter_config(params, kind, supervision)
    model_path = segmenter_dir(kind, supervision) / "model.pt"
    return val, records, left_out, config, load_fn(model_path, config, len(val.classes) + 1)


@task(name="evaluate-instance-segmenter", **stage_cache("evaluate", REPORTS_DIR))
def evaluate_instance(params: dict, supervision: str) -> dict:
    val, records, left_out, config, model = _val_and_model(
        params, "instance", supervision, load_instance_model
    )
    predictions = predict_instances(model, records, device=config.device)
    voc = voc_instance_metrics(records, predictions, len(val.classes) + 1)
    coco = coco_metrics_from_records(records, val.classes, predictions)
    return {"voc": voc, "coco": coco, "images": len(records), "images_without_gt_mask": left_out}


@task(name="evaluate-semantic-segmenter", **stage_cache("evaluate", REPORTS_DIR))
def evaluate_semantic(params: dict, supervision: str) -> dict:
    val, records, left_out, config, model = _val_and_model(
        params, "semantic", supervision, load_semantic_model
    )
    pairs = (
        (prediction, render_label_map(record))
        for record, prediction in predict_semantic(
            model, records, device=config.device, scale=config.scale
        )
    )
    metrics = semantic_miou(pairs, len(val.classes) + 1)
    return metrics | {"images": len(records), "images_without_gt_mask": left_out}


def _pseudo_split(params: dict):
    """The pseudo GT read back as a dataset: its masks are the pseudo foregrounds. It lists
    every image of the split but those the pseudo-label stage failed on (their instances
    score 0 in the quality table); those prepare_data found unreadable are dropped as in
    load_split."""
    from bbam.data.verify import drop_unreadable

    split = params["attribution"]["split"]
    _, image_root = split_paths(params, split)
    return drop_unreadable(read_coco(PSEUDO_DIR / f"instances_{split}.json", image_root))


@task(name="pseudo-label-quality", **stage_cache("evaluate", REPORTS_DIR))
def evaluate_pseudo_labels(params: dict) -> dict:
    """Pseudo GT vs GT on the split that was labelled (where GT masks exist)."""
    train = load_split(params, params["attribution"]["split"])
    if not any(i.has_mask for r in train.records for i in r.instances):
        return {}
    pseudo = {r.image_id: r for r in _pseudo_split(params).records}
    instances = PerImage(
        {
            key: lambda r=r: [(i.label, i.box, i.mask) for i in r.instances]
            for key, r in pseudo.items()
        }
    )
    pngs = {r.image_id: label_png(PSEUDO_DIR / "semantic", r.image_id) for r in train.records}
    semantic = PerImage(
        {key: lambda p=p: np.asarray(Image.open(p)) for key, p in pngs.items() if p.is_file()}
    )
    return pseudo_label_quality(train.records, instances, len(train.classes) + 1, semantic)


def report_samples(params: dict, count: int) -> list[dict]:
    """Labelled images with their pseudo foreground and ignore band (report overlays)."""
    split = params["attribution"]["split"]
    pseudo = _pseudo_split(params)
    raw = load_coco_json(PSEUDO_DIR / f"instances_{split}.json")
    ignores: dict[int, list[dict]] = {}
    for ann in raw["annotations"]:
        ignores.setdefault(int(ann["image_id"]), []).append(ann.get("ignore"))
    ids = coco_image_ids(PSEUDO_DIR / f"instances_{split}.json")
    samples = []
    for record in pseudo.records[:count]:
        shape = (record.height, record.width)
        fg, ignore = np.zeros(shape, bool), np.zeros(shape, bool)
        for instance in record.instances:
            fg |= instance.mask
        for rle in ignores.get(ids[record.image_id], []):
            if rle:
                ignore |= decode_segmentation(rle, *shape, where=record.image_id)
        samples.append(
            {
                "name": record.image_id,
                "image": load_rgb(record.path),
                "pseudo_fg": fg,
                "pseudo_ignore": ignore & ~fg,
            }
        )
    return samples
