"""COCO instances reader (any instances JSON: polygons, RLE, uncompressed RLE, crowd regions).

Choices:
- Categories map to contiguous labels 1..K in category-id order; `Dataset.classes` are their
  names and `Dataset.category_ids[label-1]` the original id (also `category_ids(json_path)`).
- Crowd annotations are kept as `Instance(iscrowd=True)` (with their mask) so evaluators can
  ignore them; training code must filter `iscrowd` out.
- `ImageRecord.image_id` is the file name's stem (`syn_000001`, `000000397133`), the same id the
  VOC reader gives; `coco_image_ids(json_path)` maps it back to the integer COCO id.
- Images are not decoded: sizes come from the JSON (or the file header when missing).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from bbam.data.images import image_size
from bbam.data.records import DataError, Dataset, ImageRecord, Instance, SkipReport


def load_coco_json(path: str | Path) -> dict:
    """Parse a COCO JSON, or raise DataError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at top level")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid {key!r} list")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: invalid 'annotations' list")
    return data


def _sorted_categories(data: dict, path: Path) -> list[dict]:
    try:
        return sorted(data["categories"], key=lambda c: int(c["id"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: category without a valid id ({exc})") from exc


def category_ids(json_path: str | Path) -> list[int]:
    """Original COCO category id for each label 1..K (id order)."""
    path = Path(json_path)
    return [int(c["id"]) for c in _sorted_categories(load_coco_json(path), path)]


def coco_image_ids(json_path: str | Path) -> dict[str, int]:
    """image_id (file stem) -> integer COCO image id."""
    data = load_coco_json(json_path)
    return {Path(str(im["file_name"])).stem: int(im["id"]) for im in data["images"]}


def _degenerate(polygon) -> bool:
    """A polygon of fewer than 3 points (6 coordinates) encloses nothing."""
    return isinstance(polygon, list) and len(polygon) < 6


def decode_segmentation(segm, height: int, width: int, where: str) -> np.ndarray:
    """HxW bool mask from polygons, uncompressed RLE or compressed RLE."""
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, *segm["size"])
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes):
            rle = segm
        else:
            raise DataError(f"{where}: unsupported segmentation format")
        with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
            mask = mask_utils.decode(rle)  # pycocotools warns about numpy 2's copy keyword
    except DataError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise DataError(f"{where}: cannot decode segmentation ({exc})") from exc
    if mask.shape[:2] != (height, width):
        raise DataError(
            f"{where}: mask size {mask.shape[:2]} differs from image ({height}, {width})"
        )
    return mask.astype(bool)


def read_coco(
    annotation_json: str | Path,
    image_root: str | Path,
    with_masks: bool = True,
    unknown: str = "error",
) -> Dataset:
    """Read a COCO instances file; `file_name`s are relative to `image_root`.

    Boxes: xywh -> xyxy (x2/y2 exclusive), clipped to the image; empty boxes are skipped and
    counted ("zero_area_box"). A missing bbox is taken from the segmentation. Polygons of
    fewer than 3 points are dropped and counted ("degenerate_polygon"); an instance left
    without a polygon keeps its box but has no mask. Annotations of unknown images are
    skipped and counted; unknown category ids raise DataError (`unknown="skip"` counts them
    instead). Instance ids are the annotation ids.
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    path = Path(annotation_json)
    image_root = Path(image_root)
    data = load_coco_json(path)
    cats = _sorted_categories(data, path)
    label_of = {int(c["id"]): i for i, c in enumerate(cats, start=1)}
    skipped = SkipReport()

    records: dict[int, ImageRecord] = {}
    stems: set[str] = set()
    for im in data["images"]:
        try:
            coco_id, file_name = int(im["id"]), str(im["file_name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: image entry without id/file_name ({exc})") from exc
        stem = Path(file_name).stem
        if stem in stems:
            raise DataError(f"{path}: two images share the id {stem!r} ({file_name})")
        stems.add(stem)
        image_path = image_root / file_name
        width, height = int(im.get("width") or 0), int(im.get("height") or 0)
        if width <= 0 or height <= 0:
            width, height = image_size(image_path)
        records[coco_id] = ImageRecord(stem, image_path, width, height, [])

    for n, ann in enumerate(data.get("annotations", [])):
        where = f"{path}: annotation {ann.get('id', f'#{n}') if isinstance(ann, dict) else n}"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: not an object")
        record = records.get(ann.get("image_id"))
        if record is None:
            skipped.add("annotation_without_image", where)
            continue
        label = label_of.get(ann.get("category_id"))
        if label is None:
            if unknown == "error":
                raise DataError(f"{where}: unknown category_id {ann.get('category_id')!r}")
            skipped.add("unknown_class", where)
            continue
        segm = ann.get("segmentation")
        if isinstance(segm, list) and any(_degenerate(p) for p in segm):
            # An empty GT mask would teach "background" and score IoU 0: no mask instead.
            skipped.add("degenerate_polygon", where)
            segm = [p for p in segm if not _degenerate(p)] or None
        mask = None
        if segm is not None and (with_masks or "bbox" not in ann):
            mask = decode_segmentation(segm, record.height, record.width, where)
        bbox = ann.get("bbox")
        if bbox is None:
            if mask is None or not mask.any():
                skipped.add("missing_bbox", where)
                continue
            ys, xs = np.nonzero(mask)
            bbox = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: invalid bbox {bbox!r}") from exc
        box = np.array(
            [
                min(max(x, 0.0), record.width),
                min(max(y, 0.0), record.height),
                min(max(x + w, 0.0), record.width),
                min(max(y + h, 0.0), record.height),
            ],
            dtype=np.float32,
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            skipped.add("zero_area_box", where)
            continue
        record.instances.append(
            Instance(
                instance_id=int(ann.get("id", n + 1)),
                label=label,
                box=box,
                mask=mask if with_masks else None,
                iscrowd=bool(ann.get("iscrowd", 0)),
                difficult=bool(ann.get("difficult", 0)),
            )
        )
    names = [str(c["name"]) for c in cats]
    return Dataset(names, list(records.values()), skipped, [int(c["id"]) for c in cats])
