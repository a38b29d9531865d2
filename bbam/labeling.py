"""From an attribution shard to pseudo labels: maps -> refined masks -> COCO + PNGs.

Every instance of the split gets an annotation. Instances without a usable map
(no positive proposal, or attribution failed) go through the empty-map fallback
of ``bbam.refine`` (a box prior + CRF) and are marked with their attribution
status, never dropped: dropping would misalign boxes and masks downstream.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bbam.attribution import map_to_image
from bbam.baselines import box_mask, grabcut_mask, mask_iou
from bbam.data.images import load_rgb
from bbam.data.records import Dataset, ImageRecord
from bbam.manifest import load_grid
from bbam.mcg import MCGConfig, ProposalSource
from bbam.pseudo_labels import (
    build_instance_annotations,
    mark_crowd_ignore,
    refine_record,
    semantic_label,
    write_semantic_png,
)
from bbam.refine import RefineConfig


@dataclass
class LabelledImage:
    annotations: list[dict]
    rows: list[dict]
    semantic_path: Path | None
    error: str = ""


def instance_map(row: dict, shard_dir: Path, cache: dict, align_corners: bool) -> np.ndarray | None:
    """The instance's attribution map at original resolution, or None without one."""
    if row is None or row["status"] != "ok":
        return None
    grid = load_grid(shard_dir, row, cache).astype(np.float32)
    valid = None
    if row.get("valid_h"):
        valid = (int(row["valid_h"]), int(row["valid_w"]))
    return map_to_image(
        grid,
        (int(row["resized_h"]), int(row["resized_w"])),
        (int(row["image_h"]), int(row["image_w"])),
        align_corners=align_corners,
        valid_hw=valid,
    )


@dataclass(frozen=True)
class LabelSettings:
    """What every image of a split is labelled with (sent once per task to a worker)."""

    shard_dirs: dict[int, Path]
    semantic_dir: Path
    refine: RefineConfig
    mcg: MCGConfig | None
    source: ProposalSource | None
    category_ids: list[int]
    align_corners: bool = True
    # Score the box-only baselines (filled box, GrabCut) on every instance with a GT mask, so a
    # run shows BBAM beside what boxes alone give (GrabCut costs about one CRF per instance).
    baselines: bool = False


def label_image(
    record: ImageRecord,
    coco_id: int,
    rows: dict[int, dict],
    settings: LabelSettings,
    cache: dict | None = None,
) -> LabelledImage:
    """Pseudo labels of one image. ``rows``: instance_id -> its attribution manifest row."""
    cache = {} if cache is None else cache
    instances = [i for i in record.instances if not i.iscrowd]
    maps = {}
    for instance in instances:
        row = rows.get(instance.instance_id)
        shard_dir = settings.shard_dirs.get(row["shard"]) if row is not None else None
        maps[instance.instance_id] = (
            instance_map(row, shard_dir, cache, settings.align_corners) if shard_dir else None
        )
    image = load_rgb(record.path)
    crowd_free = ImageRecord(record.image_id, record.path, record.width, record.height, instances)
    masks = refine_record(crowd_free, image, maps, settings.refine, settings.mcg, settings.source)
    annotations, out_rows = build_instance_annotations(
        coco_id, instances, masks, category_ids=settings.category_ids or None
    )
    for instance, mask, annotation, out_row in zip(
        instances, masks, annotations, out_rows, strict=True
    ):
        row = rows.get(instance.instance_id)
        status = row["status"] if row is not None else "missing"
        annotation["bbam"]["attribution_status"] = status
        out_row.update(image_name=record.image_id, attribution_status=status)
        if settings.baselines:  # the same columns in every row (Parquet takes one schema)
            out_row.update(iou_gt_box=None, iou_gt_grabcut=None)
        if instance.has_mask:
            gt = instance.mask
            out_row["iou_gt"] = mask_iou(gt, mask.fg)
            if settings.baselines:
                h, w = image.shape[:2]
                out_row["iou_gt_box"] = mask_iou(gt, box_mask(instance.box, h, w))
                out_row["iou_gt_grabcut"] = mask_iou(gt, grabcut_mask(image, instance.box))
    label = semantic_label(
        record.height,
        record.width,
        [(i.label, i.box, m.fg, m.ignore) for i, m in zip(instances, masks, strict=True)],
    )
    mark_crowd_ignore(label, record.instances)
    semantic_path = settings.semantic_dir / f"{record.image_id}.png"
    write_semantic_png(semantic_path, label)
    return LabelledImage(annotations, out_rows, semantic_path)


def label_dataset(
    dataset: Dataset,
    coco_ids: dict[str, int],
    manifest_rows: list[dict],
    shard_dirs: dict[int, Path],
    semantic_dir: Path,
    refine_cfg: RefineConfig,
    mcg_cfg: MCGConfig | None,
    source: ProposalSource | None,
    align_corners: bool = True,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    images_per_task: int = 16,
    baselines: bool = False,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(annotations, per-instance rows, per-image errors) over all images of ``dataset``.

    An image that cannot be read is recorded as an error and its instances get no
    annotation; the caller decides whether that fails the stage.

    ``workers`` > 1 refines groups of ``images_per_task`` images in that many processes (the
    DenseCRF and proposals are CPU-bound, one image at a time, as the reference's 80 joblib
    processes were). Results are gathered in dataset order, so the output does not depend on
    the number of workers. ``baselines`` adds each instance's filled-box and GrabCut IoU
    with its GT mask (``iou_gt_box``, ``iou_gt_grabcut``) beside BBAM's (``iou_gt``).
    """
    by_image: dict[str, dict[int, dict]] = {}
    for row in manifest_rows:
        by_image.setdefault(row["image_id"], {})[int(row["instance_id"])] = row
    settings = LabelSettings(
        shard_dirs,
        semantic_dir,
        refine_cfg,
        mcg_cfg,
        source,
        dataset.category_ids,
        align_corners,
        baselines,
    )
    tasks = []
    for start in range(0, len(dataset.records), max(1, images_per_task)):
        records = dataset.records[start : start + max(1, images_per_task)]
        tasks.append(
            (
                records,
                {r.image_id: coco_ids[r.image_id] for r in records},
                {r.image_id: by_image.get(r.image_id, {}) for r in records},
                settings,
            )
        )
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(_label_records(*task))
            if progress is not None:
                progress(len(task[0]))
    else:
        results = [None] * len(tasks)
        # spawn, not fork: the parent has torch's thread pools running
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            min(workers, len(tasks)), mp_context=context, initializer=_one_torch_thread
        ) as pool:
            futures = {pool.submit(_label_records, *task): n for n, task in enumerate(tasks)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(len(tasks[futures[future]][0]))
    annotations, rows, errors = [], [], []
    for task_annotations, task_rows, task_errors in results:
        annotations += task_annotations
        rows += task_rows
        errors += task_errors
    return annotations, rows, errors


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # the worker processes are the parallelism


def _label_records(
    records: list[ImageRecord],
    coco_ids: dict[str, int],
    rows_by_image: dict[str, dict[int, dict]],
    settings: LabelSettings,
) -> tuple[list[dict], list[dict], list[dict]]:
    """One group of images, in order (runs in a worker process when there are several)."""
    annotations, rows, errors = [], [], []
    cache: dict = {}
    for record in records:
        try:
            labelled = label_image(
                record, coco_ids[record.image_id], rows_by_image[record.image_id], settings, cache
            )
        except Exception as exc:  # recorded; the stage reports and may fail on it
            errors.append({"image_id": record.image_id, "error": f"{type(exc).__name__}: {exc}"})
        else:
            annotations += labelled.annotations
            rows += labelled.rows
        if len(cache) > 8:
            cache.clear()
    return annotations, rows, errors
