"""The paper's metrics: semantic mIoU, VOC-style instance AP@{.25,.5,.7,.75} + ABO, COCO mask AP.

Masks are HxW bool arrays; predictions are dicts with `image_id`, `category_id` (= label),
`score` and `segmentation` (COCO RLE) or `mask` (bool array).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bbam.atomic import atomic_write_text
from bbam.data.coco import cocoeval_stats
from bbam.data.masks import box_iou, mask_to_rle
from bbam.data.palette import IGNORE_LABEL
from bbam.data.records import ImageRecord
from bbam.pseudo_labels import crowd_region

VOC_IOU_THRESHOLDS = (0.25, 0.5, 0.7, 0.75)


# ----------------------------------------------------------------------------- semantic


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_LABEL
) -> np.ndarray:
    """(C, C) int64 counts, rows = GT class, cols = predicted class; GT ignore pixels skipped.

    Predicted values outside [0, C) (e.g. 255 in pseudo labels) count as background.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    p[(p < 0) | (p >= num_classes)] = 0
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        raise ValueError(f"ground truth holds labels outside 0..{num_classes - 1} (and 255)")
    return np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def miou_from_confusion(conf: np.ndarray) -> dict[str, Any]:
    """VOC protocol: IoU_c = TP/(TP+FP+FN) per class incl. background; mean over classes seen."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "iou": [None if math.isnan(v) else float(v) for v in iou],
        "pixel_acc": float(tp.sum() / conf.sum()) if conf.sum() else float("nan"),
    }


def semantic_miou(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> dict[str, Any]:
    """mIoU over (prediction, GT) label-map pairs, accumulated in one confusion matrix."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in pairs:
        conf += confusion_matrix(pred, gt, num_classes)
    return miou_from_confusion(conf)


# ----------------------------------------------------------------------------- instance (VOC)


def _mask_of(pred: dict[str, Any]) -> np.ndarray:
    if "mask" in pred:
        return np.asarray(pred["mask"], dtype=bool)
    seg = dict(pred["segmentation"])
    if isinstance(seg["counts"], str):
        seg["counts"] = seg["counts"].encode("ascii")
    return mask_utils.decode(seg).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,H,W) x (m,H,W) bool -> (n,m) IoU."""
    a = a.reshape(len(a), int(np.prod(a.shape[1:]))).astype(np.float32)
    b = b.reshape(len(b), int(np.prod(b.shape[1:]))).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def mask_cover(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,H,W) x (m,H,W) bool -> (n,m) share of each `a` inside each `b`: pycocotools' IoU
    with a crowd region `b` (the union is the detection alone)."""
    a = a.reshape(len(a), int(np.prod(a.shape[1:]))).astype(np.float32)
    b = b.reshape(len(b), int(np.prod(b.shape[1:]))).astype(np.float32)
    area = a.sum(1)[:, None]
    return np.where(area > 0, (a @ b.T) / np.maximum(area, 1e-9), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+ all-point interpolated AP (area under the monotone precision envelope)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def records_with_gt_masks(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[str]]:
    """(records whose every non-crowd instance has a GT mask, image ids of the others).

    Boxes alone are legal input (they are what BBAM starts from), but mask metrics need a
    GT mask for every object of an image: an unmasked object would count its predictions as
    false positives. Such images are left out of mask evaluation and reported."""
    kept, left_out = [], []
    for r in records:
        if all(i.has_mask for i in r.instances if not i.iscrowd):
            kept.append(r)
        else:
            left_out.append(r.image_id)
    return kept, left_out


def _gt_masks(record: ImageRecord, instances: list) -> np.ndarray:
    for i in instances:
        if not i.has_mask:
            raise ValueError(f"{record.path}: instance {i.instance_id} has no GT mask to evaluate")
    if not instances:
        return np.zeros((0, record.height, record.width), dtype=bool)
    return np.stack([i.mask for i in instances]).astype(bool)


def voc_instance_metrics(
    records: list[ImageRecord],
    predictions: list[dict[str, Any]],
    num_classes: int,
    iou_thresholds: tuple[float, ...] = VOC_IOU_THRESHOLDS,
) -> dict[str, Any]:
    """Mask AP at each IoU threshold (VOC protocol) and ABO, as in the paper's Table 1.

    Per class: predictions sorted by score, each matched greedily to the unmatched-or-not GT of
    highest IoU in its image (a GT already taken makes it a false positive; difficult GTs are
    neither), AP by all-point interpolation, mean over classes with GT. A prediction that
    would be a false positive but lies on a crowd region of its class (COCO `iscrowd`, share
    inside >= the threshold) is neither, as COCOeval ignores it. ABO: for each GT
    instance, the best IoU among all predictions of its image, averaged over instances.
    Masks are decoded one image at a time (a whole COCO val split would not fit in memory).
    """
    preds_by_image: dict[str, list[tuple[int, float, dict[str, Any]]]] = {
        r.image_id: [] for r in records
    }
    for p in predictions:
        key = str(p["image_id"])
        if key not in preds_by_image:
            raise ValueError(f"prediction for unknown image_id {key!r}")
        preds_by_image[key].append((int(p["category_id"]), float(p["score"]), p))
    gts: dict[str, dict[str, np.ndarray]] = {}
    ious: dict[str, np.ndarray] = {}
    crowd_covers: dict[str, np.ndarray] = {}  # prediction x crowd region of its image
    best_overlaps: list[float] = []
    for r in records:
        key, insts = r.image_id, [i for i in r.instances if not i.iscrowd]
        g = gts[key] = {
            "labels": np.array([i.label for i in insts], dtype=np.int64),
            "difficult": np.array([bool(i.difficult) for i in insts], dtype=bool),
            "crowd_labels": np.array([i.label for i in r.instances if i.iscrowd], dtype=np.int64),
        }
        gt_masks = _gt_masks(r, insts)
        plist = preds_by_image[key]
        pm = (
            np.stack([_mask_of(p) for _, _, p in plist])
            if plist
            else np.zeros((0,) + gt_masks.shape[1:], dtype=bool)
        )
        ious[key] = mask_iou(pm, gt_masks)
        crowds = [crowd_region(i, r.height, r.width) for i in r.instances if i.iscrowd]
        if crowds and plist:
            crowd_covers[key] = mask_cover(pm, np.stack(crowds))
        for j in range(len(g["labels"])):
            best_overlaps.append(float(ious[key][:, j].max()) if len(plist) else 0.0)
    out: dict[str, Any] = {"abo": float(np.mean(best_overlaps)) if best_overlaps else float("nan")}
    curves: dict[str, Any] = {}
    for t in iou_thresholds:
        aps: dict[int, float] = {}
        for c in range(1, num_classes):
            npos = sum(int(((g["labels"] == c) & ~g["difficult"]).sum()) for g in gts.values())
            cand = [
                (score, key, k)
                for key, plist in preds_by_image.items()
                for k, (label, score, _) in enumerate(plist)
                if label == c
            ]
            if npos == 0:
                continue
            cand.sort(key=lambda x: -x[0])
            taken = {key: np.zeros(len(g["labels"]), dtype=bool) for key, g in gts.items()}
            tp, fp, scores = [], [], []
            for score, key, k in cand:
                g = gts[key]
                cls = np.where(g["labels"] == c)[0]
                best, j = -1.0, -1
                if len(cls):
                    row = ious[key][k, cls]
                    j = int(cls[np.argmax(row)])
                    best = float(row.max())
                if best >= t and g["difficult"][j]:
                    continue
                if best >= t and not taken[key][j]:
                    taken[key][j] = True
                    tp.append(1)
                    fp.append(0)
                elif (
                    key in crowd_covers
                    and (crowd_covers[key][k, g["crowd_labels"] == c] >= t).any()
                ):
                    continue
                else:
                    tp.append(0)
                    fp.append(1)
                scores.append(score)
            ctp, cfp = np.cumsum(tp), np.cumsum(fp)
            recall = ctp / npos if len(tp) else np.zeros(0)
            precision = ctp / np.maximum(ctp + cfp, 1e-12) if len(tp) else np.zeros(0)
            aps[c] = voc_ap(recall, precision)
            if t == 0.5:
                curves[str(c)] = {
                    "score": [float(s) for s in scores],
                    "precision": precision.tolist(),
                    "recall": recall.tolist(),
                }
        name = f"ap{int(round(t * 100))}"
        out[name] = float(np.mean(list(aps.values()))) if aps else float("nan")
        out[f"{name}_per_class"] = {str(c): v for c, v in aps.items()}
    out["pr_curves_ap50"] = curves
    return out


# ----------------------------------------------------------------------------- COCO


def records_to_coco(
    records: list[ImageRecord], classes: list[str]
) -> tuple[dict[str, Any], dict[str, int]]:
    """GT COCO dict from records (RLE masks) and the image_id -> COCO int id mapping.

    `area` is the instance's own (`Instance.area`: COCO files store the polygon's area, and
    COCOeval puts GT in the APs/APm/APl ranges by it), else the mask's pixel count."""
    images, anns, ids = [], [], {}
    for n, r in enumerate(records, start=1):
        ids[r.image_id] = n
        images.append({"id": n, "file_name": r.path.name, "height": r.height, "width": r.width})
        for inst in r.instances:
            if inst.iscrowd:
                mask = crowd_region(inst, r.height, r.width)
            elif not inst.has_mask:
                raise ValueError(f"{r.path}: instance {inst.instance_id} has no GT mask")
            else:
                mask = inst.mask
            x1, y1, x2, y2 = (float(v) for v in inst.box)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": n,
                    "category_id": int(inst.label),
                    "segmentation": mask_to_rle(mask),
                    "area": float(mask.sum() if inst.area is None else inst.area),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": int(inst.iscrowd),
                }
            )
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}, ids


COCO_STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def coco_segm_metrics(gt: dict[str, Any] | COCO, results: list[dict[str, Any]]) -> dict[str, Any]:
    """COCOeval(iouType='segm') stats 0-5; a -1 (no GT in that area range) becomes None.

    A result's `bbox` is dropped: pycocotools' loadRes would take its box area as the
    detection's area, so APs/APm/APl would size detections by box instead of mask."""
    if isinstance(gt, COCO):
        coco_gt = gt
    else:
        coco_gt = COCO()
        coco_gt.dataset = gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    stats = cocoeval_stats(coco_gt, results, "segm")
    return {k: (None if v < 0 else float(v)) for k, v in zip(COCO_STAT_NAMES, stats, strict=True)}


def coco_metrics_from_records(
    records: list[ImageRecord], classes: list[str], predictions: list[dict[str, Any]]
) -> dict[str, Any]:
    """COCO mask AP of predictions keyed by record.image_id (mapped to COCO int ids here)."""
    gt, ids = records_to_coco(records, classes)
    results = []
    for p in predictions:
        q = dict(p)
        if str(p["image_id"]) not in ids:
            raise ValueError(f"prediction for unknown image_id {p['image_id']!r}")
        q["image_id"] = ids[str(p["image_id"])]
        if "segmentation" not in q:
            q["segmentation"] = mask_to_rle(np.asarray(q.pop("mask"), dtype=np.uint8))
        results.append(q)
    return coco_segm_metrics(gt, results)


# ----------------------------------------------------------------------------- pseudo labels


class PerImage(Mapping):
    """image_id -> value loaded when asked for: a split's masks never sit in memory at once."""

    def __init__(self, loaders: dict[str, Callable[[], Any]]) -> None:
        self._loaders = loaders

    def __getitem__(self, key: str) -> Any:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def pseudo_label_quality(
    records: list[ImageRecord],
    pseudo_instances: Mapping[str, list[tuple[int, np.ndarray, np.ndarray]]],
    num_classes: int,
    pseudo_semantic: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Pseudo GT vs GT. `pseudo_instances[image_id]` = [(label, box xyxy, fg mask)].

    Each GT instance is paired with the same-label pseudo instance whose box overlaps its box
    most (pseudo boxes are the input GT boxes); unpaired GT instances score IoU 0.
    Semantic pseudo labels: 255 counts as background (see `confusion_matrix`). Both mappings
    are read one image at a time, so they may load on access.
    """
    ious: list[float] = []
    for r in records:
        cand = pseudo_instances.get(r.image_id, [])
        for inst in r.instances:
            if inst.iscrowd or not inst.has_mask:
                continue
            best, mask = 0.0, None
            for label, box, fg in cand:
                if label != inst.label:
                    continue
                overlap = box_iou(np.asarray(box, float), np.asarray(inst.box, float))
                if overlap > best:
                    best, mask = overlap, fg
            ious.append(
                float(mask_iou(mask[None], inst.mask[None])[0, 0]) if mask is not None else 0.0
            )
    out: dict[str, Any] = {
        "pseudo_mean_instance_iou": float(np.mean(ious)) if ious else float("nan"),
        "pseudo_instances": len(ious),
    }
    if pseudo_semantic is not None:
        from bbam.segmenters.targets import render_label_map

        labelled = [r for r in records if r.image_id in pseudo_semantic]
        scored, left_out = records_with_gt_masks(labelled)  # no GT label map without them
        pairs = ((pseudo_semantic[r.image_id], render_label_map(r, "mask")) for r in scored)
        out["pseudo_sem_miou"] = semantic_miou(pairs, num_classes)["miou"]
        out["pseudo_sem_images"] = len(scored)
        out["pseudo_sem_images_without_gt_mask"] = len(left_out)
    return out


# ----------------------------------------------------------------------------- writers


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so the JSON is strict (dvc metrics show parses it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Atomic, strict JSON (NaN -> null), keys sorted, for `dvc metrics show`."""
    path = Path(path)
    atomic_write_text(
        path, json.dumps(_clean(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    return path


def write_pr_curves(
    path: str | Path, curves: dict[str, Any], class_names: list[str] | None = None
) -> Path:
    """PR curves (per class, AP50) as flat rows for `dvc plots`: .csv or .json by suffix."""
    rows = []
    for c, curve in curves.items():
        name = class_names[int(c) - 1] if class_names else c
        for s, p, r in zip(curve["score"], curve["precision"], curve["recall"], strict=True):
            rows.append({"class": name, "score": s, "precision": p, "recall": r})
    path = Path(path)
    if path.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["class", "score", "precision", "recall"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    else:
        atomic_write_text(path, json.dumps(_clean(rows), indent=1, allow_nan=False) + "\n")
    return path
