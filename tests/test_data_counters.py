"""Every skip and repair a reader counts reaches the data stage's summary (metrics/data.json)
and its printed line, for VOC, SBD and COCO alike, one test per counter (issue #18).

The VOC cases run the stage's voc_to_coco and summarise tasks (``.fn``, no Prefect engine)
on the fixture VOC + SBD trees, unpacked in place of the archives; the COCO cases on a
custom COCO split."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.archive_server import W, sbd_tgz, voc_tar
from PIL import Image

from bbam.data.prepare import summary_line
from bbam.data.records import DataError
from tasks.params import load_params
from tasks.prepare_data import summarise, voc_to_coco


def _unpack(archive: bytes, strip: str, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                out = dest / member.name.removeprefix(strip)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())


def _params(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return str(path)


def voc_tree(tmp_path: Path) -> tuple[Path, str]:
    """(VOC2012 folder, params path) of the fixture VOC (seg train/val) + SBD (train_aug)."""
    root = tmp_path / "voc"
    _unpack(voc_tar(), "VOCdevkit/", root)
    _unpack(sbd_tgz(), "benchmark_RELEASE/dataset/", root / "SBD")
    data = {
        "name": "voc",
        "root": str(root),
        "train_voc_split": "train_aug",
        "val_voc_split": "val",
        "train_json": str(root / "annotations/train.json"),
        "train_images": str(root / "VOC2012/JPEGImages"),
        "val_json": str(root / "annotations/val.json"),
        "val_images": str(root / "VOC2012/JPEGImages"),
    }
    return root / "VOC2012", _params(tmp_path, data)


def _add_object(voc: Path, image_id: str, name: str, box: tuple) -> None:
    xml = voc / "Annotations" / f"{image_id}.xml"
    x1, y1, x2, y2 = box
    obj = (
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )
    xml.write_text(xml.read_text().replace("</annotation>", obj + "</annotation>"))


def _missing_annotation(voc: Path) -> None:
    (voc / "Annotations" / "2008_000003.xml").unlink()  # an SBD image of train_aug


def _duplicate_id(voc: Path) -> None:
    val = voc / "ImageSets" / "Segmentation" / "val.txt"
    val.write_text(val.read_text() * 2)


def _zero_area_box(voc: Path) -> None:
    _add_object(voc, "2008_000001", "dog", (20, 5, 10, 30))


def _clipped_box(voc: Path) -> None:
    """The SBD cat's box starts at 0 (VOC is 1-based) and ends past the image."""
    xml = voc / "Annotations" / "2008_000003.xml"
    text = xml.read_text().replace("<xmin>6</xmin>", "<xmin>0</xmin>")
    xml.write_text(text.replace("<xmax>50</xmax>", f"<xmax>{W + 9}</xmax>"))


def _object_without_voc_mask(voc: Path) -> None:
    _add_object(voc, "2008_000001", "person", (40, 30, 60, 45))  # no index 3 in the PNG


def _object_without_sbd_mask(voc: Path) -> None:
    _add_object(voc, "2008_000004", "dog", (40, 2, 60, 15))  # no SBD instance matches it


VOC_CASES = {
    "missing_annotation": (_missing_annotation, "train", "skipped"),
    "duplicate_id": (_duplicate_id, "val", "skipped"),
    "zero_area_box": (_zero_area_box, "train", "skipped"),
    "object_without_mask (VOC PNG)": (_object_without_voc_mask, "train", "skipped"),
    "object_without_mask (SBD)": (_object_without_sbd_mask, "train", "skipped"),
    "clipped_box": (_clipped_box, "train", "repaired"),
}


@pytest.mark.parametrize("case", list(VOC_CASES))
def test_voc_and_sbd_counters_reach_the_stage_summary(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # the image check cache is written under ./data
    damage, split, kind = VOC_CASES[case]
    counter = case.split()[0]
    voc, params_path = voc_tree(tmp_path)
    damage(voc)
    voc_to_coco.fn(load_params(params_path))
    summary = summarise.fn(load_params(params_path))
    assert summary[split][kind] == {counter: 1}
    other = "skipped" if kind == "repaired" else "repaired"
    assert summary[split][other] == {}
    assert f"{kind} {counter}=1" in summary_line(summary[split])
    json.dumps(summary)  # what metrics/data.json holds


def _png(path: Path, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


def coco_split(tmp_path: Path, annotations: list[dict], images: int = 2) -> str:
    """A custom COCO train split (and a clean val) of `images` 40x30 PNGs; params path."""
    folder = tmp_path / "mydata"
    entries = []
    for i in range(1, images + 1):
        _png(folder / "images" / f"im{i}.png")
        entries.append({"id": i, "file_name": f"im{i}.png", "width": 40, "height": 30})
    categories = [{"id": 1, "name": "ring"}]
    (folder / "ann").mkdir(parents=True, exist_ok=True)
    for split, anns in (("train", annotations), ("val", [])):
        coco = {"images": entries, "categories": categories, "annotations": anns}
        (folder / "ann" / f"{split}.json").write_text(json.dumps(coco))
    data = {"name": "custom", "root": str(folder)}
    for split in ("train", "val"):
        data[f"{split}_json"] = str(folder / "ann" / f"{split}.json")
        data[f"{split}_images"] = str(folder / "images")
    return _params(tmp_path, data)


def _ann(i: int, **kw) -> dict:
    return {"id": i, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]} | kw


COCO_CASES = {
    "annotation_without_image": ([_ann(1, image_id=99)], "skipped"),
    "degenerate_polygon": ([_ann(1, segmentation=[[1, 1, 5, 5]])], "skipped"),
    "missing_bbox": ([{"id": 1, "image_id": 1, "category_id": 1}], "skipped"),
    "zero_area_box": ([_ann(1, bbox=[50, 2, 10, 10])], "skipped"),
    "clipped_box": ([_ann(1, bbox=[-3, 20, 10, 15])], "repaired"),
}


@pytest.mark.parametrize("counter", list(COCO_CASES))
def test_coco_counters_reach_the_stage_summary(tmp_path, monkeypatch, counter):
    monkeypatch.chdir(tmp_path)
    annotations, kind = COCO_CASES[counter]
    summary = summarise.fn(load_params(coco_split(tmp_path, annotations)))
    assert summary["train"][kind] == {counter: 1}
    assert f"{kind} {counter}=1" in summary_line(summary["train"])


def test_unreadable_image_reaches_the_stage_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_path = coco_split(tmp_path, [_ann(1)], images=3)
    image = tmp_path / "mydata" / "images" / "im2.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated: the header still reads
    summary = summarise.fn(load_params(params_path))
    assert summary["train"]["skipped"] == {"unreadable_image": 1}
    assert summary["train"]["images"] == 3 and summary["train"]["images_verified"] == 3
    assert list(summary["train"]["unreadable_images"]) == [str(image)]
    assert "skipped unreadable_image=1" in summary_line(summary["train"])


def test_unknown_category_in_custom_coco_stops_the_stage_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_path = coco_split(tmp_path, [_ann(1, category_id=7)])
    with pytest.raises(DataError, match=re.escape("train.json: annotation 1: unknown category")):
        summarise.fn(load_params(params_path))
