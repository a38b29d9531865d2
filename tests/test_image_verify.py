"""The data stage's image verification (bbam.data.verify): a full decode finds what a header
read misses, results are cached by size and mtime, the limits stop the stage, and later
stages drop what it found instead of crashing (issue #18, item 1)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import bbam.data.verify as verify
from bbam.data.images import image_size
from bbam.data.torch_dataset import DetectionDataset
from tasks.params import load_params, load_split
from tasks.prepare_data import summarise


def _jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def bad_images(folder: Path) -> dict[str, Path]:
    """A good JPEG and the three kinds of bad file the probe found."""
    good = _jpeg(folder / "good.jpg")
    truncated = _jpeg(folder / "truncated.jpg", 1)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"\x00garbage" * 50)
    return {"good": good, "truncated": truncated, "garbage": garbage, "missing": folder / "no.jpg"}


def test_full_decode_finds_truncated_garbage_and_missing_files(tmp_path):
    files = bad_images(tmp_path / "img")
    assert image_size(files["truncated"]) == (40, 30), "the header alone looks fine"
    found = verify.verify_images(files.values(), cache=tmp_path / "cache.json")
    assert set(found) == {str(files[k]) for k in ("truncated", "garbage", "missing")}
    assert found[str(files["missing"])] == "image file not found"
    assert "truncated" in found[str(files["truncated"])]
    assert found[str(files["garbage"])].startswith("unreadable or corrupt image")


def test_image_over_pillows_pixel_limit_is_recorded_not_fatal(tmp_path):
    """A header claiming 200 Mpx raised DecompressionBombError out of the reader and the check,
    stopping the data stage; now the reader takes the JSON's size and the check records it."""
    from bbam.data.coco import read_coco

    image = tmp_path / "img" / "big.bmp"
    image.parent.mkdir()
    Image.new("RGB", (4, 4)).save(image)
    raw = bytearray(image.read_bytes())
    raw[18:26] = struct.pack("<ii", 20000, 10000)  # width, height in the DIB header
    image.write_bytes(bytes(raw))
    ann = {"images": [{"id": 1, "file_name": "big.bmp", "width": 20000, "height": 10000}]}
    (tmp_path / "a.json").write_text(json.dumps(ann | {"categories": [], "annotations": []}))
    assert read_coco(tmp_path / "a.json", tmp_path / "img").records[0].path == image
    found = verify.verify_images([image], cache=None)
    assert found[str(image)].startswith("unreadable or corrupt image (Image size (200000000 pix")


def test_parallel_workers_give_the_same_answer(tmp_path, monkeypatch):
    files = bad_images(tmp_path / "img")
    monkeypatch.setattr(verify, "PARALLEL_FROM", 1)
    found = verify.verify_images(files.values(), cache=None, workers=2)
    assert found == verify.verify_images(files.values(), cache=None, workers=1)
    assert len(found) == 3


def test_cache_skips_unchanged_files_and_rechecks_changed_ones(tmp_path, monkeypatch):
    files = bad_images(tmp_path / "img")
    cache = tmp_path / "cache.json"
    first = verify.verify_images(files.values(), cache=cache)
    decoded: list[str] = []
    original = verify.check_image
    monkeypatch.setattr(verify, "check_image", lambda p: decoded.append(p) or original(p))
    assert verify.verify_images(files.values(), cache=cache) == first
    assert decoded == [], "unchanged files are not decoded again"
    _jpeg(files["truncated"], 2)  # repaired in place: new size and mtime
    os.utime(files["truncated"], ns=(1, 1))
    again = verify.verify_images(files.values(), cache=cache)
    assert decoded == [str(files["truncated"])]
    assert str(files["truncated"]) not in again and str(files["garbage"]) in again


def test_limit_error_names_the_first_files_per_split():
    bad = {f"/d/{i}.jpg": "unreadable or corrupt image (x)" for i in range(7)}
    summary = {
        "train": {"images_verified": 1000, "unreadable_images": bad},
        "val": {"images_verified": 10, "unreadable_images": {"/d/v.jpg": "image file not found"}},
    }
    assert verify.unreadable_limit_error(summary, {"train": 0.01, "val": 0.1}) == ""
    error = verify.unreadable_limit_error(summary, verify.unreadable_limits({}))
    assert error.startswith("val: 1 of 10 images are unreadable")
    assert "/d/v.jpg: image file not found" in error and "train" not in error
    error = verify.unreadable_limit_error(summary, {"train": 0.001, "val": 1.0})
    assert "/d/0.jpg" in error and "/d/4.jpg" in error and "/d/5.jpg" not in error
    assert "(and 2 more)" in error and "data.max_unreadable_train" in error


def _custom_split(tmp_path: Path) -> dict:
    """Params of a custom COCO dataset whose train split has one image of each bad kind."""
    files = bad_images(tmp_path / "mydata" / "images")
    images = [
        {"id": i, "file_name": p.name, "width": 40, "height": 30}
        for i, p in enumerate(files.values(), start=1)
    ]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 20, 20]}
        for i in range(1, len(images) + 1)
    ]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    ann = tmp_path / "mydata" / "train.json"
    ann.write_text(json.dumps(coco))
    val = tmp_path / "mydata" / "val.json"
    val.write_text(json.dumps(coco | {"images": images[:1], "annotations": annotations[:1]}))
    data = {"name": "custom", "root": "mydata", "train_json": str(ann), "val_json": str(val)}
    data |= {"train_images": str(files["good"].parent), "val_images": str(files["good"].parent)}
    return {"data": data}


def test_later_stages_drop_what_the_data_stage_found_and_loaders_do_not_crash(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    params = _custom_split(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    summary = summarise.fn(load_params("params.yaml"))
    assert len(summary["train"]["unreadable_images"]) == 3 and summary["train"]["images"] == 4
    assert verify.unreadable_limit_error(summary, verify.unreadable_limits(params["data"]))

    train = load_split(params, "train", with_masks=False)
    assert [r.path.name for r in train.records] == ["good.jpg"]
    assert train.skipped.counts == {"unreadable_image": 3}
    assert any("truncated.jpg" in e for e in train.skipped.examples["unreadable_image"])
    for image, target in DetectionDataset(train.records):  # what the training loaders read
        assert image.shape == (3, 30, 40) and len(target["boxes"]) == 1


def test_params_schema_checks_the_new_data_keys():
    from flows.params_schema import ParamsError, check_params

    check_params({"data": {"max_unreadable_train": 0.05, "verify_workers": 2}}, "p.yaml")
    for bad in ({"max_unreadable_val": 1.5}, {"verify_workers": -1}, {"max_unreadable_train": "x"}):
        with pytest.raises(ParamsError, match=f"data.{next(iter(bad))}"):
            check_params({"data": bad}, "p.yaml")
