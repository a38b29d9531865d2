"""Box-only pseudo masks to compare BBAM against: the filled box and OpenCV GrabCut."""

from __future__ import annotations

import cv2
import numpy as np

from bbam.data.masks import box_region, box_slices


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxW bool: the box (xyxy, x2/y2 exclusive) filled."""
    return box_region(np.asarray(box), height, width)


def grabcut_mask(image: np.ndarray, box: np.ndarray, iterations: int = 5) -> np.ndarray:
    """GrabCut initialised with the box as rect; (probable) foreground inside the box.

    Falls back to the filled box when GrabCut cannot run (a box covering the whole image leaves no
    background samples; a degenerate box)."""
    height, width = image.shape[:2]
    ys, xs = box_slices(np.asarray(box), height, width)
    w, h = xs.stop - xs.start, ys.stop - ys.start
    filled = box_mask(box, height, width)
    if w < 2 or h < 2 or (w >= width and h >= height):
        return filled
    mask = np.zeros((height, width), dtype=np.uint8)
    bgd = np.zeros((1, 65), dtype=np.float64)
    fgd = np.zeros((1, 65), dtype=np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's RNG: same mask in any process
    try:
        cv2.grabCut(
            bgr, mask, (xs.start, ys.start, w, h), bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT
        )
    except cv2.error:
        return filled
    return ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)) & filled
