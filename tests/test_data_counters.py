"""Every skip and repair a reader counts reaches the data stage's summary (metrics/data.json)
and its printed line, for VOC, SBD and COCO alike, one test per counter (issue #18).

Each case runs the prepare_data flow's own body (``prepare_data.fn``, its tasks as plain
functions, no Prefect engine) and reads back metrics/data.json and the printed summary line.
The VOC cases damage the fixture VOC + SBD trees, unpacked in place of the archives; the
COCO cases a custom COCO split."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.archive_server import H, W, sbd_tgz, voc_tar
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


def _clipped_negative_origin(voc: Path) -> None:
    """xmin 0 in VOC's 1-based pixels is x = -1: only the origin runs outside."""
    xml = voc / "Annotations" / "2008_000003.xml"
    xml.write_text(xml.read_text().replace("<xmin>6</xmin>", "<xmin>0</xmin>"))


def _clipped_past_the_edge(voc: Path) -> None:
    xml = voc / "Annotations" / "2008_000003.xml"
    xml.write_text(xml.read_text().replace("<ymax>40</ymax>", f"<ymax>{H + 20}</ymax>"))


def _duplicate_sbd_id(voc: Path) -> None:
    """An id repeated within SBD's own train list (the lists' overlap is by design)."""
    listed = voc.parent / "SBD" / "train.txt"
    listed.write_text(listed.read_text() + "2008_000003\n")


def _sbd_instance_file_missing(voc: Path) -> None:
    """SBD lists 2008_000003 (one cat) but its inst .mat is gone: the cat has no mask."""
    (voc.parent / "SBD" / "inst" / "2008_000003.mat").unlink()


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
    "clipped_box (negative origin)": (_clipped_negative_origin, "train", "repaired"),
    "clipped_box (past the edge)": (_clipped_past_the_edge, "train", "repaired"),
    "duplicate_id (SBD list)": (_duplicate_sbd_id, "train", "skipped"),
    "object_without_mask (SBD inst .mat missing)": (_sbd_instance_file_missing, "train", "skipped"),
}


class _Direct:
    """A task run as its plain function (no Prefect engine), ``with_options`` included."""

    def __init__(self, fn):
        self.fn = fn

    def with_options(self, **_options):
        return self.fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def run_stage(params_path: str, monkeypatch, capsys) -> tuple[dict, str]:
    """The prepare_data flow's own body (flows.prepare_data.prepare_data.fn), its tasks run
    directly, the archives already unpacked: (metrics/data.json as written, printed text)."""
    import flows.prepare_data as stage

    monkeypatch.setattr(stage, "prepare", _Direct(lambda params: {}))
    monkeypatch.setattr(stage, "voc_to_coco", _Direct(voc_to_coco.fn))
    monkeypatch.setattr(stage, "summarise", _Direct(summarise.fn))
    monkeypatch.setattr(stage, "cached_in_data_root", lambda params: {})
    monkeypatch.setattr(stage, "publish_table", lambda *args, **kwargs: None)
    capsys.readouterr()
    stage.prepare_data.fn(load_params(params_path))
    printed = capsys.readouterr().out
    return json.loads(Path(stage.METRICS).read_text()), printed


def _check_reported(data: dict, printed: str, split: str, kind: str, counter: str) -> None:
    """The counter is in metrics/data.json and in the stage's printed summary line."""
    assert data[split][kind] == {counter: 1}, data[split]
    other = "skipped" if kind == "repaired" else "repaired"
    assert data[split][other] == {}
    line = next(line for line in printed.splitlines() if line.startswith("[bbam] prepare_data:"))
    part = next(p for p in line.split("; ") if f"{split}: " in p)
    assert f"{kind} {counter}=1" in part, line
    assert part.endswith(summary_line(data[split]))


@pytest.mark.parametrize("case", list(VOC_CASES))
def test_voc_and_sbd_counters_reach_the_stage_summary(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)  # metrics/ and the image check cache are written here
    damage, split, kind = VOC_CASES[case]
    counter = case.split()[0]
    voc, params_path = voc_tree(tmp_path)
    damage(voc)
    data, printed = run_stage(params_path, monkeypatch, capsys)
    _check_reported(data, printed, split, kind, counter)


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
    "clipped_box (negative origin)": ([_ann(1, bbox=[2, -4, 10, 10])], "repaired"),
    "clipped_box (past the edge)": ([_ann(1, bbox=[35, 2, 10, 10])], "repaired"),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_coco_counters_reach_the_stage_summary(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    annotations, kind = COCO_CASES[case]
    counter = case.split()[0]
    data, printed = run_stage(coco_split(tmp_path, annotations), monkeypatch, capsys)
    _check_reported(data, printed, "train", kind, counter)


def test_unreadable_image_reaches_the_stage_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params_path = coco_split(tmp_path, [_ann(1)], images=3)
    image = tmp_path / "mydata" / "images" / "im2.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated: the header still reads
    yaml_params = yaml.safe_load(Path(params_path).read_text())
    for split in ("train", "val"):  # the splits share the images; 1 of 3 is within the limit
        yaml_params["data"][f"max_unreadable_{split}"] = 0.5
    Path(params_path).write_text(yaml.safe_dump(yaml_params))
    data, printed = run_stage(params_path, monkeypatch, capsys)
    _check_reported(data, printed, "train", "skipped", "unreadable_image")
    assert data["train"]["images"] == 3 and data["train"]["images_verified"] == 3
    assert list(data["train"]["unreadable_images"]) == [str(image)]


def test_unknown_category_in_custom_coco_stops_the_stage_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_path = coco_split(tmp_path, [_ann(1, category_id=7)])
    with pytest.raises(DataError, match=re.escape("train.json: annotation 1: unknown category")):
        summarise.fn(load_params(params_path))


def test_unknown_class_is_counted_when_a_reader_is_told_to_skip(tmp_path):
    """The stage stops on an unknown class (above); a reader asked to skip (``unknown="skip"``)
    counts it instead, and the count reaches the summary and its line, VOC and COCO alike."""
    from bbam.data.coco import read_coco
    from bbam.data.prepare import summarize_dataset
    from bbam.data.voc import read_voc

    voc, _params_path = voc_tree(tmp_path)
    _add_object(voc, "2008_000001", "dragon", (40, 30, 60, 45))
    for dataset in (
        read_voc(voc.parent, "train", unknown="skip"),
        read_coco(*_coco_with_unknown(tmp_path), unknown="skip"),
    ):
        summary = summarize_dataset(dataset)
        assert summary["skipped"] == {"unknown_class": 1}
        assert "skipped unknown_class=1" in summary_line(summary)


def _coco_with_unknown(tmp_path: Path) -> tuple[str, str]:
    params = yaml.safe_load(
        Path(coco_split(tmp_path, [_ann(1), _ann(2, category_id=7)])).read_text()
    )
    return params["data"]["train_json"], params["data"]["train_images"]
