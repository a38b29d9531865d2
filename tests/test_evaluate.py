import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bbam.data.coco import read_coco
from bbam.data.records import CompressedMask, ImageRecord, Instance
from bbam.evaluate import (
    coco_metrics_from_records,
    coco_segm_metrics,
    confusion_matrix,
    records_to_coco,
    records_with_gt_masks,
    semantic_miou,
    voc_ap,
    voc_instance_metrics,
    write_metrics,
    write_pr_curves,
)
from bbam.segmenters.targets import render_label_map, semantic_target


def _rec(image_id, masks_labels, h=8, w=8):
    insts = []
    for k, (mask, label) in enumerate(masks_labels):
        ys, xs = np.nonzero(mask)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
        insts.append(Instance(k, label, box, mask.astype(bool)))
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), w, h, insts)


def _rect(y1, y2, x1, x2, h=8, w=8):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_miou_hand_computed_two_class():
    gt = np.array([[0, 0, 1, 1]] * 4)
    pred = np.array([[0, 1, 1, 1]] * 4)
    # bg: TP 4, FN 4 -> 4/8; fg: TP 8, FP 4 -> 8/12
    res = semantic_miou([(pred, gt)], 2)
    assert res["iou"] == pytest.approx([0.5, 8 / 12])
    assert res["miou"] == pytest.approx((0.5 + 8 / 12) / 2)
    gt_ign = gt.copy()
    gt_ign[:, 1] = 255  # the wrong pixels are now ignored -> perfect
    assert semantic_miou([(pred, gt_ign)], 2)["miou"] == pytest.approx(1.0)


def test_miou_perfect_and_empty():
    gt = np.array([[0, 1], [2, 2]])
    assert semantic_miou([(gt, gt)], 3)["miou"] == pytest.approx(1.0)
    res = semantic_miou([(np.zeros_like(gt), gt)], 3)
    assert res["iou"][1] == 0.0 and res["iou"][2] == 0.0


def test_confusion_counts_pred_255_as_background_and_rejects_shape():
    gt = np.array([[1, 0]])
    conf = confusion_matrix(np.array([[255, 0]]), gt, 2)
    assert conf.tolist() == [[1, 0], [1, 0]]
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((1, 2)), 2)


def test_voc_ap_all_point():
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(
        0.5 + 0.5 * 2 / 3
    )


def _hand_case():
    a = _rect(0, 2, 0, 5)  # 10 px
    b = _rect(4, 6, 0, 5)  # 10 px
    recs = [_rec("a", [(a, 1)]), _rec("b", [(b, 1)])]
    b_part = _rect(4, 6, 0, 3)  # 6 of b's 10 px -> IoU 0.6
    preds = [
        {"image_id": "a", "category_id": 1, "score": 0.9, "mask": a},
        {"image_id": "a", "category_id": 1, "score": 0.8, "mask": _rect(6, 8, 6, 8)},  # FP
        {"image_id": "b", "category_id": 1, "score": 0.7, "mask": b_part},
    ]
    return recs, preds


def test_instance_ap_hand_computed():
    recs, preds = _hand_case()
    res = voc_instance_metrics(recs, preds, num_classes=2)
    # t=.5: TP FP TP -> recall .5 .5 1, precision 1 .5 2/3 -> .5*1 + .5*2/3
    assert res["ap50"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert res["ap25"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # t=.7: TP FP FP -> .5
    assert res["ap70"] == pytest.approx(0.5)
    assert res["ap75"] == pytest.approx(0.5)
    assert res["abo"] == pytest.approx((1.0 + 0.6) / 2)
    curve = res["pr_curves_ap50"]["1"]
    assert curve["recall"] == pytest.approx([0.5, 0.5, 1.0])


def test_instance_duplicate_is_false_positive_and_perfect_empty():
    recs, _ = _hand_case()
    a = recs[0].instances[0].mask
    b = recs[1].instances[0].mask
    perfect = [
        {"image_id": "a", "category_id": 1, "score": 0.9, "mask": a},
        {"image_id": "b", "category_id": 1, "score": 0.8, "mask": b},
    ]
    res = voc_instance_metrics(recs, perfect, 2)
    assert res["ap50"] == pytest.approx(1.0) and res["abo"] == pytest.approx(1.0)
    dup = (
        perfect[:1] + [{"image_id": "a", "category_id": 1, "score": 0.85, "mask": a}] + perfect[1:]
    )
    # TP FP TP -> .5 + .5 * 2/3
    assert voc_instance_metrics(recs, dup, 2)["ap50"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    empty = voc_instance_metrics(recs, [], 2)
    assert empty["ap50"] == 0.0 and empty["abo"] == 0.0
    wrong_class = [dict(p, category_id=2) for p in perfect]
    assert voc_instance_metrics(recs, wrong_class, 3)["ap50"] == 0.0


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def test_coco_wrapper_equals_direct_cocoeval():
    rng = np.random.default_rng(0)
    recs = []
    for i in range(3):
        h, w = 40, 48
        recs.append(
            _rec(
                f"im{i}",
                [(_rect(2 + i, 20 + i, 3, 25, h, w), 1), (_rect(22, 38, 20 + i, 45, h, w), 2)],
                h,
                w,
            )
        )
    preds = []
    for r in recs:
        for inst in r.instances:
            m = inst.mask.copy()
            m[rng.random(m.shape) < 0.15] ^= True
            preds.append(
                {
                    "image_id": r.image_id,
                    "category_id": inst.label,
                    "score": float(rng.random()),
                    "segmentation": _rle(m),
                }
            )
        preds.append(
            {
                "image_id": r.image_id,
                "category_id": 1,
                "score": 0.05,
                "segmentation": _rle(_rect(30, 40, 0, 10, 40, 48)),
            }
        )
    ours = coco_metrics_from_records(recs, ["a", "b"], preds)

    gt, ids = records_to_coco(recs, ["a", "b"])
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = coco.loadRes([dict(p, image_id=ids[p["image_id"]]) for p in preds])
    ev = COCOeval(coco, dets, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours["ap"] == pytest.approx(ev.stats[0])
    assert ours["ap50"] == pytest.approx(ev.stats[1])
    assert ours["ap75"] == pytest.approx(ev.stats[2])
    assert 0.0 < ours["ap"] < 1.0

    perfect = [
        {"image_id": r.image_id, "category_id": i.label, "score": 1.0, "mask": i.mask}
        for r in recs
        for i in r.instances
    ]
    assert coco_metrics_from_records(recs, ["a", "b"], perfect)["ap"] == pytest.approx(1.0)
    assert coco_segm_metrics(gt, [])["ap"] == 0.0


def test_box_only_images_left_out_of_mask_metrics():
    masked = _rec("masked", [(_rect(1, 5, 1, 5), 1)])
    box_only = _rec("box_only", [(_rect(1, 5, 1, 5), 1), (_rect(5, 8, 5, 8), 2)])
    box_only.instances[1].mask = None
    crowd_only_unmasked = _rec("crowd", [(_rect(1, 5, 1, 5), 1)])
    crowd_only_unmasked.instances.append(
        Instance(9, 2, np.array([5.0, 5.0, 8.0, 8.0]), None, iscrowd=True)
    )
    kept, left_out = records_with_gt_masks([masked, box_only, crowd_only_unmasked])
    assert [r.image_id for r in kept] == ["masked", "crowd"]
    assert left_out == ["box_only"]


def test_crowd_without_mask_is_its_box_and_detections_on_it_are_not_false_positives():
    h, w = 40, 48
    rec = _rec("im", [(_rect(2, 20, 3, 25, h, w), 1)], h, w)
    rec.instances.append(Instance(7, 1, np.array([30.0, 24.0, 46.0, 38.0]), None, iscrowd=True))
    gt, _ = records_to_coco([rec], ["a"])
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["area"] == 16 * 14
    preds = [
        {"image_id": "im", "category_id": 1, "score": 0.9, "mask": _rect(24, 38, 30, 46, h, w)},
        {"image_id": "im", "category_id": 1, "score": 0.5, "mask": rec.instances[0].mask},
    ]
    # The higher-scored detection lies on the crowd region: ignored, not a false positive.
    assert coco_metrics_from_records([rec], ["a"], preds)["ap50"] == pytest.approx(1.0)


def _direct_segm_stats(recs, classes, preds):
    """pycocotools' own segm stats 0-5 for `preds` (masks, no bbox), none of our wrapping."""
    gt, ids = records_to_coco(recs, classes)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    if preds:
        dets = coco.loadRes(
            [
                {
                    "image_id": ids[p["image_id"]],
                    "category_id": p["category_id"],
                    "score": p["score"],
                    "segmentation": _rle(p["mask"]),
                }
                for p in preds
            ]
        )
    else:  # loadRes refuses an empty list: an empty result set
        dets = COCO()
        dets.dataset = {"images": gt["images"], "annotations": [], "categories": gt["categories"]}
        dets.createIndex()
    ev = COCOeval(coco, dets, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [None if v < 0 else pytest.approx(v) for v in ev.stats[:6]]


def test_coco_mask_ap_sizes_detections_by_their_mask_not_their_bbox():
    h, w = 200, 200
    rec = _rec("im", [(_rect(10, 40, 10, 40, h, w), 1)], h, w)  # 900 px: a small object
    diagonal = np.zeros((h, w), bool)  # a small mask (150 px) in a large box (150 x 150)
    diagonal[np.arange(20, 170), np.arange(20, 170)] = True
    preds = [
        {"image_id": "im", "category_id": 1, "score": 0.9, "mask": diagonal,
         "bbox": [20.0, 20.0, 150.0, 150.0]},
        {"image_id": "im", "category_id": 1, "score": 0.5, "mask": rec.instances[0].mask,
         "bbox": [10.0, 10.0, 30.0, 30.0]},
    ]  # fmt: skip
    # predict_instances' results carry a bbox; with it loadRes would size the false positive
    # by its box (large) and leave it out of APs.
    ours = coco_metrics_from_records([rec], ["a"], preds)
    assert [ours[k] for k in ("ap", "ap50", "ap75", "aps", "apm", "apl")] == _direct_segm_stats(
        [rec], ["a"], preds
    )
    assert ours["aps"] < 1.0


def test_coco_mask_ap_sizes_gt_by_the_files_area_as_official_cocoeval(tmp_path):
    """COCO files store the polygon's area; COCOeval puts GT in APs/APm/APl by it, not by the
    pixel count, so an object near 32^2 falls where the official evaluation puts it."""
    h, w = 120, 120
    mask = _rect(10, 43, 10, 42, h, w)  # 33 x 32 = 1056 px: medium by its pixel count
    data = {
        "images": [{"id": 5, "file_name": "im.jpg", "width": w, "height": h}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 32, 33],
             "segmentation": _rle(mask), "area": 1000.0},  # the file's area: small
        ],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    records = read_coco(path, tmp_path).records
    ours = coco_metrics_from_records(
        records, ["a"], [{"image_id": "im", "category_id": 1, "score": 0.9, "mask": mask}]
    )
    official = COCO(str(path))
    dets = official.loadRes(
        [{"image_id": 5, "category_id": 1, "score": 0.9, "segmentation": _rle(mask)}]
    )
    ev = COCOeval(official, dets, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    want = [None if v < 0 else pytest.approx(v) for v in ev.stats[:6]]
    assert [ours[k] for k in ("ap", "ap50", "ap75", "aps", "apm", "apl")] == want
    assert ours["aps"] == pytest.approx(1.0) and ours["apm"] is None
    gt, _ = records_to_coco(records, ["a"])
    assert gt["annotations"][0]["area"] == 1000.0
    records[0].instances[0].area = None  # a source without area: the pixel count
    assert records_to_coco(records, ["a"])[0]["annotations"][0]["area"] == 1056.0


def test_gt_label_maps_ignore_the_void_band_as_the_official_voc_miou():
    obj = _rect(2, 6, 2, 6)
    band = _rect(1, 7, 1, 7) & ~obj  # VOC's 255 border around the object
    rec = _rec("im", [(obj, 1)])
    rec.void = CompressedMask.from_array(band)
    official = np.where(band, 255, np.where(obj, 1, 0)).astype(np.uint8)  # SegmentationClass
    gt = render_label_map(rec, "mask")
    np.testing.assert_array_equal(gt, official)
    # The object predicted with the band around it is right by the official protocol.
    pred = _rect(1, 7, 1, 7).astype(np.uint8)
    assert semantic_miou([(pred, gt)], 2)["miou"] == 1.0
    np.testing.assert_array_equal(semantic_target(rec, "full", None, None), official)
    # Box supervision knows only the boxes: no void there.
    box = semantic_target(rec, "box", None, None)
    assert not (box == 255).any() and (box == render_label_map(rec, "box")).all()


def test_coco_metrics_without_predictions_match_cocoeval():
    recs, _ = _hand_case()  # small objects only: no GT of medium or large area
    ours = coco_metrics_from_records(recs, ["a"], [])
    assert [ours[k] for k in ("ap", "ap50", "ap75", "aps", "apm", "apl")] == _direct_segm_stats(
        recs, ["a"], []
    )
    assert ours["ap"] == 0.0 and ours["apm"] is None and ours["apl"] is None


def test_voc_instance_ap_ignores_predictions_on_a_crowd_region_of_their_class():
    h, w = 40, 48
    rec = _rec("im", [(_rect(2, 20, 3, 25, h, w), 1)], h, w)
    crowd = _rect(24, 38, 30, 46, h, w)
    rec.instances.append(Instance(7, 1, np.array([30.0, 24.0, 46.0, 38.0]), crowd, iscrowd=True))
    obj = rec.instances[0].mask
    half_on_crowd = crowd.copy()
    half_on_crowd[24:38, 20:30] = True  # 140 of its 280 px inside the crowd region
    preds = [
        {"image_id": "im", "category_id": 1, "score": 0.9, "mask": crowd},
        {"image_id": "im", "category_id": 1, "score": 0.8, "mask": half_on_crowd},
        {"image_id": "im", "category_id": 1, "score": 0.5, "mask": obj},
    ]
    res = voc_instance_metrics([rec], preds, 2)
    coco = coco_metrics_from_records([rec], ["a"], preds)
    # share inside the crowd: 1.0 and 0.5; COCOeval ignores a detection at or above its IoU
    # threshold and counts the other as a false positive, as the VOC AP must
    assert res["ap50"] == pytest.approx(coco["ap50"]) == pytest.approx(1.0)
    assert res["ap75"] == pytest.approx(coco["ap75"]) == pytest.approx(0.5)
    assert res["abo"] == pytest.approx(1.0)  # the crowd region is no instance to cover
    # another class's prediction on the crowd region is a false positive
    other = [dict(preds[0], category_id=2), dict(preds[2], category_id=2)]
    two = ImageRecord(
        "im", rec.path, w, h, [Instance(1, 2, rec.instances[0].box, obj), rec.instances[1]]
    )
    assert voc_instance_metrics([two], other, 3)["ap50"] == pytest.approx(0.5)


def test_writers(tmp_path):
    path = write_metrics(tmp_path / "m" / "metrics.json", {"a": float("nan"), "b": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5}
    recs, preds = _hand_case()
    curves = voc_instance_metrics(recs, preds, 2)["pr_curves_ap50"]
    rows = list(csv.DictReader(write_pr_curves(tmp_path / "pr.csv", curves, ["cat"]).open()))
    assert [r["class"] for r in rows] == ["cat"] * 3
    assert float(rows[-1]["recall"]) == pytest.approx(1.0)
    data = json.loads(write_pr_curves(tmp_path / "pr.json", curves).read_text())
    assert len(data) == 3 and not list(tmp_path.glob(".*tmp"))


def test_pseudo_label_quality():
    from bbam.evaluate import pseudo_label_quality

    recs, _ = _hand_case()
    a, b = recs[0].instances[0], recs[1].instances[0]
    half_b = _rect(4, 6, 0, 3)  # IoU .6 with b
    pseudo = {
        "a": [(1, a.box, a.mask), (2, a.box, ~a.mask)],  # wrong-label entry must not be used
        "b": [(1, b.box, half_b)],
    }
    sem = {"a": a.mask.astype(np.uint8), "b": np.where(half_b, 1, 0).astype(np.uint8)}
    sem["b"][4, 0] = 255  # ignore in a pseudo label counts as background
    res = pseudo_label_quality(recs, pseudo, 2, sem)
    assert res["pseudo_mean_instance_iou"] == pytest.approx((1.0 + 0.6) / 2)
    # 128 px, 20 GT fg; predicted fg 10 (a) + 6 - 1 (b, one px set to 255) = 15, all correct
    # bg: TP 108, 5 GT-fg px predicted bg -> 108/113; fg: 15/20
    assert res["pseudo_sem_miou"] == pytest.approx((108 / 113 + 15 / 20) / 2)
    assert pseudo_label_quality(recs, {}, 2)["pseudo_mean_instance_iou"] == 0.0
