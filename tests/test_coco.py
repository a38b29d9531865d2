"""COCO reader: polygons, compressed and uncompressed RLE, crowd regions, category mapping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bbam.data.coco import category_ids, coco_image_ids, read_coco
from bbam.data.records import CompressedMask, DataError, Dataset, ImageRecord, Instance
from bbam.data.writers import VOID_KEY, mask_to_rle, write_coco_json
from bbam.pseudo_labels import write_coco_pseudo_gt

H, W = 30, 40


def _square(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


@pytest.fixture()
def coco_file(tmp_path) -> Path:
    data = {
        "images": [
            {"id": 42, "file_name": "sub/img_a.jpg", "width": W, "height": H},
            {"id": 7, "file_name": "img_b.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": 9, "name": "star"}, {"id": 3, "name": "ring"}],
        "annotations": [
            # polygon square x 2..12, y 3..13 -> ring (label 1: id 3 comes first)
            {"id": 11, "image_id": 42, "category_id": 3, "bbox": [2, 3, 10, 10], "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]], "area": 100},
            {"id": 12, "image_id": 42, "category_id": 9, "bbox": [20, 5, 10, 20], "iscrowd": 0,
             "segmentation": mask_to_rle(_square(5, 25, 20, 30)), "area": 200},
            {"id": 13, "image_id": 7, "category_id": 9, "bbox": [0, 0, 40, 10], "iscrowd": 1,
             "segmentation": _uncompressed_rle(_square(0, 10, 0, 40)), "area": 400},
            {"id": 14, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": mask_to_rle(_square(12, 20, 30, 36))},
        ],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_categories_map_to_contiguous_labels_in_id_order(coco_file):
    ds = read_coco(coco_file, coco_file.parent)
    assert ds.classes == ["ring", "star"]
    assert ds.category_ids == [3, 9] == category_ids(coco_file)
    a, b = ds.records
    assert (a.image_id, b.image_id) == ("img_a", "img_b")
    assert a.path == coco_file.parent / "sub" / "img_a.jpg"
    assert coco_image_ids(coco_file) == {"img_a": 42, "img_b": 7}
    assert [i.label for i in a.instances] == [1, 2]
    assert [i.instance_id for i in a.instances] == [11, 12]


def test_polygon_and_compressed_rle_masks(coco_file):
    poly, rle = read_coco(coco_file, coco_file.parent).records[0].instances
    np.testing.assert_array_equal(poly.box, [2, 3, 12, 13])
    assert abs(int(poly.mask.sum()) - 100) <= 25  # polygon rasterisation at the border
    assert poly.mask[5:11, 4:10].all() and not poly.mask[20:, 20:].any()
    np.testing.assert_array_equal(rle.mask, _square(5, 25, 20, 30))
    np.testing.assert_array_equal(rle.box, [20, 5, 30, 25])


def test_crowd_kept_flagged_with_uncompressed_rle_and_bbox_from_mask(coco_file):
    crowd, nobox = read_coco(coco_file, coco_file.parent).records[1].instances
    assert crowd.iscrowd and not nobox.iscrowd
    np.testing.assert_array_equal(crowd.mask, _square(0, 10, 0, 40))
    np.testing.assert_array_equal(nobox.box, [30, 12, 36, 20])


def test_without_masks(coco_file):
    ds = read_coco(coco_file, coco_file.parent, with_masks=False)
    assert all(i.mask is None for r in ds.records for i in r.instances)
    assert sum(len(r.instances) for r in ds.records) == 4


def test_unknown_category_and_orphan_annotation(coco_file):
    data = json.loads(coco_file.read_text())
    data["annotations"].append({"id": 20, "image_id": 999, "category_id": 3, "bbox": [0, 0, 4, 4]})
    data["annotations"].append({"id": 21, "image_id": 7, "category_id": 5, "bbox": [0, 0, 4, 4]})
    coco_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="instances.json.*unknown category_id 5"):
        read_coco(coco_file, coco_file.parent)
    ds = read_coco(coco_file, coco_file.parent, unknown="skip")
    assert ds.skipped.counts == {"annotation_without_image": 1, "unknown_class": 1}


def test_writer_round_trip(tmp_path):
    records = [
        ImageRecord(
            "x1",
            tmp_path / "x1.jpg",
            W,
            H,
            [
                Instance(1, 2, np.array([1, 2, 5, 9], np.float32), _square(2, 9, 1, 5)),
                Instance(2, 1, np.array([10, 10, 20, 15], np.float32), None, iscrowd=True),
            ],
        )
    ]
    path = tmp_path / "out.json"
    write_coco_json(path, Dataset(["a", "b"], records), image_root=tmp_path, category_ids=[4, 8])
    data = json.loads(path.read_text())
    assert data["images"][0]["file_name"] == "x1.jpg"
    assert [a["category_id"] for a in data["annotations"]] == [8, 4]
    assert data["annotations"][0]["bbox"] == [1, 2, 4, 7]
    rle = dict(data["annotations"][0]["segmentation"])
    assert mask_utils.area(rle) == 28
    back = read_coco(path, tmp_path)
    assert back.category_ids == [4, 8]
    first, second = back.records[0].instances
    np.testing.assert_array_equal(first.mask, _square(2, 9, 1, 5))
    assert first.label == 2 and second.iscrowd and second.mask is None
    np.testing.assert_array_equal(second.box, [10, 10, 20, 15])


def test_annotation_area_is_kept_and_written_back(coco_file, tmp_path):
    """COCO stores the polygon's area, which COCOeval sizes GT by: kept, not recounted."""
    data = json.loads(coco_file.read_text())
    data["annotations"][0]["area"] = 96.5  # a polygon area, not the rasterised pixel count
    coco_file.write_text(json.dumps(data))
    ds = read_coco(coco_file, coco_file.parent)
    poly, rle = ds.records[0].instances
    crowd, no_area = ds.records[1].instances
    assert (poly.area, rle.area, crowd.area, no_area.area) == (96.5, 200.0, 400.0, None)
    assert poly.mask_area != 96.5
    boxes_only = read_coco(coco_file, coco_file.parent, with_masks=False)
    assert boxes_only.records[0].instances[0].area == 96.5
    out = tmp_path / "out" / "instances.json"
    write_coco_json(out, ds, image_root=coco_file.parent)
    areas = [a["area"] for a in json.loads(out.read_text())["annotations"]]
    assert areas == [96.5, 200.0, 400.0, no_area.mask_area]  # no area: the pixel count
    data["annotations"][0]["area"] = "big"
    coco_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 11: invalid area 'big'"):
        read_coco(coco_file, coco_file.parent)


def _void_dataset(tmp_path: Path) -> tuple[Dataset, np.ndarray]:
    void = _square(0, 1, 0, W) | _square(9, 10, 0, 6)  # a VOC-like band and a hard region
    box = np.array([1, 2, 5, 9], np.float32)
    record = ImageRecord(
        "x1", tmp_path / "x1.jpg", W, H, [Instance(1, 1, box, _square(2, 9, 1, 5))]
    )
    record.void = CompressedMask.from_array(void)
    return Dataset(["a"], [record]), void


def test_void_region_round_trips_and_a_file_without_it_reads_as_before(tmp_path):
    dataset, void = _void_dataset(tmp_path)
    path = tmp_path / "out.json"
    write_coco_json(path, dataset, image_root=tmp_path)
    data = json.loads(path.read_text())
    assert mask_utils.area(data["images"][0][VOID_KEY]) == void.sum()
    np.testing.assert_array_equal(read_coco(path, tmp_path).records[0].void.decode(), void)
    assert read_coco(path, tmp_path, with_masks=False).records[0].void is None
    del data["images"][0][VOID_KEY]  # prepared before the void region was carried
    path.write_text(json.dumps(data))
    (old,) = read_coco(path, tmp_path).records
    assert old.void is None and old.instances[0].has_mask
    data["images"][0][VOID_KEY] = mask_to_rle(np.zeros((H, W + 1), bool))
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"x1.jpg: {VOID_KEY}: mask size"):
        read_coco(path, tmp_path)


def test_void_region_stays_out_of_the_pseudo_gt_json(tmp_path):
    """The pseudo GT copies the GT file's image entries; the void region is GT knowledge."""
    dataset, _ = _void_dataset(tmp_path)
    gt = tmp_path / "gt.json"
    write_coco_json(gt, dataset, image_root=tmp_path)
    source = json.loads(gt.read_text())
    pseudo = tmp_path / "pseudo.json"
    write_coco_pseudo_gt(pseudo, source["images"], source["categories"], [])
    images = json.loads(pseudo.read_text())["images"]
    assert [sorted(im) for im in images] == [["file_name", "height", "id", "width"]]
    assert read_coco(pseudo, tmp_path).records[0].void is None


def test_masks_are_held_compressed_so_a_large_split_fits_in_memory(tmp_path):
    """60 images x 8 polygons at 640x480: 147 MB as bool arrays, about 0.2 MB as RLE."""
    import tracemalloc

    from PIL import Image

    Image.new("RGB", (640, 480)).save(tmp_path / "blank.png")
    images, anns = [], []
    for n in range(60):
        (tmp_path / f"{n}.png").write_bytes((tmp_path / "blank.png").read_bytes())
        images.append({"id": n, "file_name": f"{n}.png", "width": 640, "height": 480})
        for k in range(8):
            x, y = 20 + 70 * k, 30 + 5 * k
            poly = [x, y, x + 60, y, x + 60, y + 300, x, y + 300]
            anns.append(
                {"id": 8 * n + k, "image_id": n, "category_id": 1, "bbox": [x, y, 60, 300],
                 "segmentation": [poly], "iscrowd": 0}
            )  # fmt: skip
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}]}))  # fmt: skip
    tracemalloc.start()
    dataset = read_coco(path, tmp_path)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 20e6, f"reading held {held / 1e6:.1f} MB"
    inst = dataset.records[59].instances[7]
    assert inst.has_mask and inst.mask_area == 60 * 300
    assert inst.mask.shape == (480, 640) and inst.mask[30 + 35 : 330 + 35, 510:570].all()
