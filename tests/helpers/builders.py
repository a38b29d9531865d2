"""Builders several test modules share: tiny datasets, configs and toy scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from bbam.attribution import AttributionItem
from bbam.data.palette import save_palette_png
from bbam.data.records import ImageRecord, Instance
from bbam.detector import build_detector
from bbam.segmenters.semantic import SemanticTrainConfig
from bbam.segmenters.targets import render_label_map
from bbam.toy_detector import toy_scene
from bbam.train_detector import DetectorTrainConfig

CLASSES = ["square", "disc"]
SIZE = (96, 96)
SMALL = {"stride_coefs": (2.0, 6.0), "iterations": 150, "num_jitters": 200}


def shapes_records(root: Path, n: int, seed: int, h: int = 64, w: int = 80) -> list[ImageRecord]:
    """Filled squares (label 1) and discs (label 2) on a noisy background, saved as PNG."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        rgb = rng.integers(0, 80, size=(h, w, 3)).astype(np.uint8)
        instances = []
        for k, label in enumerate((1, 2)):
            size = int(rng.integers(18, 30))
            x0 = int(rng.integers(0, w // 2 - size // 2)) + k * (w // 2)
            x0 = min(x0, w - size)
            y0 = int(rng.integers(0, h - size))
            if label == 1:
                mask = (xx >= x0) & (xx < x0 + size) & (yy >= y0) & (yy < y0 + size)
            else:
                r = size / 2
                mask = (xx + 0.5 - x0 - r) ** 2 + (yy + 0.5 - y0 - r) ** 2 <= r * r
            rgb[mask] = rng.integers(170, 255, size=3)
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            instances.append(Instance(k + 1, label, box, mask=mask))
        path = root / f"img{i}.png"
        Image.fromarray(rgb).save(path)
        records.append(ImageRecord(f"img{i}", path, w, h, instances))
    return records


def tiny_detector(num_classes: int = 3, **kwargs):
    torch.manual_seed(0)
    return build_detector(
        "resnet18_fpn", num_classes, 64, 96, anchor_sizes=(8, 16, 32, 64, 128), **kwargs
    )


def tiny_detector_config(**kwargs) -> DetectorTrainConfig:
    base = dict(
        min_size=64,
        max_size=96,
        anchor_sizes=(8, 16, 32, 64, 128),
        epochs=1,
        batch_size=2,
        lr=0.01,
        warmup_iters=1,
        lr_steps=(5,),
        log_every=1,
    )
    return DetectorTrainConfig(**{**base, **kwargs})


def rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def make_segmenter_data(tmp_path, n=4, size=64):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 40 + 30).astype(np.uint8)
        y, x = 6 + 4 * i, 8 + 3 * i
        m = np.zeros((size, size), bool)
        m[y : y + 28, x : x + 24] = True
        m[y : y + 6, x : x + 6] = False  # not a box: mask != box
        img[m] = (210, 60, 50)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(path)
        box = np.array([x, y, x + 24, y + 28], float)
        records.append(ImageRecord(f"img{i}", path, size, size, [Instance(1, 1, box, m)]))
    return records


def pseudo_json(tmp_path, records):
    images, anns = [], []
    for k, r in enumerate(records, 1):
        images.append({"id": k, "file_name": r.path.name, "height": r.height, "width": r.width})
        inst = r.instances[0]
        fg = inst.mask.copy()
        fg[:, : int(inst.box[0]) + 4] = False
        ign = inst.mask & ~fg
        x1, y1, x2, y2 = inst.box
        anns.append(
            {
                "id": k,
                "image_id": k,
                "category_id": 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "segmentation": rle(fg),
                "ignore": rle(ign),
                "iscrowd": 0,
                "area": int(fg.sum()),
            }
        )
    path = tmp_path / "pseudo.json"
    path.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
        )
    )
    return path


def small_semantic_config(**kw):
    base = dict(
        supervision="bbam",
        epochs=10,
        batch_size=4,
        crop_size=64,
        scale=1.0,
        warmup_iters=1,
        lr=0.02,
        device="cpu",
        hflip=False,
    )
    base.update(kw)
    return SemanticTrainConfig(**base)


def pseudo_pngs(tmp_path, records):
    for r in records:
        lab = render_label_map(r, "mask")
        lab[lab.shape[0] // 2 :][lab[lab.shape[0] // 2 :] == 1] = 255
        save_palette_png(tmp_path / "sem" / f"{r.image_id}.png", lab)
    return tmp_path / "sem"


def four_items() -> list[AttributionItem]:
    """Two toy images with two instances each (instances of one image share its tensor)."""
    img1, boxes1, _ = toy_scene(SIZE, [(30, 32, 14, 1), (68, 64, 16, 2)])
    img2, boxes2, _ = toy_scene(SIZE, [(50, 46, 20, 2), (20, 78, 10, 1)])
    return [
        AttributionItem("i1a", img1, boxes1[0], 1),
        AttributionItem("i1b", img1, boxes1[1], 2),
        AttributionItem("i2a", img2, boxes2[0], 2),
        AttributionItem("i2b", img2, boxes2[1], 1),
    ]
