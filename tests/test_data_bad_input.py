"""Bad input, one test per case: a clear DataError naming the file, or a counted skip."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbam.data.coco import read_coco
from bbam.data.images import image_size, load_rgb
from bbam.data.records import DataError
from bbam.data.voc import read_voc

CLASSES = ["ring", "star"]


def _voc(root: Path, objects_xml: str, width: int = 40, height: int = 30) -> Path:
    voc = root / "VOC2012"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("im\n")
    xml = voc / "Annotations" / "im.xml"
    xml.write_text(
        f"<annotation><filename>im.jpg</filename><size><width>{width}</width>"
        f"<height>{height}</height></size>{objects_xml}</annotation>"
    )
    return xml


def _obj(name: str, box: tuple) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def _jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, quality=90)


# ------------------------------------------------------------------ images


def test_missing_image_names_file(tmp_path):
    with pytest.raises(DataError, match="nothere.jpg"):
        load_rgb(tmp_path / "nothere.jpg")


def test_corrupt_image_names_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match="junk.jpg"):
        load_rgb(path)


def test_truncated_image_names_file(tmp_path):
    path = tmp_path / "cut.jpg"
    _jpeg(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        load_rgb(path)


def _bomb_header_bmp(path: Path) -> Path:
    """A 4x4 BMP whose header claims 20000x10000 pixels (a corrupt header, or a huge scan):
    over Pillow's decompression-bomb limit."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "BMP")
    raw = bytearray(buffer.getvalue())
    raw[18:26] = struct.pack("<ii", 20000, 10000)  # width, height in the DIB header
    path.write_bytes(bytes(raw))
    return path


def test_image_over_pillows_pixel_limit_names_file(tmp_path):
    """DecompressionBombError (not an OSError) escaped without the file's name."""
    path = _bomb_header_bmp(tmp_path / "big.bmp")
    for read in (load_rgb, image_size):
        with pytest.raises(DataError, match=r"big\.bmp: unreadable or corrupt image .*pixels"):
            read(path)


def test_grayscale_image_becomes_rgb(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((5, 6), 77, np.uint8), mode="L").save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (5, 6, 3) and rgb.dtype == np.uint8 and (rgb == 77).all()


def test_rgba_image_becomes_rgb(tmp_path):
    path = tmp_path / "a.png"
    arr = np.zeros((5, 6, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, 128
    Image.fromarray(arr, mode="RGBA").save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (5, 6, 3) and (rgb[..., 0] == 200).all() and (rgb[..., 1:] == 0).all()


def test_cmyk_image_becomes_rgb(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (6, 5), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    rgb = load_rgb(path).astype(int)
    assert rgb.shape == (5, 6, 3)
    assert (rgb[..., 0] > 200).all() and (rgb[..., 1] < 60).all() and (rgb[..., 2] < 60).all()


def test_16bit_png_becomes_8bit_rgb(tmp_path):
    path = tmp_path / "d.png"
    arr = np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(path)
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0, 0] == 0 and rgb[0, 1, 1] == 255 and 120 <= rgb[1, 0, 2] <= 135


def test_readers_do_not_decode_images(tmp_path):
    """A broken image does not stop reading; it surfaces later, in load_rgb."""
    _voc(tmp_path, _obj("ring", (1, 1, 10, 10)))
    (tmp_path / "VOC2012/JPEGImages/im.jpg").write_bytes(b"broken")
    ds = read_voc(tmp_path, "train", classes=CLASSES)
    with pytest.raises(DataError, match="im.jpg"):
        load_rgb(ds.records[0].path)


# ------------------------------------------------------------------ boxes and classes


def test_box_outside_image_is_clipped(tmp_path):
    _voc(tmp_path, _obj("ring", (-5, 3, 60, 45)))
    ds = read_voc(tmp_path, "train", classes=CLASSES, with_masks=False)
    np.testing.assert_array_equal(ds.records[0].instances[0].box, [0, 2, 40, 30])
    assert ds.skipped.total == 0


def test_zero_area_box_skipped_and_counted(tmp_path):
    _voc(
        tmp_path,
        _obj("ring", (5, 5, 4, 20)) + _obj("star", (50, 1, 60, 9)) + _obj("star", (2, 2, 9, 9)),
    )
    ds = read_voc(tmp_path, "train", classes=CLASSES)
    assert [i.label for i in ds.records[0].instances] == [2]
    assert ds.skipped.counts == {"zero_area_box": 2}
    assert "im.xml" in ds.skipped.examples["zero_area_box"][0]


def test_zero_area_coco_box_skipped_and_counted(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "x.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "ring"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5]}],
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    ds = read_coco(path, tmp_path)
    assert ds.records[0].instances == [] and ds.skipped.counts == {"zero_area_box": 1}


def test_unknown_class_name_raises_or_is_counted(tmp_path):
    xml = _voc(tmp_path, _obj("unicorn", (1, 1, 5, 5)) + _obj("ring", (1, 1, 9, 9)))
    with pytest.raises(DataError, match=r"im\.xml.*unicorn"):
        read_voc(tmp_path, "train", classes=CLASSES)
    ds = read_voc(tmp_path, "train", classes=CLASSES, unknown="skip")
    assert [i.label for i in ds.records[0].instances] == [1]
    assert ds.skipped.counts == {"unknown_class": 1}
    assert ds.skipped.examples["unknown_class"] == [f"{xml}: unicorn"]


def test_non_numeric_coordinate_names_file(tmp_path):
    _voc(tmp_path, _obj("ring", ("one", 1, 5, 5)))
    with pytest.raises(DataError, match=r"im\.xml.*xmin"):
        read_voc(tmp_path, "train", classes=CLASSES)


# ------------------------------------------------------------------ malformed files


def test_malformed_xml_names_file(tmp_path):
    xml = _voc(tmp_path, "")
    xml.write_text("<annotation><object><name>ring</name></annotation")
    with pytest.raises(DataError, match=r"im\.xml: malformed XML"):
        read_voc(tmp_path, "train", classes=CLASSES)


def test_billion_laughs_refused(tmp_path):
    xml = _voc(tmp_path, "")
    lol = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 9))
    xml.write_text(
        f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY l0 "lol">{lol}]>'
        "<annotation><filename>&l8;</filename></annotation>"
    )
    with pytest.raises(DataError, match=r"im\.xml: forbidden XML construct"):
        read_voc(tmp_path, "train", classes=CLASSES)


def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [ {"id": 1,, }')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON"):
        read_coco(path, tmp_path)


def test_json_without_images_list_names_file(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"images": {}, "categories": []}))
    with pytest.raises(DataError, match=r"odd\.json.*'images'"):
        read_coco(path, tmp_path)


def test_loaded_images_are_writable(tmp_path):
    """C extensions such as pydensecrf refuse read-only buffers."""
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(path)
    assert load_rgb(path).flags.writeable
