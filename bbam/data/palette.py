"""The PASCAL VOC colour map and index-PNG I/O (P-mode PNGs, as VOC ships its masks)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bbam.atomic import atomic_write_bytes
from bbam.data.records import DataError

# The one ignore label of class maps: pseudo labels, the DeepLab loss and the evaluation.
IGNORE_LABEL = 255


def check_class_labels(labels: Iterable[int], where: str = "class map") -> None:
    """Raise ValueError for a label a uint8 class map cannot hold: 255 would silently read
    as ignore and 256.. wrap around, so class maps take at most 254 classes (LVIS has 1203)."""
    bad = [int(v) for v in labels if not 0 <= int(v) < IGNORE_LABEL]
    if bad:
        raise ValueError(
            f"{where}: class label {max(bad)} does not fit a uint8 class map (labels 1.."
            f"{IGNORE_LABEL - 1}, {IGNORE_LABEL} = ignore); semantic labels need at most "
            f"{IGNORE_LABEL - 1} classes"
        )


def label_png(folder: str | Path, image_id: str) -> Path:
    """``<folder>/<image_id>.png``: where a class map of an image lives (pseudo labels, VOC's
    SegmentationClass), one name for writers and readers alike."""
    return Path(folder) / f"{image_id}.png"


def voc_colormap(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the standard VOC palette (bit-interleaved label -> RGB; 255 is (224,224,192))."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_PALETTE = voc_colormap(256).reshape(-1).tolist()


def save_palette_png(path: str | Path, array: np.ndarray) -> None:
    """Write an HxW index array (values 0..255) as a P-mode PNG with the VOC palette, atomically."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{path}: index image must be 2-D, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: index values must be in 0..255")
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette(_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_index_png(path: str | Path) -> np.ndarray:
    """HxW uint8 indices of a P-mode (or L-mode) PNG, without palette conversion."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file not found")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: expected a palette or 8-bit index PNG, got mode {image.mode}"
                )
            return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: unreadable or corrupt mask PNG ({exc})") from exc
