import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bbam.baselines import box_mask, grabcut_mask
from bbam.data.palette import IGNORE_LABEL, voc_colormap
from bbam.data.records import ImageRecord, Instance
from bbam.pseudo_labels import (
    build_instance_annotations,
    coco_image_entry,
    coco_image_id,
    mark_crowd_ignore,
    proposal_skip_counts,
    semantic_label,
    write_coco_pseudo_gt,
    write_semantic_png,
)
from bbam.refine import InstanceMasks

torch.set_num_threads(1)


def rect(h, w, y1, y2, x1, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_overlap_of_two_classes_is_ignored():
    h, w = 20, 30
    a_fg = rect(h, w, 2, 12, 2, 16)
    b_fg = rect(h, w, 6, 18, 10, 28)
    none = np.zeros((h, w), bool)
    label = semantic_label(
        h,
        w,
        [(3, np.array([2, 2, 16, 12.0]), a_fg, none), (7, np.array([10, 6, 28, 18.0]), b_fg, none)],
    )
    assert label.dtype == np.uint8
    assert np.all(label[a_fg & b_fg] == IGNORE_LABEL)
    assert np.all(label[a_fg & ~b_fg] == 3)
    assert np.all(label[b_fg & ~a_fg] == 7)
    assert np.all(label[~a_fg & ~b_fg] == 0)
    # two instances of the same class overlapping are not a conflict
    same = semantic_label(
        h,
        w,
        [(3, np.array([2, 2, 16, 12.0]), a_fg, none), (3, np.array([10, 6, 28, 18.0]), b_fg, none)],
    )
    assert np.all(same[a_fg | b_fg] == 3)


def test_nested_boxes_reassign_inner_mask_largest_to_smallest():
    h, w = 40, 40
    none = np.zeros((h, w), bool)
    outer = (1, np.array([0, 0, 40, 40.0]), rect(h, w, 0, 40, 0, 40), none)  # person
    middle = (5, np.array([5, 5, 30, 30.0]), rect(h, w, 8, 28, 8, 28), none)  # chair in person
    inner = (9, np.array([10, 10, 20, 20.0]), rect(h, w, 12, 18, 12, 18), none)  # inside chair
    for order in ([outer, middle, inner], [inner, outer, middle]):
        label = semantic_label(h, w, order)
        assert np.all(label[12:18, 12:18] == 9)  # smallest processed last wins
        ring = rect(h, w, 8, 28, 8, 28) & ~rect(h, w, 12, 18, 12, 18)
        assert np.all(label[ring] == 5)
        assert np.all(label[0:8, :] == 1)
    # one box for two classes is not nesting: the conflict stays ignored, in either order
    twin = (5, np.array([0, 0, 40, 40.0]), rect(h, w, 8, 28, 8, 28), none)
    for order in ([outer, twin], [twin, outer]):
        assert np.all(semantic_label(h, w, order)[8:28, 8:28] == IGNORE_LABEL)
    # without nesting the conflicts stay ignored
    shifted = (5, np.array([5, 5, 45, 30.0]), rect(h, w, 8, 28, 8, 28), none)
    label = semantic_label(h, w, [outer, shifted])
    assert np.all(label[8:28, 8:28] == IGNORE_LABEL)


def test_ignore_band_applied_last():
    h, w = 30, 30
    a_fg = rect(h, w, 5, 15, 5, 15)
    a_ign = rect(h, w, 3, 17, 3, 17) & ~a_fg
    b_fg = rect(h, w, 0, 30, 15, 30)  # another class claims part of a's band
    none = np.zeros((h, w), bool)
    label = semantic_label(
        h,
        w,
        [
            (2, np.array([3, 3, 17, 17.0]), a_fg, a_ign),
            (4, np.array([15, 0, 30, 30.0]), b_fg, none),
        ],
    )
    assert np.all(label[a_ign] == IGNORE_LABEL)
    assert np.all(label[a_fg] == 2)
    assert np.all(label[b_fg & ~a_ign] == 4)


def test_crowd_regions_are_ignore_in_semantic_targets():
    from bbam.segmenters.targets import render_label_map

    h, w = 12, 16
    person = Instance(0, 1, np.array([0.0, 0.0, 6.0, 6.0]), rect(h, w, 1, 5, 1, 5))
    crowd_mask = Instance(1, 1, np.array([8.0, 0.0, 16.0, 6.0]), rect(h, w, 2, 4, 9, 15), True)
    crowd_box = Instance(2, 2, np.array([2.5, 7.2, 6.0, 11.0]), None, iscrowd=True)
    record = ImageRecord("a", Path("a.jpg"), w, h, [person, crowd_mask, crowd_box])
    expected = crowd_mask.mask | rect(h, w, 7, 11, 2, 6)  # a box-only crowd: its box, rounded out

    label = mark_crowd_ignore(np.zeros((h, w), np.uint8), record.instances)
    assert np.array_equal(label == IGNORE_LABEL, expected)
    for source in ("mask", "box"):
        target = render_label_map(record, source)
        assert np.array_equal(target == IGNORE_LABEL, expected), source
        assert (target[person.mask] == 1).all() and (target[~expected & (target != 1)] == 0).all()


@pytest.mark.parametrize("label", [255, 256, 1203])
def test_class_labels_past_254_are_refused_not_read_as_ignore(label):
    from bbam.segmenters.targets import render_label_map

    h, w = 8, 8
    fg, box = rect(h, w, 2, 6, 2, 6), np.array([2.0, 2.0, 6.0, 6.0])
    record = ImageRecord("a", Path("a.jpg"), w, h, [Instance(0, 254, box, fg)])
    # 254 classes fit: the last one is a class, not ignore
    assert (render_label_map(record)[fg] == 254).all()
    assert (semantic_label(h, w, [(254, box, fg, np.zeros_like(fg))])[fg] == 254).all()
    # label 255 would be ignored by the loss and the evaluation, 256 on wrap around
    record.instances[0].label = label
    with pytest.raises(ValueError, match="254 classes"):
        semantic_label(h, w, [(label, box, fg, np.zeros_like(fg))])
    with pytest.raises(ValueError, match="254 classes"):
        render_label_map(record)


def test_semantic_png_palette_roundtrip(tmp_path):
    label = np.zeros((8, 9), np.uint8)
    label[2:4, 2:5] = 15
    label[5, :] = IGNORE_LABEL
    path = tmp_path / "sem" / "2007_000032.png"
    write_semantic_png(path, label)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im), label)
        assert np.array_equal(np.array(im.getpalette()[:48]).reshape(16, 3), voc_colormap(16))
    assert not list(path.parent.glob("*.tmp"))


def _masks(fg, ignore, **stats):
    return InstanceMasks(fg, fg | ignore, ignore, dict(stats))


def test_coco_json_roundtrip_keeps_empty_instances(tmp_path):
    h, w = 24, 32
    record = ImageRecord("2007_000032", tmp_path / "2007_000032.jpg", w, h)
    insts = [
        Instance(11, 3, np.array([2.0, 3.0, 20.0, 15.0])),
        Instance(12, 5, np.array([10.0, 10.0, 30.0, 22.0])),
    ]
    fg0 = rect(h, w, 5, 12, 4, 15)
    ign0 = rect(h, w, 3, 15, 2, 20) & ~fg0
    empty = np.zeros((h, w), bool)
    masks = [
        _masks(fg0, ign0, fallback="none", mcg_used=True, box_area=216),
        _masks(empty, empty, fallback="empty_map", mcg_used=False, mcg_reason="no_proposal_file"),
    ]
    coco_id = coco_image_id(record.image_id)
    assert coco_id == 2007000032
    anns, rows = build_instance_annotations(coco_id, insts, masks)
    images = [coco_image_entry(record, coco_id)]
    cats = [{"id": i, "name": f"c{i}", "supercategory": "object"} for i in range(1, 6)]
    path = tmp_path / "pseudo.json"
    write_coco_pseudo_gt(path, images, cats, anns)
    coco = COCO(str(path))
    loaded = coco.loadAnns(coco.getAnnIds(imgIds=[coco_id]))
    assert len(loaded) == 2  # the empty instance is kept
    by_id = {a["id"]: a for a in loaded}
    assert np.array_equal(coco.annToMask(by_id[11]).astype(bool), fg0)
    assert np.array_equal(mask_utils.decode(by_id[11]["ignore"]).astype(bool), ign0)
    assert by_id[11]["bbox"] == [2.0, 3.0, 18.0, 12.0]
    assert by_id[11]["area"] == fg0.sum()
    assert by_id[11]["bbam"]["mcg_used"] is True
    assert by_id[12]["bbam"]["empty_fg"] is True and by_id[12]["area"] == 0
    assert not coco.annToMask(by_id[12]).any()
    assert rows[1]["fallback"] == "empty_map" and rows[1]["empty_fg"]
    assert [r["mcg_reason"] for r in rows] == ["disabled", "no_proposal_file"]
    assert proposal_skip_counts(rows) == {"no_proposal_file": 1}  # "disabled" is no skip
    assert rows[0]["fg_fraction"] == pytest.approx(fg0.sum() / (18 * 12))
    assert rows[0]["ignore_fraction"] == pytest.approx(ign0.sum() / (18 * 12))
    json.dumps(rows)
    with pytest.raises(ValueError):
        build_instance_annotations(coco_id, insts, masks[:1])
    with pytest.raises(ValueError):
        coco_image_id("img_a")


def test_box_and_grabcut_baselines():
    rng = np.random.default_rng(0)
    h, w = 64, 80
    image = np.full((h, w, 3), (60, 160, 60), dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    obj = ((yy - 32) / 18.0) ** 2 + ((xx - 40) / 24.0) ** 2 <= 1.0
    image[obj] = (220, 40, 40)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    box = np.array([12.0, 10.0, 68.0, 54.0])
    filled = box_mask(box, h, w)
    assert filled.sum() == 56 * 44 and filled[10, 12] and not filled[54, 68]
    cut = grabcut_mask(image, box, iterations=5)

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(cut, obj) > 0.85
    assert iou(cut, obj) > iou(filled, obj)
    assert not (cut & ~filled).any()
    whole = grabcut_mask(image, np.array([0.0, 0.0, w, h]))
    assert whole.all()  # no background samples: falls back to the box
    tiny = np.array([30.0, 30.0, 33.0, 33.0])  # 9 pixels: too few for a colour model
    assert np.array_equal(grabcut_mask(image, tiny), box_mask(tiny, h, w))


def test_refine_record_runs_every_instance_in_order(tmp_path):
    from bbam.mcg import MCGConfig, SuperpixelSource
    from bbam.pseudo_labels import refine_record
    from bbam.refine import RefineConfig

    h, w = 48, 64
    image = np.full((h, w, 3), 80, dtype=np.uint8)
    image[8:40, 8:30] = (230, 30, 30)
    image[10:30, 38:60] = (30, 30, 230)
    insts = [
        Instance(1, 1, np.array([6.0, 6.0, 32.0, 42.0])),
        Instance(2, 2, np.array([36.0, 8.0, 62.0, 32.0])),
    ]
    record = ImageRecord("img", tmp_path / "img.png", w, h, insts)
    heat = np.zeros((h, w), np.float32)
    heat[12:36, 12:26] = 1.0
    source = SuperpixelSource(scales=(50.0, 200.0))
    refined = refine_record(
        record, image, {1: heat}, RefineConfig(), MCGConfig(min_box_area=0), source
    )
    out = refined.instance
    assert [m.stats["instance_id"] for m in out] == [1, 2]
    # The semantic labels read the masks from before the proposals (the reference's non-MCG
    # masks), unless refine_semantic asks for the refined ones.
    assert [m.stats["instance_id"] for m in refined.semantic] == [1, 2]
    assert not any("mcg_reason" in m.stats for m in refined.semantic)
    plain = refine_record(record, image, {1: heat}, RefineConfig())
    for before, semantic in zip(plain.instance, refined.semantic, strict=True):
        assert np.array_equal(before.fg, semantic.fg)
        assert np.array_equal(before.ignore, semantic.ignore)
    both = refine_record(
        record,
        image,
        {1: heat},
        RefineConfig(),
        MCGConfig(min_box_area=0, refine_semantic=True),
        source,
    )
    assert all(s is i for s, i in zip(both.semantic, both.instance, strict=True))
    assert out[0].stats["fallback"] == "none" and out[1].stats["fallback"] == "empty_map"
    assert all("mcg_reason" in m.stats for m in out)
    red = np.zeros((h, w), bool)
    red[8:40, 8:30] = True
    assert (out[0].fg & red).sum() / (out[0].fg | red).sum() > 0.8


def test_parallel_labelling_gives_the_same_output_as_serial(tmp_path):
    """workers > 1 must not change a byte: annotations, rows, errors and PNGs, in dataset order."""
    from bbam.data.records import Dataset
    from bbam.labeling import label_dataset
    from bbam.refine import RefineConfig

    rng = np.random.default_rng(0)
    records = []
    for n in range(5):
        h, w = 40, 48
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        pixels[8 + n : 30, 10 : 34 + n] = (200, 80, 40)
        path = tmp_path / "img" / f"im{n}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        box = np.array([8.0 + n, 6.0, 36.0 + n, 32.0])
        records.append(ImageRecord(f"im{n}", path, w, h, [Instance(10 * n + 1, 1, box)]))
    records[3] = ImageRecord("im3", tmp_path / "img/missing.png", 48, 40, records[3].instances)
    dataset = Dataset(["thing"], records)
    coco_ids = {r.image_id: n + 1 for n, r in enumerate(records)}
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = label_dataset(
            dataset, coco_ids, [], {}, out, RefineConfig(), None, None,
            workers=workers, images_per_task=2,
        )  # fmt: skip
        pngs = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
        outputs[workers] = (json.dumps(result, sort_keys=True, default=str), pngs)
    assert outputs[1] == outputs[2]
    annotations, rows, errors, _ = label_dataset(
        dataset, coco_ids, [], {}, tmp_path / "w3", RefineConfig(), None, None,
        workers=2, images_per_task=2,
    )  # fmt: skip
    assert [a["id"] for a in annotations] == [1, 11, 21, 41]
    assert [e["image_id"] for e in errors] == ["im3"] and "missing.png" in errors[0]["error"]
    assert len(outputs[2][1]) == 4 and all(a["area"] > 0 for a in annotations)


def test_an_image_that_fails_now_loses_the_png_an_earlier_run_left(tmp_path):
    """Without DVC clearing the folder (the Prefect pipeline, a stage run by hand) a PNG of
    an earlier run must not stand in for labels this run could not make: the semantic
    segmenter would train on it instead of skipping the image."""
    from bbam.data.records import Dataset
    from bbam.labeling import label_dataset
    from bbam.refine import RefineConfig

    records = []
    for n in range(2):
        pixels = np.full((40, 48, 3), 30, dtype=np.uint8)
        pixels[8:30, 10:34] = (200, 80, 40)
        path = tmp_path / f"im{n}.png"
        Image.fromarray(pixels).save(path)
        box = np.array([8.0, 6.0, 36.0, 32.0])
        records.append(ImageRecord(f"im{n}", path, 48, 40, [Instance(n + 1, 1, box)]))
    dataset = Dataset(["thing"], records)
    coco_ids = {"im0": 1, "im1": 2}
    out = tmp_path / "semantic"
    first = label_dataset(dataset, coco_ids, [], {}, out, RefineConfig(), None, None)
    assert not first.errors and sorted(p.name for p in out.iterdir()) == ["im0.png", "im1.png"]
    (tmp_path / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    again = label_dataset(dataset, coco_ids, [], {}, out, RefineConfig(), None, None)
    assert [e["image_id"] for e in again.errors] == ["im1"]
    assert str(tmp_path / "im1.png") in again.errors[0]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["im0.png"]


def test_baselines_are_scored_on_the_same_instances_and_do_not_depend_on_workers(tmp_path):
    """baselines=True adds the filled box's and GrabCut's IoU with the GT mask to each row,
    and the three methods' semantic confusion on the fully masked images."""
    from bbam.data.records import Dataset
    from bbam.labeling import baseline_quality, label_dataset
    from bbam.refine import RefineConfig

    rng = np.random.default_rng(1)
    records = []
    for n in range(4):
        h, w = 48, 56
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - 24) ** 2 + (xx - 26 - n) ** 2 <= 12**2
        pixels[disc] = (210, 90, 40)
        path = tmp_path / "img" / f"im{n}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        box = np.array([14.0 + n, 12.0, 39.0 + n, 37.0])
        records.append(ImageRecord(f"im{n}", path, w, h, [Instance(n + 1, 1, box, mask=disc)]))
    records.append(ImageRecord("nomask", records[0].path, 56, 48, [Instance(9, 1, box)]))
    dataset = Dataset(["thing"], records)
    coco_ids = {r.image_id: n + 1 for n, r in enumerate(records)}
    labelled = [
        label_dataset(
            dataset, coco_ids, [], {}, tmp_path / f"w{workers}", RefineConfig(), None, None,
            workers=workers, images_per_task=2, baselines=True,
        )
        for workers in (1, 2)
    ]  # fmt: skip
    results = [result.rows for result in labelled]
    assert json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)
    rows = results[0]
    for row, record in zip(rows[:4], records[:4], strict=True):
        gt = record.instances[0].mask
        assert row["iou_gt_box"] == pytest.approx(gt.sum() / (25 * 25))  # the box holds the disc
        assert 0.5 < row["iou_gt_grabcut"] <= 1.0  # a contrasted disc: GrabCut finds most of it
        assert 0.0 <= row["iou_gt"] <= 1.0
    assert rows[4]["iou_gt_box"] is None and rows[4]["iou_gt_grabcut"] is None
    assert "iou_gt" not in rows[4]
    # the semantic scores: the 4 fully masked images ("nomask" is not), summed alike
    one, two = (result.scores for result in labelled)
    assert one.images == two.images == 4 and set(one.confusion) == {"bbam", "box", "grabcut"}
    for method, conf in one.confusion.items():
        assert conf.shape == (2, 2) and (conf == two.confusion[method]).all(), method
        assert conf.sum() == 4 * 48 * 56
    quality = baseline_quality(rows, one)
    assert quality["images"] == 4 and quality["instances"] == 4
    box = quality["methods"]["box"]
    assert box["pseudo_mean_instance_iou"] == round(
        100 * float(np.mean([r["iou_gt_box"] for r in rows[:4]])), 2
    )
    assert all(0 <= m["pseudo_sem_miou"] <= 100 for m in quality["methods"].values())
    assert box["pseudo_sem_miou"] < quality["methods"]["grabcut"]["pseudo_sem_miou"]
    plain = label_dataset(
        dataset, coco_ids, [], {}, tmp_path / "plain", RefineConfig(), None, None
    )[1]
    assert "iou_gt_box" not in plain[0]


def test_pseudo_label_stage_refuses_more_classes_than_its_pngs_hold(tmp_path, monkeypatch):
    """Checked once before any image is labelled, naming the annotation file."""
    import tasks.pseudo_labels as stage
    from bbam.data.records import Dataset

    many = Dataset([f"c{k}" for k in range(255)], [])
    monkeypatch.setattr(stage, "load_split", lambda params, split: many)
    monkeypatch.setattr(stage, "split_paths", lambda params, split: (tmp_path / "x.json", None))
    params = {"attribution": {"split": "train", "num_shards": 1}}
    with pytest.raises(ValueError, match=r"x\.json \(semantic PNGs\).*254 classes"):
        stage.make_pseudo_labels.fn(params, str(tmp_path / "no_attribution"), str(tmp_path))
    many.classes.pop()  # 254 classes fit: it goes on to read the (absent) manifest
    with pytest.raises(FileNotFoundError):
        stage.make_pseudo_labels.fn(params, str(tmp_path / "no_attribution"), str(tmp_path))


def test_pseudo_gt_leaves_out_the_images_the_stage_failed_on(tmp_path, monkeypatch):
    """A failed image has no labels, not "no objects": listed in the pseudo GT with no
    annotation, any trainer reading the JSON would learn its objects as background."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    import tasks.pseudo_labels as stage
    from bbam.data.records import Dataset
    from bbam.mcg import MCGConfig

    source = tmp_path / "instances_train.json"
    images = [{"id": 7, "file_name": "a.jpg", "width": 8, "height": 8}]
    images.append({"id": 9, "file_name": "b.jpg", "width": 8, "height": 8})
    categories = [{"id": 1, "name": "thing"}]
    source.write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    attribution = tmp_path / "attribution"
    attribution.mkdir()
    pq.write_table(pa.table({"key": pa.array([], pa.string())}), attribution / "manifest.parquet")
    ann = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}
    failed = [{"image_id": "b", "error": "ManifestError: maps-00000.npz: bad zip"}]
    monkeypatch.setattr(stage, "load_split", lambda params, split: Dataset(["thing"], []))
    monkeypatch.setattr(stage, "split_paths", lambda params, split: (source, None))
    monkeypatch.setattr(stage, "refine_config", lambda params: None)
    monkeypatch.setattr(stage, "proposal_config", lambda params: (MCGConfig(enabled=False), None))
    monkeypatch.setattr(
        stage, "engine_config", lambda params: types.SimpleNamespace(align_corners=False)
    )
    rows = [
        {
            "fallback": "none",
            "attribution_status": "ok",
            "mcg_used": False,
            "mcg_reason": "disabled",
            "empty_fg": False,
        },
        {
            "fallback": "box",
            "attribution_status": "missing",
            "mcg_used": False,
            "mcg_reason": "disabled",
            "empty_fg": True,
        },
    ]
    monkeypatch.setattr(stage, "label_dataset", lambda *a, **k: ([ann], rows, failed, None))
    params = {
        "attribution": {"split": "train", "num_shards": 1},
        "pseudo_labels": {"baselines": False},
    }
    summary = stage.make_pseudo_labels.fn(params, str(attribution), str(tmp_path / "out"))
    assert summary["image_errors"] == failed
    assert summary["attribution_status"] == {"ok": 1, "missing": 1}
    assert summary["fallbacks"] == {"none": 1, "box": 1} and summary["empty_fg"] == 1
    written = json.loads((tmp_path / "out" / "instances_train.json").read_text())
    assert [im["id"] for im in written["images"]] == [7]
    assert written["annotations"] == [ann]
