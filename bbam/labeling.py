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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bbam.attribution import map_to_image
from bbam.baselines import box_mask, grabcut_mask, mask_iou
from bbam.data.images import load_rgb
from bbam.data.palette import label_png
from bbam.data.records import Dataset, ImageRecord
from bbam.evaluate import confusion_matrix, miou_from_confusion
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
from bbam.segmenters.targets import render_label_map

# The pseudo-label methods scored side by side when ``baselines`` is on, and the row column
# holding each one's instance IoU with the GT mask.
BASELINE_COLUMNS = {"bbam": "iou_gt", "box": "iou_gt_box", "grabcut": "iou_gt_grabcut"}


@dataclass
class SemanticScores:
    """Semantic confusion (rows GT, columns predicted) of each method's foreground label map
    (no ignore band) summed over the images whose every instance has a GT mask."""

    images: int = 0
    confusion: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, other: SemanticScores) -> None:
        self.images += other.images
        for method, conf in other.confusion.items():
            self.confusion[method] = self.confusion.get(method, 0) + conf


@dataclass
class LabelledImage:
    annotations: list[dict]
    rows: list[dict]
    semantic_path: Path | None
    error: str = ""
    scores: SemanticScores = field(default_factory=SemanticScores)


class LabelledDataset(NamedTuple):
    """What `label_dataset` returns; ``scores`` is empty unless ``baselines`` is on."""

    annotations: list[dict]
    rows: list[dict]
    errors: list[dict]
    scores: SemanticScores


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
    num_classes: int = 0  # with background; the baselines' semantic confusion is CxC


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
    refined = refine_record(crowd_free, image, maps, settings.refine, settings.mcg, settings.source)
    masks = refined.instance
    annotations, out_rows = build_instance_annotations(
        coco_id, instances, masks, category_ids=settings.category_ids or None
    )
    foregrounds: dict[str, list] = {method: [] for method in BASELINE_COLUMNS}
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
                found = {
                    "bbam": mask.fg,
                    "box": box_mask(instance.box, h, w),
                    "grabcut": grabcut_mask(image, instance.box),
                }
                for method, fg in found.items():
                    out_row[BASELINE_COLUMNS[method]] = mask_iou(gt, fg)
                    foregrounds[method].append((instance.label, instance.box, fg))
    scores = SemanticScores()
    if settings.baselines and all(i.has_mask for i in instances):
        scores = _semantic_scores(record, foregrounds, settings.num_classes)
    label = semantic_label(
        record.height,
        record.width,
        [
            (i.label, i.box, m.fg, m.ignore)
            for i, m in zip(instances, refined.semantic, strict=True)
        ],
    )
    mark_crowd_ignore(label, record.instances)
    semantic_path = semantic_png(settings, record.image_id)
    write_semantic_png(semantic_path, label)
    return LabelledImage(annotations, out_rows, semantic_path, scores=scores)


def semantic_png(settings: LabelSettings, image_id: str) -> Path:
    """Where an image's semantic pseudo label goes (``<semantic_dir>/<image_id>.png``)."""
    return label_png(settings.semantic_dir, image_id)


def _semantic_scores(
    record: ImageRecord, foregrounds: dict[str, list], num_classes: int
) -> SemanticScores:
    """Each method's foregrounds drawn alike as a label map (``semantic_label``, no ignore
    band) and scored against the GT label map: BBAM beside the box-only baselines."""
    gt = render_label_map(record, "mask")
    confusion = {}
    for method, found in foregrounds.items():
        pred = semantic_label(
            record.height, record.width, [(c, b, fg, np.zeros_like(fg)) for c, b, fg in found]
        )
        confusion[method] = confusion_matrix(pred, gt, num_classes)
    return SemanticScores(1, confusion)


def baseline_quality(rows: list[dict], scores: SemanticScores) -> dict[str, Any]:
    """BBAM's pseudo masks beside the filled box and GrabCut, in percent, as the pseudo-label
    stage scored them: mean instance IoU over every instance with a GT mask, semantic mIoU
    over the ``images`` whose every instance has one. What the evaluate report shows."""

    def pct(value: float | None) -> float | None:
        return None if value is None or value != value else round(100.0 * float(value), 2)

    methods = {}
    for method, column in BASELINE_COLUMNS.items():
        ious = [r[column] for r in rows if r.get(column) is not None]
        conf = scores.confusion.get(method)
        methods[method] = {
            "pseudo_mean_instance_iou": pct(float(np.mean(ious))) if ious else None,
            "pseudo_sem_miou": pct(miou_from_confusion(conf)["miou"]) if conf is not None else None,
        }
    instances = sum(r.get(BASELINE_COLUMNS["box"]) is not None for r in rows)
    return {"images": scores.images, "instances": instances, "methods": methods}


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
) -> LabelledDataset:
    """(annotations, per-instance rows, per-image errors, baseline scores) over all images
    of ``dataset``.

    An image that cannot be read is recorded as an error and its instances get no
    annotation; the caller decides whether that fails the stage.

    ``workers`` > 1 refines groups of ``images_per_task`` images in that many processes (the
    DenseCRF and proposals are CPU-bound, one image at a time, as the reference's 80 joblib
    processes were). Results are gathered in dataset order, so the output does not depend on
    the number of workers. ``baselines`` adds each instance's filled-box and GrabCut IoU
    with its GT mask (``iou_gt_box``, ``iou_gt_grabcut``) beside BBAM's (``iou_gt``), and
    the three methods' semantic confusion on fully masked images (``scores``; see
    `baseline_quality`).
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
        len(dataset.classes) + 1,
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
    annotations, rows, errors, scores = [], [], [], SemanticScores()
    for task_annotations, task_rows, task_errors, task_scores in results:
        annotations += task_annotations
        rows += task_rows
        errors += task_errors
        scores.add(task_scores)
    return LabelledDataset(annotations, rows, errors, scores)


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # the worker processes are the parallelism


def _label_records(
    records: list[ImageRecord],
    coco_ids: dict[str, int],
    rows_by_image: dict[str, dict[int, dict]],
    settings: LabelSettings,
) -> tuple[list[dict], list[dict], list[dict], SemanticScores]:
    """One group of images, in order (runs in a worker process when there are several)."""
    annotations, rows, errors, scores = [], [], [], SemanticScores()
    cache: dict = {}
    for record in records:
        try:
            labelled = label_image(
                record, coco_ids[record.image_id], rows_by_image[record.image_id], settings, cache
            )
        except Exception as exc:  # recorded; the stage reports and may fail on it
            errors.append({"image_id": record.image_id, "error": f"{type(exc).__name__}: {exc}"})
            # An earlier run's PNG of this image (a folder not cleared, as DVC would) must
            # not stand in for the labels this run could not make: the semantic segmenter
            # skips an image without one, but would train on a stale one.
            semantic_png(settings, record.image_id).unlink(missing_ok=True)
        else:
            annotations += labelled.annotations
            rows += labelled.rows
            scores.add(labelled.scores)
        if len(cache) > 8:
            cache.clear()
    return annotations, rows, errors, scores
