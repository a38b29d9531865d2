"""What each supervision trains the segmenters on.

``full`` = GT masks (the upper bound), ``bbam`` = the pseudo labels of the pseudo_labels
stage, ``box`` = filled boxes (the baseline). Instance targets are encoded masks (see
``bbam.segmenters.mask_loss``); semantic targets are class maps with
``bbam.data.palette.IGNORE_LABEL`` (255) where the loss ignores a pixel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bbam.data.coco import decode_segmentation
from bbam.data.masks import box_region, box_slices
from bbam.data.palette import IGNORE_LABEL, check_class_labels, label_png, load_index_png
from bbam.data.records import DataError, ImageRecord
from bbam.pseudo_labels import mark_crowd_ignore
from bbam.segmenters.mask_loss import MASK_FG, MASK_IGNORE

SUPERVISIONS = ("full", "bbam", "box")  # the order of params, tables and reports


@dataclass
class PseudoGT:
    """Instance pseudo GT; annotations kept as RLE. An image is found by its file name, then
    its stem, and only then by ``str(id)``: a record's image_id is its file stem, which may be
    another image's numeric id ("1.jpg" with id 2 beside "2.jpg" with id 1)."""

    path: Path
    by_file: dict[str, dict[str, Any]]  # file name and file stem -> image entry
    by_id: dict[str, dict[str, Any]]  # str(id) -> image entry
    anns: dict[int, list[dict[str, Any]]]
    cat_to_label: dict[int, int]

    def lookup(self, record: ImageRecord) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        image = next(
            (
                self.by_file[key]
                for key in (record.path.name, record.path.stem, record.image_id)
                if key in self.by_file
            ),
            self.by_id.get(record.image_id),
        )
        return None if image is None else (image, self.anns.get(image["id"], []))


def load_pseudo_gt(path: str | Path, classes: list[str]) -> PseudoGT:
    """Read a pseudo-GT COCO JSON; categories are mapped to labels by name (else by id)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pseudo GT JSON not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, anns, cats = data["images"], data["annotations"], data.get("categories", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a COCO instances JSON ({exc})") from exc
    cat_to_label: dict[int, int] = {}
    for cat in cats:
        name = cat.get("name")
        if name in classes:
            cat_to_label[int(cat["id"])] = classes.index(name) + 1
        elif 1 <= int(cat["id"]) <= len(classes):
            cat_to_label[int(cat["id"])] = int(cat["id"])
        else:
            raise DataError(f"{path}: category {cat} matches no dataset class")
    by_file: dict[str, dict[str, Any]] = {}
    for image in images:
        if "file_name" in image:
            by_file[Path(image["file_name"]).stem] = image
            by_file[Path(image["file_name"]).name] = image
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    by_id = {str(image["id"]): image for image in images}
    return PseudoGT(path, by_file, by_id, by_image, cat_to_label)


def instance_targets(
    record: ImageRecord, supervision: str, pseudo: PseudoGT | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(boxes (n,4) xyxy, labels (n,), encoded masks (n,H,W) uint8) or a skip reason."""
    h, w = record.height, record.width
    boxes, labels, masks = [], [], []
    if supervision == "bbam":
        if pseudo is None:
            raise ValueError("supervision 'bbam' needs a pseudo GT JSON")
        found = pseudo.lookup(record)
        if found is None:
            return "no pseudo labels for image"
        image, anns = found
        h, w = int(image.get("height", h)), int(image.get("width", w))
        for ann in anns:
            if ann.get("iscrowd"):
                continue
            where = f"{pseudo.path} annotation {ann.get('id')}"
            fg = decode_segmentation(ann["segmentation"], h, w, where)
            enc = fg.astype(np.uint8) * MASK_FG
            if ann.get("ignore") is not None:
                ign = decode_segmentation(ann["ignore"], h, w, where + " (ignore)")
                enc[ign & ~fg] = MASK_IGNORE
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            boxes.append([x, y, x + bw, y + bh])
            labels.append(pseudo.cat_to_label[int(ann["category_id"])])
            masks.append(enc)
    else:
        for inst in record.instances:
            if inst.iscrowd:
                continue
            if supervision == "full":
                if not inst.has_mask:
                    return "instance without GT mask (full supervision)"
                enc = inst.mask.astype(np.uint8)
            else:
                enc = box_region(inst.box, h, w).astype(np.uint8)
            boxes.append(np.asarray(inst.box, dtype=np.float32).tolist())
            labels.append(int(inst.label))
            masks.append(enc)
    if (h, w) != (record.height, record.width):
        return "pseudo label size differs from image size"
    boxes_np = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    keep = (boxes_np[:, 2] > boxes_np[:, 0] + 1e-3) & (boxes_np[:, 3] > boxes_np[:, 1] + 1e-3)
    masks_np = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
    return boxes_np[keep], np.asarray(labels, dtype=np.int64)[keep], masks_np[keep]


def mark_void_ignore(label: np.ndarray, record: ImageRecord) -> np.ndarray:
    """Set the record's void region (VOC's 255 band, `ImageRecord.void`) to 255 in `label`
    (in place; returned), as the official VOC mIoU ignores it. GT-side only: pseudo labels
    and box targets never get it, since weak supervision knows only the boxes."""
    if record.void is not None:
        void = record.void.decode()
        if void.shape != label.shape:
            raise DataError(
                f"{record.path}: void region {void.shape} differs from the label map {label.shape}"
            )
        label[void] = IGNORE_LABEL
    return label


def render_label_map(record: ImageRecord, source: str = "mask") -> np.ndarray:
    """HxW uint8 class map from a record's instances: GT masks, or boxes (largest drawn first).

    Crowd regions are 255 (ignored by the loss and by the evaluation); so is the void region
    of a GT map (`source="mask"`), not of a box map (box supervision knows only boxes)."""
    out = np.zeros((record.height, record.width), dtype=np.uint8)
    instances = [i for i in record.instances if not i.iscrowd]
    check_class_labels((i.label for i in instances), str(record.path))
    if source == "box":
        areas = [float((i.box[2] - i.box[0]) * (i.box[3] - i.box[1])) for i in instances]
        for k in np.argsort(areas, kind="stable")[::-1]:
            inst = instances[k]
            out[box_slices(inst.box, record.height, record.width)] = inst.label
        return mark_crowd_ignore(out, record.instances)
    for inst in instances:
        mask = inst.mask
        if mask is None:
            raise DataError(f"{record.path}: instance {inst.instance_id} has no GT mask")
        out[mask] = inst.label
    return mark_void_ignore(mark_crowd_ignore(out, record.instances), record)


def semantic_label_file(
    record: ImageRecord, supervision: str, pseudo_dir: Path | None, gt_dir: Path | None
) -> Path | None:
    """The PNG a record's training label map is read from: its pseudo label (``bbam``; it may
    be missing), its GT PNG (``full``, where ``gt_dir`` has one), else None: drawn from the
    annotations."""
    if supervision == "bbam":
        if pseudo_dir is None:
            raise ValueError("supervision 'bbam' needs the pseudo label directory")
        return label_png(pseudo_dir, record.image_id)
    if supervision == "full" and gt_dir is not None:
        png = label_png(gt_dir, record.image_id)
        if png.is_file():
            return png
    return None


def _skip_reason(record: ImageRecord, supervision: str, png: Path | None) -> str | None:
    if supervision == "bbam" and not png.is_file():
        return "no pseudo label PNG"
    if supervision == "full" and png is None:
        if any(not i.has_mask for i in record.instances if not i.iscrowd):
            return "instance without GT mask (full supervision)"
    return None


def semantic_skip(
    record: ImageRecord, supervision: str, pseudo_dir: Path | None, gt_dir: Path | None
) -> str | None:
    """Why a record has no training label map (checked without reading any PNG), or None."""
    png = semantic_label_file(record, supervision, pseudo_dir, gt_dir)
    return _skip_reason(record, supervision, png)


def semantic_target(
    record: ImageRecord, supervision: str, pseudo_dir: Path | None, gt_dir: Path | None
) -> np.ndarray | str:
    """The training label map for one record, or a skip reason."""
    png = semantic_label_file(record, supervision, pseudo_dir, gt_dir)
    skip = _skip_reason(record, supervision, png)
    if skip is not None:
        return skip
    if png is not None:
        label = load_index_png(png)
    else:
        label = render_label_map(record, "mask" if supervision == "full" else "box")
    if label.shape != (record.height, record.width):
        return "label map size differs from image size"
    return label
