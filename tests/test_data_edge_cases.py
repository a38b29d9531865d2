"""Real-world oddities in COCO and VOC inputs that the other reader tests do not cover:
each is either read correctly, raises a DataError naming the file, or is counted as skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbam.data.coco import read_coco
from bbam.data.records import DataError
from bbam.data.voc import read_voc
from bbam.data.writers import mask_to_rle

W, H = 40, 30
CLASSES = ["ring", "star"]


def _coco(tmp_path: Path, images=None, annotations=None, categories=None) -> Path:
    """An instances JSON (one 40x30 image `a.jpg`, one ring box unless given) beside `imgs/`."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    data = {
        "images": images or [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}],
        "categories": categories or [{"id": 1, "name": "ring"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}]
        if annotations is None
        else annotations,
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _ann(**fields) -> dict:
    return {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], **fields}


# ------------------------------------------------------------------ COCO ids and categories


def test_coco_duplicate_image_id_raises(tmp_path):
    """The second image used to replace the first, taking its annotations with it."""
    images = [
        {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
        {"id": 1, "file_name": "b.jpg", "width": W, "height": H},
    ]
    with pytest.raises(DataError, match=r"ann\.json: image id 1 .*more than once"):
        read_coco(_coco(tmp_path, images=images), tmp_path / "imgs")


def test_coco_duplicate_annotation_id_raises(tmp_path):
    """Instance ids key the attribution and pseudo-label manifests: two rows must not merge."""
    path = _coco(tmp_path, annotations=[_ann(), _ann(bbox=[20, 5, 8, 8])])
    with pytest.raises(
        DataError, match=r"ann\.json: annotation 1: annotation id 1 .*more than once"
    ):
        read_coco(path, tmp_path / "imgs")


def test_coco_string_ids_match_their_integers(tmp_path):
    """Image and category ids are read with int(); the annotations' references must match the
    same way (a string image_id used to orphan the annotation, a string category_id to raise)."""
    path = _coco(tmp_path, annotations=[_ann(image_id="1", category_id="1")])
    ds = read_coco(path, tmp_path / "imgs")
    assert [i.label for i in ds.records[0].instances] == [1] and ds.skipped.total == 0


def test_coco_non_contiguous_category_ids(tmp_path):
    categories = [{"id": 90, "name": "z"}, {"id": 1, "name": "a"}, {"id": 5, "name": "f"}]
    path = _coco(tmp_path, categories=categories, annotations=[_ann(category_id=90)])
    ds = read_coco(path, tmp_path / "imgs")
    assert ds.classes == ["a", "f", "z"] and ds.category_ids == [1, 5, 90]
    assert ds.records[0].instances[0].label == 3


@pytest.mark.parametrize(
    ("second", "problem"),
    [({"id": 1, "name": "star"}, "category id 1"), ({"id": 2, "name": "ring"}, "name 'ring'")],
)
def test_coco_category_listed_twice_raises(tmp_path, second, problem):
    """A repeated category used to become a second, never-used label with the same name."""
    path = _coco(tmp_path, categories=[{"id": 1, "name": "ring"}, second])
    with pytest.raises(DataError, match=rf"ann\.json: .*{problem} is listed more than once"):
        read_coco(path, tmp_path / "imgs")


def test_coco_category_without_name_names_file(tmp_path):
    with pytest.raises(DataError, match=r"ann\.json: category without a valid id"):
        read_coco(_coco(tmp_path, categories=[{"id": 1}]), tmp_path / "imgs")


# ------------------------------------------------------------------ COCO boxes and flags


@pytest.mark.parametrize("bbox", [[float("nan"), 2, 5, 5], [2, 2, float("inf"), 5], [1, 2, 3]])
def test_coco_non_finite_or_short_bbox_raises(tmp_path, bbox):
    """NaN boxes used to pass through as NaN coordinates, inf ones were clipped to the border."""
    path = _coco(tmp_path, annotations=[_ann(bbox=bbox)])
    with pytest.raises(DataError, match=r"ann\.json: annotation 1: invalid bbox"):
        read_coco(path, tmp_path / "imgs")


def test_coco_negative_size_bbox_is_counted(tmp_path):
    path = _coco(tmp_path, annotations=[_ann(bbox=[20, 5, -5, 10])])
    ds = read_coco(path, tmp_path / "imgs")
    assert ds.records[0].instances == [] and ds.skipped.counts == {"zero_area_box": 1}


def test_coco_iscrowd_flag_values(tmp_path):
    """The string "0" used to count as crowd (bool("0") is True); a missing flag is 0."""
    anns = [_ann(id=1, iscrowd="0"), _ann(id=2, iscrowd=1), _ann(id=3)]
    ds = read_coco(_coco(tmp_path, annotations=anns), tmp_path / "imgs")
    assert [i.iscrowd for i in ds.records[0].instances] == [False, True, False]
    path = _coco(tmp_path, annotations=[_ann(iscrowd="yes")])
    with pytest.raises(DataError, match=r"ann\.json: annotation 1: iscrowd must be 0 or 1"):
        read_coco(path, tmp_path / "imgs")


def test_coco_invalid_annotation_id_names_file(tmp_path):
    path = _coco(tmp_path, annotations=[_ann(id="abc")])
    with pytest.raises(DataError, match=r"ann\.json: annotation abc: invalid annotation id"):
        read_coco(path, tmp_path / "imgs")


# ------------------------------------------------------------------ COCO image entries


@pytest.mark.parametrize("file_name", ["../a.jpg", "sub/../../a.jpg", "/etc/passwd"])
def test_coco_file_name_outside_image_root_raises(tmp_path, file_name):
    images = [{"id": 1, "file_name": file_name, "width": W, "height": H}]
    with pytest.raises(DataError, match=r"ann\.json: file name .* is outside the image folder"):
        read_coco(_coco(tmp_path, images=images), tmp_path / "imgs")


def test_coco_absolute_file_name_inside_root_and_unicode_names_are_read(tmp_path):
    inside = str((tmp_path / "imgs" / "sub" / "b.jpg").absolute())
    images = [
        {"id": 1, "file_name": "Ünïcödé 猫.jpg", "width": W, "height": H},
        {"id": 2, "file_name": inside, "width": W, "height": H},
    ]
    ds = read_coco(_coco(tmp_path, images=images), tmp_path / "imgs")
    assert [r.image_id for r in ds.records] == ["Ünïcödé 猫", "b"]
    assert ds.records[1].path == Path(inside)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": 1, "file_name": "", "width": W, "height": H}, "invalid file_name"),
        ({"id": 1, "file_name": None, "width": W, "height": H}, "invalid file_name"),
        ({"id": 1, "file_name": "a.jpg", "width": "wide", "height": H}, "invalid width/height"),
    ],
)
def test_coco_invalid_image_entry_names_file(tmp_path, entry, problem):
    with pytest.raises(DataError, match=rf"ann\.json: image .*{problem}"):
        read_coco(_coco(tmp_path, images=[entry]), tmp_path / "imgs")


# ------------------------------------------------------------------ COCO segmentations


def _square() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[5:20, 5:30] = True
    return mask


def test_coco_empty_segmentation_means_no_mask(tmp_path):
    """Box-only exports write "segmentation": []; that used to become an all-zero GT mask,
    which teaches "background" and scores IoU 0."""
    ds = read_coco(_coco(tmp_path, annotations=[_ann(segmentation=[])]), tmp_path / "imgs")
    (instance,) = ds.records[0].instances
    assert instance.mask is None and ds.skipped.total == 0


def test_coco_polygon_with_odd_coordinate_count_raises(tmp_path):
    """pycocotools ignored the dangling coordinate and drew a different polygon."""
    path = _coco(tmp_path, annotations=[_ann(segmentation=[[2, 2, 12, 2, 12, 12, 2]])])
    with pytest.raises(DataError, match=r"ann\.json: annotation 1: polygon with an odd number"):
        read_coco(path, tmp_path / "imgs")


@pytest.mark.parametrize(
    "polygon",
    [[10, 10, 20, 10, 30, 10], [10.1, 10.1, 10.3, 10.1, 10.3, 10.3, 10.1, 10.3]],
    ids=["collinear", "sub-pixel"],
)
def test_coco_polygon_covering_no_pixel_means_no_mask_and_is_counted(tmp_path, polygon):
    """3+ points that rasterise to nothing used to leave an empty GT mask (has_mask True)."""
    ds = read_coco(_coco(tmp_path, annotations=[_ann(segmentation=[polygon])]), tmp_path / "imgs")
    (instance,) = ds.records[0].instances
    assert not instance.has_mask and ds.skipped.counts == {"empty_mask": 1}


@pytest.mark.parametrize("points", [4, 8])
def test_coco_polygon_as_point_pairs_raises(tmp_path, points):
    """[[x, y], ...] (labelme) was counted as degenerate (<= 5 points) or failed obscurely."""
    pairs = [[2 + i, 2 + (i * 7) % 10] for i in range(points)]
    path = _coco(tmp_path, annotations=[_ann(segmentation=[pairs])])
    with pytest.raises(DataError, match=r"ann\.json: annotation 1: polygon must be a flat \["):
        read_coco(path, tmp_path / "imgs")


def test_coco_rle_counts_must_cover_the_whole_mask(tmp_path):
    """Counts that fall short left the rest of the mask as uninitialised memory."""
    rle = mask_to_rle(_square())
    short = {"size": [H, W], "counts": rle["counts"][:-2]}  # the last (zero) run cut off
    uncompressed = {"size": [H, W], "counts": [60, 5, 10]}
    for n, segm in enumerate((short, uncompressed), start=1):
        path = _coco(tmp_path, annotations=[_ann(id=n, segmentation=segm)])
        with pytest.raises(DataError, match=rf"ann\.json: annotation {n}: RLE counts cover"):
            read_coco(path, tmp_path / "imgs")


def test_coco_rle_size_must_match_the_image(tmp_path):
    path = _coco(tmp_path, annotations=[_ann(segmentation={"size": [20, 20], "counts": [400]})])
    with pytest.raises(DataError, match=r"annotation 1: mask size \(20, 20\) differs"):
        read_coco(path, tmp_path / "imgs")


def test_coco_uncompressed_rle_on_a_non_crowd_instance(tmp_path):
    # column-major runs of _square(): 5 empty columns and 5 rows, then 25 columns of 15 pixels
    counts = [5 * H + 5, 15] + [H - 15, 15] * 24 + [H * W - (5 * H + 5) - 15 - 24 * H]
    path = _coco(tmp_path, annotations=[_ann(segmentation={"size": [H, W], "counts": counts})])
    (instance,) = read_coco(path, tmp_path / "imgs").records[0].instances
    np.testing.assert_array_equal(instance.mask, _square())
    assert not instance.iscrowd


# ------------------------------------------------------------------ image sizes


def test_coco_size_disagreeing_with_the_image_file_raises(tmp_path):
    """Masks and boxes were sized from the JSON although the file is larger."""
    path = _coco(tmp_path, annotations=[_ann(segmentation=[[2, 2, 12, 2, 12, 12, 2, 12]])])
    Image.new("RGB", (W + 10, H)).save(tmp_path / "imgs" / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg: image is 50x30 but .*ann\.json says 40x30"):
        read_coco(path, tmp_path / "imgs")


def test_coco_size_missing_from_json_is_read_from_the_file(tmp_path):
    path = _coco(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}])
    Image.new("RGB", (W + 10, H)).save(tmp_path / "imgs" / "a.jpg")
    record = read_coco(path, tmp_path / "imgs").records[0]
    assert (record.width, record.height) == (W + 10, H)


def _voc(root: Path, objects: str = "", size: str | None = None, ids: bytes = b"im\n") -> Path:
    """VOC2012 under `root` listing `ids` in train.txt, each with the same XML; returns the XML
    of `im`. `size` replaces the <size> element (default 40x30)."""
    voc = root / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets/Segmentation/train.txt").write_bytes(ids)
    if size is None:
        size = f"<size><width>{W}</width><height>{H}</height></size>"
    for image_id in ("im", "im2"):
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename>{size}{objects}</annotation>"
        )
    return voc / "Annotations" / "im.xml"


def _object(name: str = "ring", box=(3, 3, 12, 12), extra: str = "") -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name>{extra}<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def test_voc_size_disagreeing_with_the_jpeg_raises(tmp_path):
    _voc(tmp_path, _object())
    Image.new("RGB", (W, H + 5)).save(tmp_path / "VOC2012/JPEGImages/im.jpg")
    with pytest.raises(DataError, match=r"im\.jpg: image is 40x35 but .*im\.xml says 40x30"):
        read_voc(tmp_path, "train", classes=CLASSES)


@pytest.mark.parametrize("size", ["", "<size><width>0</width><height>0</height></size>"])
def test_voc_missing_or_zero_size_is_read_from_the_jpeg(tmp_path, size):
    _voc(tmp_path, _object(), size=size)
    Image.new("RGB", (W + 10, H)).save(tmp_path / "VOC2012/JPEGImages/im.jpg")
    record = read_voc(tmp_path, "train", classes=CLASSES).records[0]
    assert (record.width, record.height) == (W + 10, H)


# ------------------------------------------------------------------ VOC XML


@pytest.mark.parametrize(("tag", "box"), [("xmin", ("nan", 3, 12, 12)), ("xmax", (3, 3, "inf", 9))])
def test_voc_non_finite_coordinate_raises(tmp_path, tag, box):
    """float() accepts "nan" and "inf": the box used to hold NaN or reach the border."""
    _voc(tmp_path, _object(box=box))
    with pytest.raises(DataError, match=rf"im\.xml: <{tag}> is not a finite number"):
        read_voc(tmp_path, "train", classes=CLASSES, with_masks=False)


def test_voc_float_coordinates_are_kept(tmp_path):
    _voc(tmp_path, _object(box=(3.5, 2.5, 12.25, 10)))
    (instance,) = read_voc(tmp_path, "train", classes=CLASSES).records[0].instances
    np.testing.assert_array_equal(instance.box, [2.5, 1.5, 12.25, 10])


def test_voc_difficult_flag_values(tmp_path):
    """ "false" and "0.0" used to read as difficult (anything but "0" or empty did)."""
    flags = ["", "<difficult>1</difficult>", "<difficult> 0 </difficult>"]
    flags += ["<difficult>true</difficult>", "<difficult>False</difficult>"]
    _voc(tmp_path, "".join(_object(extra=f) for f in flags))
    ds = read_voc(tmp_path, "train", classes=CLASSES)
    assert [i.difficult for i in ds.records[0].instances] == [False, True, False, True, False]
    _voc(tmp_path, _object(extra="<difficult>0.0</difficult>"))
    with pytest.raises(DataError, match=r"im\.xml: <difficult> must be 0 or 1, got '0\.0'"):
        read_voc(tmp_path, "train", classes=CLASSES)


def test_voc_class_names_are_stripped_but_case_sensitive(tmp_path):
    _voc(tmp_path, _object(name=" star\n"))
    assert read_voc(tmp_path, "train", classes=CLASSES).records[0].instances[0].label == 2
    _voc(tmp_path, _object(name="Star "))
    with pytest.raises(DataError, match=r"im\.xml: unknown class name 'Star'"):
        read_voc(tmp_path, "train", classes=CLASSES)


@pytest.mark.parametrize("filename", ["../secret.jpg", "/etc/passwd"])
def test_voc_filename_outside_jpeg_images_raises(tmp_path, filename):
    xml = _voc(tmp_path, _object())
    xml.write_text(xml.read_text().replace("<filename>im.jpg", f"<filename>{filename}"))
    with pytest.raises(DataError, match=r"im\.xml: file name .* is outside the image folder"):
        read_voc(tmp_path, "train", classes=CLASSES)


@pytest.mark.parametrize("codec", ["gb2312", "GBK", "shift_jis"])
def test_voc_xml_in_a_multi_byte_encoding_is_decoded(tmp_path, codec):
    """CJK labelling tools declare GBK/Shift_JIS, which expat refuses with a bare ValueError."""
    xml = _voc(tmp_path, _object(name="star"))
    body = xml.read_text().replace("<filename>im.jpg", "<filename>猫.jpg")
    xml.write_bytes(f'<?xml version="1.0" encoding="{codec}"?>\n{body}'.encode(codec))
    (instance,) = read_voc(tmp_path, "train", classes=CLASSES).records[0].instances
    assert instance.label == 2


@pytest.mark.parametrize(
    ("declaration", "problem"),
    [("x-no-such-codec", "the XML declares an unknown encoding"),
     ("gb2312", "not readable as its declared encoding 'gb2312'")],
)  # fmt: skip
def test_voc_xml_not_in_its_declared_encoding_names_file(tmp_path, declaration, problem):
    xml = _voc(tmp_path, _object())
    data = f'<?xml version="1.0" encoding="{declaration}"?>{xml.read_text()}'.encode()
    xml.write_bytes(data.replace(b"ring", b"\xff\xffring") if declaration == "gb2312" else data)
    with pytest.raises(DataError, match=rf"im\.xml: {problem}"):
        read_voc(tmp_path, "train", classes=CLASSES)


# ------------------------------------------------------------------ VOC image lists


def test_voc_id_list_with_bom_crlf_blank_lines_and_trailing_spaces(tmp_path):
    """A BOM (Windows editors) used to glue itself to the first id, which was then skipped
    as "missing_annotation"."""
    _voc(tmp_path, _object(), ids="\ufeffim \r\n\r\n  \r\nim2\t\r\n".encode())
    ds = read_voc(tmp_path, "train", classes=CLASSES)
    assert [r.image_id for r in ds.records] == ["im", "im2"] and ds.skipped.total == 0


def test_voc_duplicate_id_is_read_once_and_counted(tmp_path):
    """A repeated id used to yield the image (and its instances) twice."""
    _voc(tmp_path, _object(), ids=b"im\nim2\nim\n")
    ds = read_voc(tmp_path, "train", classes=CLASSES)
    assert [r.image_id for r in ds.records] == ["im", "im2"]
    assert [i.instance_id for r in ds.records for i in r.instances] == [1, 2]
    assert ds.skipped.counts == {"duplicate_id": 1}
    assert ds.skipped.examples["duplicate_id"][0].endswith("train.txt: im")


def test_voc_id_list_not_utf8_names_file(tmp_path):
    _voc(tmp_path, _object(), ids="im\nim\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.txt: not UTF-8 text"):
        read_voc(tmp_path, "train", classes=CLASSES)
