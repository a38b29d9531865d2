"""Atomic writers for the real annotation formats (VOC XML, COCO instances JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from xml.etree.ElementTree import Element, SubElement, indent, tostring

from bbam.atomic import atomic_write_bytes, atomic_write_json  # also imported from here
from bbam.data.masks import mask_to_rle  # also imported from here
from bbam.data.records import Dataset, ImageRecord

SOURCE_REPORTS = "bbam_source_reports"  # key in a COCO file's "info"
# Key in a COCO image entry: compressed RLE of the image's void region (`ImageRecord.void`,
# VOC's 255 band). COCO files may carry extra keys; pycocotools and other readers skip it.
VOID_KEY = "bbam_void"
# What `coco_dict` carries over from a source dataset, versioned: prepared files written by
# an older version are rebuilt (`tasks.prepare_data.voc_to_coco`). 2: the VOC void region.
PREPARED_FORMAT = 2


def write_voc_xml(path: str | Path, record: ImageRecord, classes: Sequence[str]) -> None:
    """VOC XML for one image. Boxes go from 0-based exclusive to VOC's 1-based inclusive:
    xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2 (rounded to integers).
    `truncated` is 1 when the box touches the image border."""
    root = Element("annotation")
    SubElement(root, "folder").text = "VOC2012"
    SubElement(root, "filename").text = record.path.name
    size = SubElement(root, "size")
    SubElement(size, "width").text = str(int(record.width))
    SubElement(size, "height").text = str(int(record.height))
    SubElement(size, "depth").text = "3"
    SubElement(root, "segmented").text = "1" if any(i.has_mask for i in record.instances) else "0"
    for inst in record.instances:
        x1, y1, x2, y2 = (int(round(float(v))) for v in inst.box)
        obj = SubElement(root, "object")
        SubElement(obj, "name").text = classes[inst.label - 1]
        SubElement(obj, "pose").text = "Unspecified"
        touches = x1 <= 0 or y1 <= 0 or x2 >= record.width or y2 >= record.height
        SubElement(obj, "truncated").text = "1" if touches else "0"
        SubElement(obj, "difficult").text = "1" if inst.difficult else "0"
        bnd = SubElement(obj, "bndbox")
        SubElement(bnd, "xmin").text = str(x1 + 1)
        SubElement(bnd, "ymin").text = str(y1 + 1)
        SubElement(bnd, "xmax").text = str(x2)
        SubElement(bnd, "ymax").text = str(y2)
    indent(root)
    atomic_write_bytes(path, tostring(root, encoding="utf-8", xml_declaration=False) + b"\n")


def coco_dict(
    dataset: Dataset,
    image_root: str | Path | None = None,
    category_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
) -> dict:
    """COCO instances dict. `file_name` is relative to `image_root` (default: the bare file name).
    Image ids are `image_ids` (default 1..N in record order), annotation ids are the instance ids, category ids are
    `category_ids[label-1]` (default: the label itself). Masks become compressed RLE, as does
    a record's void region (the image entry's `VOID_KEY`). `area` is the instance's own
    (`Instance.area`, as read from a COCO file), else the mask's pixel count, else the box's."""
    cat_ids = list(category_ids) if category_ids else list(range(1, len(dataset.classes) + 1))
    categories = [
        {"id": int(cid), "name": name, "supercategory": "object"}
        for cid, name in zip(cat_ids, dataset.classes, strict=True)
    ]
    images, annotations = [], []
    next_ann = 1
    ids = list(image_ids) if image_ids is not None else list(range(1, len(dataset.records) + 1))
    if len(ids) != len(dataset.records):
        raise ValueError("image_ids must have one id per record")
    for image_id, record in zip(ids, dataset.records, strict=True):
        image_id = int(image_id)
        if image_root is not None:
            file_name = Path(record.path).relative_to(Path(image_root)).as_posix()
        else:
            file_name = Path(record.path).name
        image = {
            "id": image_id,
            "file_name": file_name,
            "width": int(record.width),
            "height": int(record.height),
        }
        if record.void is not None:
            image[VOID_KEY] = mask_to_rle(record.void.decode())
        images.append(image)
        for inst in record.instances:
            x1, y1, x2, y2 = (float(v) for v in inst.box)
            ann = {
                "id": int(inst.instance_id) if inst.instance_id > 0 else next_ann,
                "image_id": image_id,
                "category_id": int(cat_ids[inst.label - 1]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": int(bool(inst.iscrowd)),
            }
            if inst.has_mask:
                ann["segmentation"] = mask_to_rle(inst.mask)
            if inst.area is not None:
                ann["area"] = float(inst.area)
            elif inst.has_mask:
                ann["area"] = float(inst.mask_area)
            else:
                ann["area"] = float((x2 - x1) * (y2 - y1))
            if inst.difficult:
                ann["difficult"] = 1
            annotations.append(ann)
            next_ann = max(next_ann, ann["id"]) + 1
    info: dict = {"description": "written by bbam.data.writers"}
    # What the source reader skipped or repaired (VOC -> COCO): the COCO reader adds it to its
    # own counts, so the data summary reports it however often the file is read back.
    source = {
        key: report.as_dict()
        for key, report in (("skipped", dataset.skipped), ("repaired", dataset.repaired))
        if report.counts
    }
    if source:
        info[SOURCE_REPORTS] = source
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco_json(
    path: str | Path,
    dataset: Dataset,
    image_root: str | Path | None = None,
    category_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
) -> None:
    """Write `coco_dict(dataset, ...)` atomically (see there for the id conventions)."""
    atomic_write_json(path, coco_dict(dataset, image_root, category_ids, image_ids))
