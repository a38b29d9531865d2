"""The synthetic dataset: determinism, round trip through both readers, shape-only classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from skimage.measure import regionprops

from bbam.data.coco import read_coco
from bbam.data.images import load_rgb
from bbam.data.palette import load_index_png
from bbam.data.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, generate_synthetic
from bbam.data.voc import read_voc

torch.set_num_threads(1)

SMALL = SyntheticConfig(num_train=60, num_val=20, image_size=(96, 128), seed=3)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn")
    return root, generate_synthetic(root, SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = SyntheticConfig(num_train=3, num_val=2, image_size=(64, 80), seed=11)
    generate_synthetic(tmp_path / "a", cfg)
    generate_synthetic(tmp_path / "b", cfg)
    generate_synthetic(tmp_path / "c", SyntheticConfig(**{**cfg.__dict__, "seed": 12}))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert set(a) == set(c)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 5
    assert all(a[k] != c[k] for k in jpgs)


def test_config_rejects_unknown_keys_and_accepts_yaml_lists():
    with pytest.raises(TypeError):
        SyntheticConfig(num_images=3)
    assert SyntheticConfig(image_size=[64, 96]).image_size == (64, 96)
    with pytest.raises(ValueError):
        SyntheticConfig(min_objects=3, max_objects=2)


def test_round_trip_voc_and_coco_agree(small_root):
    root, summary = small_root
    voc_root = root / "VOC2012"
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}.json"
        voc = read_voc(root, split, classes=SYNTHETIC_CLASSES)
        coco = read_coco(ann, voc_root / "JPEGImages")
        assert voc.classes == coco.classes == list(SYNTHETIC_CLASSES)
        assert coco.category_ids == [1, 2, 3, 4]
        assert voc.skipped.total == 0 and coco.skipped.total == 0
        n_split = SMALL.num_train if split == "train" else SMALL.num_val
        assert len(voc.records) == len(coco.records) == n_split
        counts = dict.fromkeys(SYNTHETIC_CLASSES, 0)
        for rv, rc in zip(voc.records, coco.records, strict=True):
            assert rv.image_id == rc.image_id and rv.image_id.startswith("syn_")
            assert rv.path == rc.path and rv.path.is_file()
            assert (rv.width, rv.height) == (rc.width, rc.height) == (128, 96)
            assert 1 <= len(rv.instances) <= SMALL.max_objects
            assert len(rv.instances) == len(rc.instances)
            union = np.zeros((96, 128), dtype=int)
            for iv, ic in zip(rv.instances, rc.instances, strict=True):
                assert iv.instance_id == ic.instance_id
                assert iv.label == ic.label
                np.testing.assert_array_equal(iv.box, ic.box)
                np.testing.assert_array_equal(iv.mask, ic.mask)
                ys, xs = np.nonzero(iv.mask)  # box is the tight box of the visible mask
                np.testing.assert_array_equal(
                    iv.box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                )
                assert iv.mask.sum() >= SMALL.min_object_pixels
                union += iv.mask
                counts[SYNTHETIC_CLASSES[iv.label - 1]] += 1
            assert union.max() <= 1  # visible masks do not overlap
            assert load_index_png(voc_root / "SegmentationClass" / f"{rv.image_id}.png").max() <= 4
        assert counts == summary["splits"][split]["instances"]
        api = COCO(str(ann))
        assert len(api.getImgIds()) == n_split
        ann0 = api.loadAnns(api.getAnnIds())[0]
        assert api.annToMask(ann0).sum() == ann0["area"]


def _colour_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    px = image[mask].astype(np.float64)
    hists = [np.histogram(px[:, c], bins=8, range=(0, 256))[0] / len(px) for c in range(3)]
    return np.concatenate([px.mean(0) / 255, px.std(0) / 255, *hists])


def _shape_features(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    props = regionprops(mask.astype(np.uint8))[0]
    hu = props.moments_hu
    hu = -np.sign(hu) * np.log10(np.abs(hu) + 1e-12)
    x1, y1, x2, y2 = box.astype(int)
    fill = mask.sum() / ((x2 - x1) * (y2 - y1))
    ys, xs = np.nonzero(mask)
    dist = np.hypot(ys - ys.mean(), xs - xs.mean())
    radial = np.histogram(dist / (dist.max() + 1e-6), bins=6, range=(0, 1))[0] / len(dist)
    shape = [fill, props.solidity, props.euler_number, props.extent, props.eccentricity]
    return np.concatenate([shape, hu[:4], radial])


def _logreg_predict(x_tr, y_tr, x_te, k, iters=500, lr=0.5, l2=1e-2):
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    w, b = np.zeros((x_tr.shape[1], k)), np.zeros(k)
    onehot = np.eye(k)[y_tr]
    for _ in range(iters):
        z = x_tr @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = p - onehot
        w -= lr * (x_tr.T @ g / len(y_tr) + l2 * w)
        b -= lr * g.mean(0)
    return (x_te @ w + b).argmax(1)


def _two_fold_accuracy(x, y, k):
    fold = np.arange(len(y)) % 2 == 0
    accs = [(_logreg_predict(x[~f], y[~f], x[f], k) == y[f]).mean() for f in (fold, ~fold)]
    return float(np.mean(accs))


def test_classes_differ_by_shape_not_colour(small_root):
    root, _ = small_root
    colour, shape, labels = [], [], []
    for split in ("train", "val"):
        for record in read_voc(root, split, classes=SYNTHETIC_CLASSES).records:
            image = load_rgb(record.path)
            for inst in record.instances:
                colour.append(_colour_features(image, inst.mask))
                shape.append(_shape_features(inst.mask, inst.box))
                labels.append(inst.label - 1)
    y = np.array(labels)
    k = len(SYNTHETIC_CLASSES)
    assert len(y) >= 100 and np.bincount(y, minlength=k).min() >= 15
    chance = 1.0 / k
    colour_acc = _two_fold_accuracy(np.array(colour), y, k)
    shape_acc = _two_fold_accuracy(np.array(shape), y, k)
    assert colour_acc < chance + 0.15, colour_acc
    assert shape_acc > 0.7, shape_acc
