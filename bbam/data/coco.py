"""COCO instances reader (any instances JSON: polygons, RLE, uncompressed RLE, crowd regions).

Choices:
- Categories map to contiguous labels 1..K in category-id order; `Dataset.classes` are their
  names and `Dataset.category_ids[label-1]` the original id (also `category_ids(json_path)`).
- Crowd annotations are kept as `Instance(iscrowd=True)` (with their mask) so evaluators can
  ignore them; training code must filter `iscrowd` out.
- `ImageRecord.image_id` is the file name's stem (`syn_000001`, `000000397133`), the same id the
  VOC reader gives; `coco_image_ids(json_path)` maps it back to the integer COCO id.
- Images are not decoded: sizes come from the JSON, checked against the file header (read from
  the header when missing); a size that disagrees with the file raises DataError.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bbam.data.images import checked_size, clip_box, path_in_root
from bbam.data.records import (
    CompressedMask,
    DataError,
    Dataset,
    ImageRecord,
    Instance,
    SkipReport,
)
from bbam.data.writers import SOURCE_REPORTS, VOID_KEY


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
    """Categories in id order; a repeated id or name would split one class into two labels."""
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: category without a valid id and name ({exc})") from exc
    for key, values in (("id", [int(c["id"]) for c in cats]), ("name", names)):
        repeated = [v for v, count in Counter(values).items() if count > 1]
        if repeated:
            raise DataError(f"{path}: category {key} {repeated[0]!r} is listed more than once")
    return cats


def _as_id(value) -> int | None:
    """An id as the images/categories lists read it (`int("7") == 7`), or None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _flag(ann: dict, key: str, where: str) -> bool:
    """0/1 flags such as iscrowd; the string "0" is false (`bool("0")` would say true)."""
    value = ann.get(key) or 0
    if value not in (0, 1, "0", "1"):
        raise DataError(f"{where}: {key} must be 0 or 1, got {value!r}")
    return bool(int(value))


def _area(ann: dict, where: str) -> float | None:
    """The annotation's own `area` (COCO's polygon area, what COCOeval sizes GT by), or None
    when it has none; one that is not a finite non-negative number raises DataError."""
    value = ann.get("area")
    if value is None:
        return None
    try:
        area = float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: invalid area {value!r}") from exc
    if not (np.isfinite(area) and area >= 0):
        raise DataError(f"{where}: invalid area {value!r}")
    return area


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


def _check_polygons(segm: list, where: str) -> None:
    """Refuse polygons given as point pairs ([[x, y], ...], as labelme writes them): counted as
    degenerate (<= 5 points) or failing inside pycocotools, they would never reach a mask."""
    for polygon in segm:  # the first value only: a whole-split read checks ~10^7 of them
        if not isinstance(polygon, list) or (polygon and isinstance(polygon[0], list | dict)):
            raise DataError(f"{where}: polygon must be a flat [x1, y1, x2, y2, ...] list")


def _rle_length(counts: str | bytes) -> int:
    """Pixels a compressed RLE string covers (maskApi.c's rleFrString, vectorised).

    Each count is a run of 5-bit groups, low bits first; 0x20 means "more groups follow", 0x10
    on the last group makes it negative. From the 4th count on, counts are deltas to the count
    two places before, so the runs are the cumulative sums of every other count."""
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0
    if not c.size or not last[-1]:
        raise ValueError("RLE string is empty or cut inside a count")
    start = np.flatnonzero(np.r_[True, last[:-1]])
    shift = 5 * (np.arange(c.size) - np.repeat(start, np.diff(np.r_[start, c.size])))
    x = np.add.reduceat((c & 0x1F) << shift, start)
    x -= np.where(c[last] & 0x10, 1 << (shift[last] + 5), 0)
    return int(x[0] + np.cumsum(x[1::2]).sum() + np.cumsum(x[2::2]).sum())


def segmentation_rle(segm, height: int, width: int, where: str) -> CompressedMask:
    """Polygons, uncompressed RLE or compressed RLE as one checked compressed RLE.

    RLE counts must cover exactly size[0] x size[1] pixels: pycocotools leaves the rest of the
    mask uninitialised memory when they fall short. Polygons need an even number of coordinates
    (an odd one is a truncated list that pycocotools would silently close differently)."""
    try:
        if isinstance(segm, list):
            _check_polygons(segm, where)
            if any(len(p) % 2 for p in segm):
                raise DataError(f"{where}: polygon with an odd number of coordinates")
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                return CompressedMask.from_array(np.zeros((height, width), dtype=bool))
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list | str | bytes):
            h, w = (int(v) for v in segm["size"])
            counts = segm["counts"]
            covered = sum(counts) if isinstance(counts, list) else _rle_length(counts)
            if covered != h * w:
                raise DataError(f"{where}: RLE counts cover {covered} pixels, not {h}x{w}")
            if isinstance(counts, list):
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                rle = {
                    "size": [h, w],
                    "counts": counts.encode() if isinstance(counts, str) else counts,
                }
        else:
            raise DataError(f"{where}: unsupported segmentation format")
    except DataError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise DataError(f"{where}: cannot decode segmentation ({exc})") from exc
    mask = CompressedMask({"size": [int(v) for v in rle["size"]], "counts": rle["counts"]})
    if mask.shape != (height, width):
        raise DataError(f"{where}: mask size {mask.shape} differs from image ({height}, {width})")
    return mask


def decode_segmentation(segm, height: int, width: int, where: str) -> np.ndarray:
    """HxW bool mask from polygons, uncompressed RLE or compressed RLE (`segmentation_rle`)."""
    return segmentation_rle(segm, height, width, where).decode()


def read_coco(
    annotation_json: str | Path,
    image_root: str | Path,
    with_masks: bool = True,
    unknown: str = "error",
) -> Dataset:
    """Read a COCO instances file; `file_name`s are relative to `image_root`.

    Boxes: xywh -> xyxy (x2/y2 exclusive), clipped to the image (counted in
    `Dataset.repaired`, "clipped_box"); empty boxes are skipped and counted
    ("zero_area_box"), non-finite ones raise. Counts a converter stored in the file's
    ``info`` (`writers.SOURCE_REPORTS`: what the VOC reader skipped) are added to both. A missing bbox is taken from the
    segmentation. Polygons of fewer than 3 points are dropped and counted
    ("degenerate_polygon"); an instance left without a polygon keeps its box but has no mask,
    as does a non-crowd one whose polygons cover no pixel ("empty_mask"). Polygons
    must be flat [x1, y1, x2, y2, ...] lists (point pairs raise DataError).
    Masks are kept as compressed RLE (`CompressedMask`). Annotations of unknown images are
    skipped and counted; unknown category ids raise DataError (`unknown="skip"` counts them
    instead). Instance ids are the annotation ids, so they must be unique, as must image ids
    and category ids/names (DataError). Ids given as strings ("7") match their integers.
    A `file_name` leading outside `image_root` raises DataError. An annotation's `area` is
    kept (`Instance.area`); with masks, an image entry's `writers.VOID_KEY` RLE becomes
    `ImageRecord.void` (files without it read as before: no void region).
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    path = Path(annotation_json)
    image_root = Path(image_root)
    data = load_coco_json(path)
    cats = _sorted_categories(data, path)
    label_of = {int(c["id"]): i for i, c in enumerate(cats, start=1)}
    skipped, repaired = SkipReport(), SkipReport()
    source = data.get("info") if isinstance(data.get("info"), dict) else {}
    source = source.get(SOURCE_REPORTS) if isinstance(source.get(SOURCE_REPORTS), dict) else {}
    for key, report in (("skipped", skipped), ("repaired", repaired)):
        if isinstance(source.get(key), dict):  # what the VOC reader counted before conversion
            report.merge(source[key])

    records: dict[int, ImageRecord] = {}
    stems: set[str] = set()
    for im in data["images"]:
        try:
            coco_id, file_name = int(im["id"]), im["file_name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: image entry without id/file_name ({exc})") from exc
        if not isinstance(file_name, str) or not Path(file_name).stem:
            raise DataError(f"{path}: image {coco_id}: invalid file_name {file_name!r}")
        if coco_id in records:
            raise DataError(f"{path}: image id {coco_id} is listed more than once ({file_name})")
        stem = Path(file_name).stem
        if stem in stems:
            raise DataError(f"{path}: two images share the id {stem!r} ({file_name})")
        stems.add(stem)
        image_path = path_in_root(image_root, file_name, path)
        try:
            width, height = int(im.get("width") or 0), int(im.get("height") or 0)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: image {file_name}: invalid width/height ({exc})") from exc
        width, height = checked_size(image_path, width, height, path)
        void = None  # GT knowledge like the masks; a file without the key marks no void
        if with_masks and im.get(VOID_KEY) is not None:
            where = f"{path}: image {file_name}: {VOID_KEY}"
            void = segmentation_rle(im[VOID_KEY], height, width, where)
        records[coco_id] = ImageRecord(stem, image_path, width, height, [], void)

    annotation_ids: set[int] = set()
    for n, ann in enumerate(data.get("annotations", [])):
        where = f"{path}: annotation {ann.get('id', f'#{n}') if isinstance(ann, dict) else n}"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: not an object")
        instance_id = _as_id(ann.get("id", n + 1))
        if instance_id is None:
            raise DataError(f"{where}: invalid annotation id")
        if instance_id in annotation_ids:
            raise DataError(f"{where}: annotation id {instance_id} is used more than once")
        annotation_ids.add(instance_id)
        record = records.get(_as_id(ann.get("image_id")))
        if record is None:
            skipped.add("annotation_without_image", where)
            continue
        label = label_of.get(_as_id(ann.get("category_id")))
        if label is None:
            if unknown == "error":
                raise DataError(f"{where}: unknown category_id {ann.get('category_id')!r}")
            skipped.add("unknown_class", where)
            continue
        segm = ann.get("segmentation") or None  # box-only exports write "segmentation": []
        iscrowd = _flag(ann, "iscrowd", where)
        if isinstance(segm, list):
            _check_polygons(segm, where)
        if isinstance(segm, list) and any(_degenerate(p) for p in segm):
            # An empty GT mask would teach "background" and score IoU 0: no mask instead.
            skipped.add("degenerate_polygon", where)
            segm = [p for p in segm if not _degenerate(p)] or None
        mask = None  # kept compressed: decoded arrays of a whole split would not fit in memory
        if segm is not None and (with_masks or "bbox" not in ann):
            mask = segmentation_rle(segm, record.height, record.width, where)
        bbox = ann.get("bbox")
        if bbox is None:
            if mask is None or not mask.area():
                skipped.add("missing_bbox", where)
                continue
            ys, xs = np.nonzero(mask.decode())
            bbox = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        try:
            x, y, w, h = (float(v) for v in bbox)
            if not np.isfinite([x, y, w, h]).all():
                raise ValueError("not finite")
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: invalid bbox {bbox!r}") from exc
        box = clip_box([x, y, x + w, y + h], record.width, record.height)
        if box is None:
            skipped.add("zero_area_box", where)
            continue
        if not np.array_equal(box, np.float32([x, y, x + w, y + h])):
            repaired.add("clipped_box", f"{where}: bbox {[x, y, w, h]}")
        if mask is not None and isinstance(segm, list) and not iscrowd and not mask.area():
            # Collinear or sub-pixel polygons rasterise to no pixel: no mask, as above.
            skipped.add("empty_mask", where)
            mask = None
        record.instances.append(
            Instance(
                instance_id=instance_id,
                label=label,
                box=box,
                mask=mask if with_masks else None,
                iscrowd=iscrowd,
                difficult=_flag(ann, "difficult", where),
                area=_area(ann, where),
            )
        )
    names = [str(c["name"]) for c in cats]
    return Dataset(names, list(records.values()), skipped, [int(c["id"]) for c in cats], repaired)


def cocoeval_stats(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> list[float]:
    """The first six COCOeval summary numbers (AP, AP50, AP75, APs, APm, APl; -1 = no GT)
    of `results` against `gt`, with pycocotools' printing silenced. No results scores 0
    where there is GT and -1 where there is none, as COCOeval does (loadRes refuses [])."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(results)
        else:
            dt = COCO()
            dt.dataset = {
                "images": list(gt.dataset.get("images", [])),
                "annotations": [],
                "categories": list(gt.dataset.get("categories", [])),
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]
