"""A procedural instance-segmentation dataset: the embedded default, deterministic from a seed.

Why: the pipeline needs a dataset with real VOC/COCO files and exact GT masks without
downloads. Classes differ by SHAPE only (ring, star, crescent, cross); every object's colour
and texture come from the same random process as the background, so colour never tells the
class and a detector has to look at the outline.

Conventions (documented choices):
- Objects are drawn in order, later over earlier (occlusion). GT masks are the VISIBLE part.
  An object is placed only if, after drawing it, every earlier object keeps at least
  `min_visible_frac` (default 20%) of its full in-image shape and `min_object_pixels` pixels;
  otherwise the placement is retried (new position and size), and after `max_tries` failures the
  object is not drawn at all. So every drawn object is annotated: no unlabelled objects.
- A pixel belongs to an object where its 2x2 super-sampled coverage is >= 0.5 (edges are
  anti-aliased in the image, masks are binary).
- Boxes are the tight box of the visible mask (VOC convention: visible extent), 0-based,
  x2/y2 exclusive in memory; the XML has VOC's 1-based inclusive coordinates.
- SegmentationClass / SegmentationObject PNGs have NO 255 "void" border around objects (the
  masks are exact, so there is nothing uncertain to mark); 0 is background.
- Contrast: an object's texture mean differs from the mean of what lies under it by at least
  `min_contrast` (RGB Euclidean); the same rule for every class, so colour stays class-free.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bbam.atomic import atomic_write_bytes
from bbam.data.palette import save_palette_png
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.data.writers import write_coco_json, write_voc_xml

SYNTHETIC_CLASSES: tuple[str, ...] = ("ring", "star", "crescent", "cross")


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = 160
    num_val: int = 48
    image_size: tuple[int, int] = (160, 224)  # (height, width)
    min_objects: int = 1
    max_objects: int = 4
    min_object_frac: float = 0.15  # object size relative to the image short side
    max_object_frac: float = 0.7
    seed: int = 0
    jpeg_quality: int = 95
    min_visible_frac: float = 0.2
    min_object_pixels: int = 24
    min_contrast: float = 48.0
    noise_std: float = 4.0
    max_tries: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"image_size must be (height, width) >= 16, got {self.image_size}")
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("num_train and num_val must be >= 0")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 0.0 < self.min_object_frac <= self.max_object_frac <= 1.0:
            raise ValueError("need 0 < min_object_frac <= max_object_frac <= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if not 0.0 <= self.min_visible_frac < 1.0:
            raise ValueError("min_visible_frac must be in [0, 1)")


# ---------------------------------------------------------------- textures


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid, bicubically upsampled."""
    gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 in 0..255: gradient + value noise + optional stripes + soft blobs.
    Used for backgrounds and objects alike (one colour/texture distribution for everything)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    tex = c1[None, None, :] + (c2 - c1)[None, None, :] * t[..., None]

    cell = rng.uniform(4.0, 32.0)
    noise = _value_noise(rng, h, w, cell) + 0.5 * _value_noise(rng, h, w, max(2.0, cell / 3))
    tex += rng.uniform(5.0, 35.0) * noise[..., None] * rng.uniform(0.6, 1.0, 3)[None, None, :]

    if rng.random() < 0.5:
        period, a, phase = rng.uniform(4.0, 24.0), rng.uniform(0, 2 * math.pi), rng.uniform(0, 6.3)
        s = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period + phase)
        strength = rng.uniform(0.2, 0.6)
        c3 = rng.uniform(0, 255, 3)
        s = (strength * s)[..., None]
        tex = tex * (1 - s) + c3[None, None, :] * s

    scale = max(h, w)
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.3, 2) * scale
        d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        alpha = (np.clip((1.0 - d) * 3.0, 0.0, 1.0) * rng.uniform(0.3, 0.9))[..., None]
        tex = tex * (1 - alpha) + rng.uniform(0, 255, 3)[None, None, :] * alpha
    return np.clip(tex, 0, 255).astype(np.float32)


# ---------------------------------------------------------------- shapes


def _shape_params(rng: np.random.Generator, name: str) -> dict:
    if name == "ring":
        return {"r_in": rng.uniform(0.45, 0.7)}
    if name == "star":
        return {"points": int(rng.integers(5, 7)), "inner": rng.uniform(0.38, 0.55)}
    if name == "crescent":
        r2 = rng.uniform(0.8, 1.0)
        return {"r2": r2, "d": r2 - 1.0 + rng.uniform(0.3, 0.6)}
    if name == "cross":
        return {"half_width": rng.uniform(0.2, 0.36)}
    raise ValueError(f"unknown synthetic shape {name!r}")


def _inside(name: str, p: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the canonical shape, which lies inside the unit disc / square."""
    if name == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= p["r_in"] ** 2)
    if name == "star":
        k = p["points"]
        sector = 2 * math.pi / k
        phi = np.mod(np.arctan2(v, u), sector)
        phi = np.minimum(phi, sector - phi)  # fold onto [0, pi/k] by symmetry
        rho = np.sqrt(u * u + v * v)
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        # edge from the outer vertex A=(1,0) to the inner vertex B at angle pi/k
        bx, by = p["inner"] * math.cos(sector / 2), p["inner"] * math.sin(sector / 2)
        ex, ey = bx - 1.0, by
        return ex * py - ey * (px - 1.0) >= 0.0  # same side as the origin
    if name == "crescent":
        return (u * u + v * v <= 1.0) & ((u - p["d"]) ** 2 + v * v > p["r2"] ** 2)
    if name == "cross":
        hw = p["half_width"]
        au, av = np.abs(u), np.abs(v)
        return ((au <= 1.0) & (av <= hw)) | ((av <= 1.0) & (au <= hw))
    raise ValueError(f"unknown synthetic shape {name!r}")


def _rasterise(
    name: str, p: dict, cx: float, cy: float, sx: float, sy: float, theta: float, window: tuple
) -> np.ndarray:
    """Coverage (0..1) of the shape over the window's pixels, 2x2 super-sampled."""
    y0, y1, x0, x1 = window
    ys = y0 + (np.arange(2 * (y1 - y0)) + 0.5) / 2.0
    xs = x0 + (np.arange(2 * (x1 - x0)) + 0.5) / 2.0
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    c, s = math.cos(theta), math.sin(theta)
    u = (dx * c + dy * s) / sx
    v = (-dx * s + dy * c) / sy
    inside = _inside(name, p, u, v).astype(np.float32)
    return inside.reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3))


# ---------------------------------------------------------------- one image


def _render_image(
    rng: np.random.Generator, config: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """Returns (uint8 image, owner map with 1..n in drawing order, labels, rejected count)."""
    h, w = config.image_size
    canvas = _texture(rng, h, w)
    owner = np.zeros((h, w), dtype=np.int32)
    full_areas: list[int] = []
    visible: list[int] = []
    labels: list[int] = []
    rejected = 0
    short = min(h, w)
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        label = int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1))
        name = SYNTHETIC_CLASSES[label - 1]
        placed = False
        for _try in range(config.max_tries):
            params = _shape_params(rng, name)
            size = rng.uniform(config.min_object_frac, config.max_object_frac) * short
            sx = size / 2.0
            sy = sx * rng.uniform(0.6, 1.0)
            theta = rng.uniform(0, 2 * math.pi)
            radius = 1.1 * max(sx, sy)
            lo_x, hi_x = 0.6 * radius, w - 0.6 * radius
            lo_y, hi_y = 0.6 * radius, h - 0.6 * radius
            cx = rng.uniform(lo_x, hi_x) if hi_x > lo_x else w / 2.0
            cy = rng.uniform(lo_y, hi_y) if hi_y > lo_y else h / 2.0
            win = (
                max(0, int(cy - radius) - 1),
                min(h, int(math.ceil(cy + radius)) + 1),
                max(0, int(cx - radius) - 1),
                min(w, int(math.ceil(cx + radius)) + 1),
            )
            alpha = _rasterise(name, params, cx, cy, sx, sy, theta, win)
            full = alpha >= 0.5
            area = int(full.sum())
            if area < config.min_object_pixels:
                continue
            y0, y1, x0, x1 = win
            hidden = np.bincount(owner[y0:y1, x0:x1][full], minlength=len(labels) + 1)
            after = [visible[j] - int(hidden[j + 1]) for j in range(len(labels))]
            if any(
                a < max(config.min_object_pixels, config.min_visible_frac * f)
                for a, f in zip(after, full_areas, strict=True)
            ):
                continue
            region = canvas[y0:y1, x0:x1]
            tex = _texture(rng, y1 - y0, x1 - x0)
            under = region[full].mean(axis=0)
            for _t in range(4):
                if np.linalg.norm(tex[full].mean(axis=0) - under) >= config.min_contrast:
                    break
                tex = _texture(rng, y1 - y0, x1 - x0)
            diff = tex[full].mean(axis=0) - under
            dist = float(np.linalg.norm(diff))
            if dist < config.min_contrast:
                # push the texture mean away from what lies under it, to the side with room
                direction = diff / dist if dist > 1e-3 else rng.normal(size=3)
                direction = direction / np.linalg.norm(direction)
                target = config.min_contrast + 8.0
                shift = direction * (target - dist)
                if np.any(np.abs(under + direction * target - 127.5) > 127.5):
                    shift = -direction * (target + dist)
                tex = np.clip(tex + shift, 0, 255)
            a = alpha[..., None]
            canvas[y0:y1, x0:x1] = region * (1 - a) + tex * a
            owner[y0:y1, x0:x1][full] = len(labels) + 1
            for j in range(len(labels)):
                visible[j] = after[j]
            visible.append(area)
            full_areas.append(area)
            labels.append(label)
            placed = True
            break
        if not placed:
            rejected += 1
    canvas += rng.normal(0.0, config.noise_std, canvas.shape).astype(np.float32)
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return image, owner, labels, rejected


def _box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


# ---------------------------------------------------------------- the dataset


def generate_synthetic(root: Path, config: SyntheticConfig = SyntheticConfig()) -> dict:
    """Write the dataset under `root` (VOC2012 tree + COCO JSONs); return a summary:
    {"classes": [...], "splits": {split: {"images": n, "instances": {class: n}}},
     "rejected_objects": n}. Same config -> same bytes."""
    root = Path(root)
    voc = root / "VOC2012"
    jpeg_dir = voc / "JPEGImages"
    classes = list(SYNTHETIC_CLASSES)
    summary: dict = {"classes": classes, "splits": {}, "rejected_objects": 0}
    next_number = 1
    all_ids: list[str] = []
    for split_index, (split, count) in enumerate(
        (("train", config.num_train), ("val", config.num_val))
    ):
        records: list[ImageRecord] = []
        numbers: list[int] = []
        per_class = dict.fromkeys(classes, 0)
        next_instance = 1
        for i in range(count):
            rng = np.random.default_rng([config.seed, split_index, i])
            image, owner, labels, rejected = _render_image(rng, config)
            summary["rejected_objects"] += rejected
            image_id = f"syn_{next_number:06d}"
            numbers.append(next_number)
            next_number += 1
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=config.jpeg_quality)
            path = jpeg_dir / f"{image_id}.jpg"
            atomic_write_bytes(path, buffer.getvalue())

            instances = []
            for k, label in enumerate(labels, start=1):
                mask = owner == k
                instances.append(Instance(next_instance, label, _box_of(mask), mask))
                next_instance += 1
                per_class[classes[label - 1]] += 1
            record = ImageRecord(image_id, path, image.shape[1], image.shape[0], instances)
            records.append(record)
            write_voc_xml(voc / "Annotations" / f"{image_id}.xml", record, classes)
            class_map = np.zeros(owner.shape, dtype=np.uint8)
            for k, label in enumerate(labels, start=1):
                class_map[owner == k] = label
            save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", class_map)
            save_palette_png(voc / "SegmentationObject" / f"{image_id}.png", owner.astype(np.uint8))

        ids = [r.image_id for r in records]
        all_ids += ids
        _write_list(voc / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
        write_coco_json(
            root / "annotations" / f"instances_{split}.json",
            Dataset(classes, records),
            image_root=jpeg_dir,
            image_ids=numbers,
        )
        summary["splits"][split] = {"images": len(records), "instances": per_class}
    _write_list(voc / "ImageSets" / "Segmentation" / "trainval.txt", all_ids)
    return summary


def _write_list(path: Path, ids: Sequence[str]) -> None:
    atomic_write_bytes(path, "".join(f"{i}\n" for i in ids).encode("ascii"))
