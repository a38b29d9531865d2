"""Box-only pseudo masks to compare BBAM against: the filled box and OpenCV GrabCut."""

from __future__ import annotations

import cv2
import numpy as np

from bbam.data.masks import box_region, box_slices
from bbam.refine import seeded_grabcut


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxW bool: the box (xyxy, x2/y2 exclusive) filled."""
    return box_region(np.asarray(box), height, width)


def grabcut_mask(image: np.ndarray, box: np.ndarray, iterations: int = 5) -> np.ndarray:
    """GrabCut initialised by the box: background outside, probable foreground inside (what
    OpenCV's rect initialisation sets); (probable) foreground inside the box.

    Falls back to the filled box when GrabCut cannot run (a box covering the whole image leaves no
    background samples; a degenerate box)."""
    height, width = image.shape[:2]
    ys, xs = box_slices(np.asarray(box), height, width)
    filled = box_mask(box, height, width)
    if xs.stop - xs.start < 2 or ys.stop - ys.start < 2:
        return filled
    seeds = np.where(filled, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    cut = seeded_grabcut(image, seeds, iterations)
    return filled if cut is None else cut & filled
