"""VOC 2012 + SBD reader: box conversion, PNG and .mat masks, the train_aug list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from bbam.data.palette import load_index_png, save_palette_png
from bbam.data.records import DataError
from bbam.data.voc import VOC_CLASSES, load_classes, read_voc, train_aug_ids

H, W = 40, 50
PERSON, DOG, CAT = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("dog") + 1, 8


def _xml(path: Path, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> None:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    path.write_text(
        f"<annotation><filename>{path.stem}.jpg</filename><size><width>{W}</width>"
        f"<height>{H}</height><depth>3</depth></size>{objs}</annotation>"
    )


def _voc_tree(root: Path) -> Path:
    """VOC2012 with 4 images: a (seg train), b (seg val), c and d (only in SBD)."""
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for name in "abcd":
        Image.new("RGB", (W, H), (90, 90, 90)).save(voc / "JPEGImages" / f"{name}.jpg")
    # a: person [5,10)x[4,20) and a difficult dog [20,45)x[10,30)
    _xml(
        voc / "Annotations" / "a.xml", [("person", (6, 5, 10, 20), 0), ("dog", (21, 11, 45, 30), 1)]
    )
    obj = np.zeros((H, W), np.uint8)
    cls = np.zeros((H, W), np.uint8)
    obj[6:18, 6:10], cls[6:18, 6:10] = 1, PERSON
    obj[12:28, 22:40], cls[12:28, 22:40] = 2, DOG
    obj[5, 5:11] = cls[5, 5:11] = 255  # VOC's void border is not part of any instance
    save_palette_png(voc / "SegmentationObject" / "a.png", obj)
    save_palette_png(voc / "SegmentationClass" / "a.png", cls)
    _xml(voc / "Annotations" / "b.xml", [("cat", (1, 1, 50, 40), 0)])
    _xml(
        voc / "Annotations" / "c.xml", [("person", (1, 1, 20, 20), 0), ("dog", (25, 5, 48, 35), 0)]
    )
    _xml(voc / "Annotations" / "d.xml", [("cat", (2, 2, 30, 30), 0)])
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("b\n")
    return voc


def _sbd_tree(root: Path) -> Path:
    """SBD (official layout: dataset/{inst,cls,train.txt,val.txt}); c's instances are stored in
    the opposite order to its XML objects, so matching must go by class and box."""
    sbd = root / "sbd" / "dataset"
    (sbd / "inst").mkdir(parents=True)
    (sbd / "cls").mkdir()
    seg = np.zeros((H, W), np.uint8)
    seg[5:34, 25:47] = 1  # dog
    seg[1:19, 1:19] = 2  # person
    cls = np.where(seg == 1, DOG, np.where(seg == 2, PERSON, 0)).astype(np.uint8)
    cats = np.array([[DOG], [PERSON]], dtype=np.uint8)
    scipy.io.savemat(sbd / "inst" / "c.mat", {"GTinst": {"Segmentation": seg, "Categories": cats}})
    scipy.io.savemat(sbd / "cls" / "c.mat", {"GTcls": {"Segmentation": cls}})
    seg_d = np.zeros((H, W), np.uint8)
    seg_d[2:29, 2:29] = 1
    scipy.io.savemat(
        sbd / "inst" / "d.mat", {"GTinst": {"Segmentation": seg_d, "Categories": np.array([[CAT]])}}
    )
    # b is in SBD too, but it is VOC seg val: it must not enter train_aug
    (sbd / "train.txt").write_text("c\nb\n")
    (sbd / "val.txt").write_text("d\n")
    return root / "sbd"


@pytest.fixture()
def trees(tmp_path) -> tuple[Path, Path]:
    _voc_tree(tmp_path)
    return tmp_path, _sbd_tree(tmp_path)


def test_boxes_converted_to_zero_based_exclusive_and_masks_from_pngs(trees):
    root, _ = trees
    ds = read_voc(root, "train")  # parent of VOC2012 accepted
    assert ds.classes == list(VOC_CLASSES)
    (rec,) = ds.records
    assert rec.image_id == "a" and rec.path.name == "a.jpg" and (rec.width, rec.height) == (W, H)
    person, dog = rec.instances
    np.testing.assert_array_equal(person.box, [5, 4, 10, 20])
    np.testing.assert_array_equal(dog.box, [20, 10, 45, 30])
    assert (person.label, dog.label) == (PERSON, DOG)
    assert dog.difficult and not person.difficult
    assert person.mask.sum() == 12 * 4 and not person.mask[5].any()  # 255 border excluded
    assert dog.mask[12:28, 22:40].all() and dog.mask.sum() == 16 * 18
    assert [i.instance_id for i in rec.instances] == [1, 2]
    no_masks = read_voc(root / "VOC2012", "train", with_masks=False)
    assert all(i.mask is None for i in no_masks.records[0].instances)


def test_void_band_of_the_pngs_is_kept_on_the_record(trees):
    """VOC's 255 pixels, in either PNG, are the void region the official mIoU ignores: kept on
    the record (not in any mask); SBD's .mat files mark none."""
    root, sbd = trees
    cls_png = root / "VOC2012/SegmentationClass/a.png"
    cls = load_index_png(cls_png)
    cls[35:38, 0:4] = 255  # a hard region marked in the class PNG alone
    save_palette_png(cls_png, cls)
    want = np.zeros((H, W), bool)
    want[5, 5:11] = want[35:38, 0:4] = True
    (rec,) = read_voc(root, "train").records
    np.testing.assert_array_equal(rec.void.decode(), want)
    assert not any((i.mask & want).any() for i in rec.instances)
    assert read_voc(root, "train", with_masks=False).records[0].void is None
    aug = read_voc(root, "train_aug", sbd_root=sbd)
    assert [(r.image_id, r.void is not None) for r in aug.records] == [
        ("a", True),  # VOC PNGs
        ("c", False),  # SBD
        ("d", False),
    ]


def test_png_class_disagreeing_with_xml_raises(trees):
    root, _ = trees
    cls = np.zeros((H, W), np.uint8)
    cls[6:18, 6:10] = CAT  # instance 1 is a person in the XML
    save_palette_png(root / "VOC2012/SegmentationClass/a.png", cls)
    with pytest.raises(DataError, match="a.png"):
        read_voc(root, "train")


def test_train_aug_is_union_minus_voc_val(trees):
    root, sbd = trees
    assert train_aug_ids(root, sbd) == ["a", "c", "d"]
    assert train_aug_ids(root / "VOC2012", sbd / "dataset") == ["a", "c", "d"]


def test_train_aug_reads_sbd_masks_matched_by_class_and_box(trees):
    root, sbd = trees
    ds = read_voc(root, "train_aug", sbd_root=sbd)
    by_id = {r.image_id: r for r in ds.records}
    assert sorted(by_id) == ["a", "c", "d"]
    person, dog = by_id["c"].instances
    assert (person.label, dog.label) == (PERSON, DOG)
    assert person.mask.sum() == 18 * 18 and person.mask[1:19, 1:19].all()
    assert dog.mask.sum() == 29 * 22 and dog.mask[5:34, 25:47].all()
    (cat,) = by_id["d"].instances  # single instance: squeezed .mat fields still work
    assert cat.mask.sum() == 27 * 27
    assert by_id["a"].instances[0].mask.sum() == 48  # VOC PNG preferred where present
    assert ds.skipped.total == 0
    with pytest.raises(DataError, match="sbd_root"):
        read_voc(root, "train_aug")


def test_sbd_instance_without_matching_box_is_counted(trees):
    root, sbd = trees
    _xml(root / "VOC2012/Annotations/d.xml", [("cat", (40, 30, 50, 40), 0)])  # far from mask
    ds = read_voc(root, "train_aug", sbd_root=sbd)
    (cat,) = next(r for r in ds.records if r.image_id == "d").instances
    assert cat.mask is None
    assert ds.skipped.counts == {"object_without_mask": 1}


def test_classes_from_list_json_or_text(tmp_path):
    (tmp_path / "c.txt").write_text("background\nring\nstar\n")
    cats = [{"id": 5, "name": "star"}, {"id": 2, "name": "ring"}]
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "categories": cats}))
    assert load_classes(tmp_path / "c.txt") == ["ring", "star"]
    assert load_classes(tmp_path / "c.json") == ["ring", "star"]
    assert load_classes(("ring", "star")) == ["ring", "star"]
    with pytest.raises(DataError, match="nope.txt"):
        load_classes(tmp_path / "nope.txt")


def test_missing_annotation_is_counted_and_empty_split_raises(trees):
    root, _ = trees
    (root / "VOC2012/ImageSets/Segmentation/train.txt").write_text("a\nzz\n")
    ds = read_voc(root, "train")
    assert [r.image_id for r in ds.records] == ["a"]
    assert ds.skipped.counts == {"missing_annotation": 1}
    (root / "VOC2012/ImageSets/Segmentation/val.txt").write_text("zz\n")
    with pytest.raises(DataError, match="none of the 1 images"):
        read_voc(root, "val")


def test_image_is_the_ids_file_not_a_stale_filename(trees):
    """b.xml copied from a.xml kept <filename>a.jpg: both records used to read a.jpg."""
    root, _ = trees
    images = root / "VOC2012/JPEGImages"
    xml = root / "VOC2012/Annotations/b.xml"
    xml.write_text(xml.read_text().replace("<filename>b.jpg", "<filename>a.jpg"))
    ds = read_voc(root, "val", with_masks=False)
    assert ds.records[0].path == images / "b.jpg"
    assert ds.repaired.counts == {"filename_mismatch": 1}
    assert "b.xml: <filename> a.jpg" in ds.repaired.examples["filename_mismatch"][0]
    # <filename> is the fallback when no <id> image exists; another extension of <id> is found
    (images / "b.jpg").rename(images / "b_photo.jpg")
    xml.write_text(xml.read_text().replace("<filename>a.jpg", "<filename>b_photo.jpg"))
    ds = read_voc(root, "val", with_masks=False)
    assert ds.records[0].path == images / "b_photo.jpg" and ds.repaired.total == 0
    Image.new("RGB", (W, H)).save(images / "b.png")
    ds = read_voc(root, "val", with_masks=False)
    assert ds.records[0].path == images / "b.png"
    assert ds.repaired.counts == {"filename_mismatch": 1}


@pytest.mark.parametrize("gone", ["SegmentationClass", "SegmentationObject"])
def test_one_mask_png_without_its_pair_names_the_missing_file(trees, gone):
    """Either PNG alone used to drop the image's GT masks silently."""
    root, _ = trees
    (root / "VOC2012" / gone / "a.png").unlink()
    with pytest.raises(DataError, match=rf"{gone}/a\.png: mask file not found"):
        read_voc(root, "train")


def test_listed_image_without_mask_pngs_is_counted(trees):
    """b is in ImageSets/Segmentation/val.txt but has neither PNG."""
    root, _ = trees
    ds = read_voc(root, "val")
    assert not ds.records[0].instances[0].has_mask
    assert ds.skipped.counts == {"missing_mask_png": 1}
    assert ds.skipped.examples["missing_mask_png"][0].endswith("SegmentationObject/b.png")
    for sub in ("SegmentationClass", "SegmentationObject"):  # a box-only dataset: no promise
        for png in (root / "VOC2012" / sub).iterdir():
            png.unlink()
        (root / "VOC2012" / sub).rmdir()
    assert read_voc(root, "val").skipped.total == 0


def test_png_instance_without_an_xml_object_is_counted(trees):
    """SegmentationObject index 3 with only two XML objects used to vanish silently."""
    root, _ = trees
    voc = root / "VOC2012"
    obj = np.array(Image.open(voc / "SegmentationObject/a.png"))
    cls = np.array(Image.open(voc / "SegmentationClass/a.png"))
    obj[30:38, 40:48], cls[30:38, 40:48] = 3, CAT
    save_palette_png(voc / "SegmentationObject/a.png", obj)
    save_palette_png(voc / "SegmentationClass/a.png", cls)
    ds = read_voc(root, "train")
    assert len(ds.records[0].instances) == 2
    assert ds.skipped.counts == {"unannotated_mask_instance": 1}
    assert ds.skipped.examples["unannotated_mask_instance"][0].endswith("a.png: instance 3")


def _v73_mat(path: Path) -> None:
    """MATLAB -v7.3: an HDF5 file behind the 128-byte MAT header scipy reads."""
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 ."
    path.write_bytes(
        header.ljust(116) + b"\0" * 8 + b"\x00\x02IM" + b"\x89HDF\r\n\x1a\n" + bytes(64)
    )


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (_v73_mat, r"MATLAB v7\.3 \(HDF5\) \.mat is not supported"),
        (
            lambda p: scipy.io.savemat(p, {"GTinst": {"Segmentation": np.zeros((H, W))}}),
            "GTinst is not a struct with field.s. Categories",
        ),
        (
            lambda p: scipy.io.savemat(p, {"GTinst": np.zeros((H, W))}),
            "GTinst is not a struct with field.s. Segmentation, Categories",
        ),
    ],
    ids=["v7.3", "no Categories", "plain array"],
)
def test_sbd_mat_of_another_layout_names_the_file(trees, write, problem):
    """NotImplementedError / AttributeError used to escape without the file's name."""
    root, sbd = trees
    write(sbd / "dataset/inst/c.mat")
    with pytest.raises(DataError, match=rf"inst/c\.mat: {problem}"):
        read_voc(root, "train_aug", sbd_root=sbd)
