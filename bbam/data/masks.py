"""Masks and boxes: the one home of the pixel primitives every stage shares.

Boxes are float ``xyxy`` in pixels with ``x2``/``y2`` exclusive; masks are ``(H, W)`` bool.
Decoding COCO segmentations stays with the reader (``bbam.data.coco.decode_segmentation``).
"""

from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils


def box_slices(box: np.ndarray, height: int, width: int) -> tuple[slice, slice]:
    """Integer pixel slices covering a float xyxy box (x2/y2 exclusive), clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    xa = min(max(int(math.floor(x1)), 0), width)
    ya = min(max(int(math.floor(y1)), 0), height)
    xb = min(max(int(math.ceil(x2)), xa), width)
    yb = min(max(int(math.ceil(y2)), ya), height)
    return slice(ya, yb), slice(xa, xb)


def box_region(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(height, width)`` bool mask that is True on the pixels of ``box_slices``."""
    region = np.zeros((height, width), dtype=bool)
    region[box_slices(box, height, width)] = True
    return region


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes (continuous coordinates, no +1); 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of an HxW bool mask, with `counts` as str so it is JSON-serialisable."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": rle["counts"].decode("ascii"),
    }
