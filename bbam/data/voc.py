"""PASCAL VOC 2012 (+ SBD) reader: boxes from the XML, GT masks from the PNGs or SBD .mat files.

Images are not decoded here: sizes come from the XML, checked against the image header (a
mismatch raises DataError); a bad image surfaces when a later stage calls `load_rgb`, which
names the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from bbam.data.images import checked_size, clip_box, path_in_root
from bbam.data.masks import box_iou
from bbam.data.palette import load_index_png
from bbam.data.records import CompressedMask, DataError, Dataset, ImageRecord, Instance, SkipReport

# The encoding an XML declaration names (read as ASCII: CJK codecs keep ASCII as is).
_XML_ENCODING = re.compile(
    rb"""^(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._:-]+)["']"""
)
# Image files tried for <id> in JPEGImages, in this order (VOC itself has only .jpg).
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def voc_dir(root: str | Path) -> Path:
    """Accept either the VOC2012 folder itself or a folder containing VOC2012/."""
    root = Path(root)
    if not (root / "Annotations").is_dir() and (root / "VOC2012").is_dir():
        return root / "VOC2012"
    return root


def sbd_dir(root: str | Path) -> Path:
    """Accept the SBD root or its `dataset/` subfolder (the official tarball has one)."""
    root = Path(root)
    if not (root / "inst").is_dir() and (root / "dataset" / "inst").is_dir():
        return root / "dataset"
    return root


def load_classes(source: Sequence[str] | str | Path) -> list[str]:
    """Class names from a list, a COCO JSON (categories in id order) or a text file (one a line)."""
    if isinstance(source, str | Path) and Path(source).is_file():
        path = Path(source)
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                cats = sorted(data["categories"], key=lambda c: int(c["id"]))
                return [str(c["name"]) for c in cats]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: cannot read COCO categories ({exc})") from exc
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [n for n in names if n and n != "background"]
    if isinstance(source, str | Path):
        raise DataError(f"{source}: class list file not found")
    return [str(c) for c in source]


def read_id_list(path: Path, skipped: SkipReport | None = None) -> list[str]:
    """Image ids in file order: the first word of each line (blank lines, CRLF endings, a
    Windows BOM and Main-style "id  1" lines are fine). A repeated id is read once and counted
    in `skipped` ("duplicate_id"): reading it twice would weigh that image double."""
    if not path.is_file():
        raise DataError(f"{path}: image list not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    ids: dict[str, None] = {}
    for line in lines:
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in ids and skipped is not None:
            skipped.add("duplicate_id", f"{path}: {image_id}")
        ids[image_id] = None
    return list(ids)


def train_aug_ids(
    voc_root: str | Path, sbd_root: str | Path, skipped: SkipReport | None = None
) -> list[str]:
    """(VOC2012 seg train ∪ SBD train ∪ SBD val) − VOC2012 seg val, sorted (10,582 on the real data).

    The lists overlap by design (an id in two of them is read once, silently); an id repeated
    within one list is counted in `skipped` ("duplicate_id"), as `read_id_list` does."""
    seg = voc_dir(voc_root) / "ImageSets" / "Segmentation"
    sbd = sbd_dir(sbd_root)
    ids = set(read_id_list(seg / "train.txt", skipped))
    ids |= set(read_id_list(sbd / "train.txt", skipped))
    ids |= set(read_id_list(sbd / "val.txt", skipped))
    ids -= set(read_id_list(seg / "val.txt"))
    return sorted(ids)


def _sbd_listed(sbd: Path | None) -> set[str]:
    """The ids SBD's train/val lists promise an instance .mat for (empty without SBD)."""
    if sbd is None:
        return set()
    lists = (sbd / "train.txt", sbd / "val.txt")
    return {i for path in lists if path.is_file() for i in read_id_list(path)}


def _seg_listed(voc: Path) -> set[str]:
    """The ids ImageSets/Segmentation lists promise SegmentationObject/Class PNGs for (none
    when the dataset has no mask folders at all: a box-only dataset using those lists)."""
    if not any((voc / sub).is_dir() for sub in ("SegmentationObject", "SegmentationClass")):
        return set()
    lists = sorted((voc / "ImageSets" / "Segmentation").glob("*.txt"))
    return {i for path in lists for i in read_id_list(path)}


def _split_ids(voc: Path, split: str, sbd_root: Path | None, skipped: SkipReport) -> list[str]:
    if split == "train_aug":
        if sbd_root is None:
            raise DataError(f"{voc}: split 'train_aug' needs sbd_root")
        return train_aug_ids(voc, sbd_root, skipped)
    seg = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if seg.is_file():
        return read_id_list(seg, skipped)
    return read_id_list(voc / "ImageSets" / "Main" / f"{split}.txt", skipped)


def _text(node, tag: str, xml: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise DataError(f"{xml}: missing <{tag}>")
    return child.text.strip()


def _number(node, tag: str, xml: Path) -> float:
    value = _text(node, tag, xml)
    try:
        number = float(value)
    except ValueError as exc:
        raise DataError(f"{xml}: <{tag}> is not a number: {value!r}") from exc
    if not np.isfinite(number):  # float() accepts "nan" and "inf"
        raise DataError(f"{xml}: <{tag}> is not a finite number: {value!r}")
    return number


def _flag(node, tag: str, xml: Path) -> bool:
    """<difficult>: 0/1 (some tools write false/true); "0" must not read as true."""
    value = _text(node, tag, xml, "0").lower()
    if value not in ("0", "1", "false", "true", ""):
        raise DataError(f"{xml}: <{tag}> must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def _parse_xml(data: bytes | str, xml: Path):
    """The root element, parsed by defusedxml; a multi-byte declared encoding (GBK, Shift_JIS:
    CJK labelling tools write them) is decoded here, since expat only handles single-byte ones."""
    try:
        return SafeET.fromstring(data)
    except DefusedXmlException as exc:
        raise DataError(f"{xml}: forbidden XML construct ({type(exc).__name__})") from exc
    except SafeET.ParseError as exc:
        raise DataError(f"{xml}: malformed XML ({exc})") from exc
    except LookupError as exc:
        raise DataError(f"{xml}: the XML declares an unknown encoding ({exc})") from exc
    except ValueError as exc:  # "multi-byte encodings are not supported"
        declared = _XML_ENCODING.match(data) if isinstance(data, bytes) else None
        if declared is None:
            raise DataError(f"{xml}: cannot parse XML ({exc})") from exc
        codec = declared[1].decode("ascii")
        try:
            text = data.decode(codec)
        except (LookupError, UnicodeDecodeError) as decode_exc:
            raise DataError(
                f"{xml}: not readable as its declared encoding {codec!r}"
            ) from decode_exc
    return _parse_xml(text, xml)  # a str is parsed as UTF-8 whatever the declaration says


def parse_voc_xml(xml: Path) -> tuple[str | None, int, int, list[dict]]:
    """(filename, width, height, objects) from one VOC XML; objects keep file order.
    Entity declarations (billion laughs etc.) are refused by defusedxml -> DataError."""
    try:
        data = xml.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{xml}: annotation file not found") from exc
    root = _parse_xml(data, xml)
    filename_node = root.find("filename")
    filename = (
        filename_node.text.strip() if filename_node is not None and filename_node.text else None
    )
    size = root.find("size")
    width = height = 0
    if size is not None:
        width = int(_number(size, "width", xml)) if size.find("width") is not None else 0
        height = int(_number(size, "height", xml)) if size.find("height") is not None else 0
    objects = []
    for obj in root.findall("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{xml}: <object> without <bndbox>")
        objects.append(
            {
                "name": _text(obj, "name", xml),
                "difficult": _flag(obj, "difficult", xml),
                "box": [_number(bnd, t, xml) for t in ("xmin", "ymin", "xmax", "ymax")],
            }
        )
    return filename, width, height, objects


def _image_path(
    voc: Path, image_id: str, filename: str | None, xml: Path, repaired: SkipReport
) -> Path:
    """JPEGImages/<id>.<ext>, as the VOC devkit reads it: a <filename> copied along with an
    annotation (augmentation scripts, LabelImg "save as") can name another image. <filename> is
    used only when no <id> image exists; one naming a different existing file is counted
    ("filename_mismatch")."""
    images = voc / "JPEGImages"
    named = path_in_root(images, filename, xml) if filename else None
    candidates = (images / f"{image_id}{ext}" for ext in _IMAGE_EXTENSIONS)
    by_id = next((p for p in candidates if p.is_file()), None)
    if by_id is None:
        return named or images / f"{image_id}.jpg"
    if named is not None and named.is_file() and not named.samefile(by_id):
        repaired.add("filename_mismatch", f"{xml}: <filename> {filename} (read {by_id.name})")
    return by_id


def _voc_masks(
    voc: Path,
    image_id: str,
    labels: list[int | None],
    height: int,
    width: int,
    skipped: SkipReport,
) -> tuple[list[np.ndarray | None], np.ndarray] | None:
    """(masks per XML object (index k in SegmentationObject = k-th object), void), or None if
    no PNGs. `void` is where either PNG holds 255: the band VOC draws around every object and
    its hard regions, which the official semantic mIoU ignores (readers keep it on the record).

    One PNG without the other is a broken dataset (DataError). PNG instances past the XML's
    objects have no class or box to attach to: counted ("unannotated_mask_instance")."""
    obj_png = voc / "SegmentationObject" / f"{image_id}.png"
    cls_png = voc / "SegmentationClass" / f"{image_id}.png"
    has_obj, has_cls = obj_png.is_file(), cls_png.is_file()
    if not (has_obj or has_cls):
        return None
    if not (has_obj and has_cls):
        missing, present = (cls_png, obj_png) if has_obj else (obj_png, cls_png)
        raise DataError(
            f"{missing}: mask file not found ({present.parent.name}/{present.name} exists)"
        )
    obj, cls = load_index_png(obj_png), load_index_png(cls_png)
    if obj.shape != (height, width) or cls.shape != (height, width):
        raise DataError(
            f"{obj_png}: mask size {obj.shape} differs from annotation ({height}, {width})"
        )
    present_ids = np.flatnonzero(np.bincount(obj.reshape(-1), minlength=256))
    for k in present_ids[(present_ids > len(labels)) & (present_ids != 255)]:
        skipped.add("unannotated_mask_instance", f"{obj_png}: instance {int(k)}")
    masks: list[np.ndarray | None] = []
    for k, label in enumerate(labels, start=1):
        mask = obj == k
        if label is None or not mask.any():
            masks.append(None)
            continue
        values = np.bincount(cls[mask], minlength=256)
        values[255] = 0
        if int(values.argmax()) != label:
            raise DataError(
                f"{cls_png}: instance {k} has class index {int(values.argmax())} in the PNG "
                f"but label {label} in the XML"
            )
        masks.append(mask)
    return masks, (obj == 255) | (cls == 255)


def _mat_fields(path: Path, key: str, fields: tuple[str, ...]) -> list[np.ndarray]:
    """`fields` of the `key` struct of an SBD .mat file, or DataError naming the file."""
    try:
        data = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except NotImplementedError as exc:  # scipy reads MAT v4-v7.2, not v7.3 (HDF5)
        raise DataError(f"{path}: MATLAB v7.3 (HDF5) .mat is not supported; save with -v7") from exc
    except (OSError, ValueError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise DataError(f"{path}: unreadable .mat file ({exc})") from exc
    if key not in data:
        raise DataError(f"{path}: no {key} struct")
    missing = [f for f in fields if not hasattr(data[key], f)]
    if missing:
        raise DataError(f"{path}: {key} is not a struct with field(s) {', '.join(missing)}")
    return [np.asarray(getattr(data[key], f)) for f in fields]


def _sbd_masks(
    sbd: Path,
    image_id: str,
    labels: list[int | None],
    boxes: list[np.ndarray | None],
    h: int,
    w: int,
) -> list[np.ndarray | None] | None:
    """SBD instances matched to XML objects: same class, greedy by IoU of the mask's tight box
    with the XML box (>= 0.5); SBD does not promise XML order. Unmatched objects get no mask."""
    inst_mat = sbd / "inst" / f"{image_id}.mat"
    if not inst_mat.is_file():
        return None
    seg, cats = _mat_fields(inst_mat, "GTinst", ("Segmentation", "Categories"))
    try:
        cats = np.atleast_1d(cats).astype(int).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{inst_mat}: GTinst.Categories is not a list of class indices") from exc
    if seg.shape != (h, w):
        raise DataError(f"{inst_mat}: mask size {seg.shape} differs from annotation ({h}, {w})")
    cls_mat = sbd / "cls" / f"{image_id}.mat"
    cls_seg = _mat_fields(cls_mat, "GTcls", ("Segmentation",))[0] if cls_mat.is_file() else None
    if cls_seg is not None and cls_seg.shape != (h, w):
        raise DataError(f"{cls_mat}: mask size {cls_seg.shape} differs from annotation ({h}, {w})")
    candidates = []
    for k, cat in enumerate(cats, start=1):
        mask = seg == k
        if not mask.any():
            continue
        if cls_seg is not None and int(np.bincount(cls_seg[mask].astype(np.int64)).argmax()) != cat:
            raise DataError(f"{cls_mat}: instance {k} class disagrees with GTinst.Categories")
        ys, xs = np.nonzero(mask)
        mbox = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        for j, (label, box) in enumerate(zip(labels, boxes, strict=True)):
            if label == cat and box is not None:
                iou = box_iou(mbox, box)
                if iou >= 0.5:
                    candidates.append((iou, k, j, mask))
    masks: list[np.ndarray | None] = [None] * len(labels)
    used: set[int] = set()
    for _iou, k, j, mask in sorted(candidates, key=lambda c: -c[0]):
        if k not in used and masks[j] is None:
            masks[j] = mask
            used.add(k)
    return masks


def read_voc(
    root: str | Path,
    split: str,
    classes: Sequence[str] | str | Path = VOC_CLASSES,
    with_masks: bool = True,
    sbd_root: str | Path | None = None,
    unknown: str = "error",
) -> Dataset:
    """Read a VOC-style split ("train", "val", "trainval", ..., or "train_aug" with `sbd_root`).

    Boxes: VOC 1-based inclusive -> 0-based, x2/y2 exclusive (x1-1, y1-1, x2, y2), then clipped to
    the image (counted in `Dataset.repaired`, "clipped_box"); boxes with no area left are
    skipped (SkipReport "zero_area_box"). Difficult objects
    are kept (flagged). Masks: SegmentationObject/Class PNGs when present, else SBD inst/cls .mat
    when `sbd_root` has the image, else None. `classes` may be a list, a COCO JSON or a text file;
    the PNG class indices must follow it. Unknown class names: `unknown="error"` raises DataError,
    `"skip"` skips the object and counts it ("unknown_class"); names are compared after
    stripping whitespace, case-sensitively. A listed image without XML is skipped and counted
    ("missing_annotation"), as is an id listed twice ("duplicate_id"). An object left without
    a mask where the image has one (a VOC PNG, or an SBD instance .mat, which SBD's lists
    promise) is counted ("object_without_mask"), as is an image an ImageSets/Segmentation list
    names without its PNGs ("missing_mask_png") and a PNG instance with no XML object
    ("unannotated_mask_instance"). The image is JPEGImages/<id>.jpg (or .png, ...); <filename>
    is read only when there is none, and one naming another image is counted in `repaired`
    ("filename_mismatch"). Instance ids run 1..N over the split in order. With masks, the
    PNGs' 255 (void) pixels become `ImageRecord.void` (SBD has none).
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    voc = voc_dir(root)
    class_names = load_classes(classes)
    index = {name: i for i, name in enumerate(class_names, start=1)}
    sbd = sbd_dir(sbd_root) if sbd_root is not None else None
    skipped, repaired = SkipReport(), SkipReport()
    records: list[ImageRecord] = []
    next_instance = 1
    ids = _split_ids(voc, split, sbd, skipped)
    sbd_listed = _sbd_listed(sbd) if with_masks else set()
    seg_listed = _seg_listed(voc) if with_masks else set()
    for image_id in ids:
        xml = voc / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            skipped.add("missing_annotation", str(xml))
            continue
        filename, width, height, objects = parse_voc_xml(xml)
        path = _image_path(voc, image_id, filename, xml, repaired)
        width, height = checked_size(path, width, height, xml)
        labels: list[int | None] = []
        boxes: list[np.ndarray | None] = []
        for obj in objects:
            label = index.get(obj["name"])
            if label is None:
                if unknown == "error":
                    raise DataError(f"{xml}: unknown class name {obj['name']!r}")
                skipped.add("unknown_class", f"{xml}: {obj['name']}")
                labels.append(None)
                boxes.append(None)
                continue
            x1, y1, x2, y2 = obj["box"]
            box = clip_box([x1 - 1, y1 - 1, x2, y2], width, height)
            if box is None:
                skipped.add("zero_area_box", f"{xml}: {obj['name']} {obj['box']}")
                labels.append(None)
                boxes.append(None)
                continue
            if not np.array_equal(box, np.float32([x1 - 1, y1 - 1, x2, y2])):
                repaired.add("clipped_box", f"{xml}: {obj['name']} {obj['box']}")
            labels.append(label)
            boxes.append(box)
        masks: list[np.ndarray | None] | None = None
        void = None  # SBD's .mat files mark no void region
        if with_masks:
            found = _voc_masks(voc, image_id, labels, height, width, skipped)
            if found is not None:
                masks, void_mask = found
                void = CompressedMask.from_array(void_mask) if void_mask.any() else None
            if masks is None and sbd is not None:
                masks = _sbd_masks(sbd, image_id, labels, boxes, height, width)
            if masks is None and image_id in sbd_listed:  # SBD lists it, its inst .mat is gone
                masks = [None] * len(labels)  # each object is counted as without a mask
            if masks is None and image_id in seg_listed:  # a Segmentation list promised PNGs
                png = voc / "SegmentationObject" / f"{image_id}.png"
                skipped.add("missing_mask_png", str(png))
        instances = []
        for j, (label, box, obj) in enumerate(zip(labels, boxes, objects, strict=True)):
            if label is None or box is None:
                continue
            mask = masks[j] if masks is not None else None
            if masks is not None and mask is None:
                skipped.add("object_without_mask", f"{xml}: object {j + 1}")
            stored = None if mask is None else CompressedMask.from_array(mask)  # see records.py
            instances.append(Instance(next_instance, label, box, stored, False, obj["difficult"]))
            next_instance += 1
        records.append(ImageRecord(image_id, path, int(width), int(height), instances, void))
    if ids and not records:
        raise DataError(
            f"{voc}: none of the {len(ids)} images in split {split!r} has an annotation"
        )
    return Dataset(list(class_names), records, skipped, repaired=repaired)
