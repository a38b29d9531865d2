"""Read any image file as 8-bit RGB, or fail with a message naming the file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bbam.data.records import DataError

# What Pillow raises on a corrupt or hostile file: its plugins let struct/index errors out on
# bad headers, and a header claiming over 2 x Image.MAX_IMAGE_PIXELS raises
# DecompressionBombError (an Exception, not an OSError). Each becomes a DataError naming the
# file, so the data stage records the image as unreadable instead of stopping. The limit
# itself stays: a real image that large would not fit the pipeline's memory either.
_PIL_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
    Image.DecompressionBombError,
)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit / 32-bit / float image data down to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16 or array.dtype == np.int32 or array.dtype == np.uint32:
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float64) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    raise DataError(f"unsupported pixel type {array.dtype}")


def load_rgb(path: str | Path) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted.
    Missing, truncated and corrupt files raise DataError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so truncation is detected here
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                gray = _to_uint8(np.asarray(image))
                return np.repeat(gray[..., None], 3, axis=2)
            if image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            ):
                image = image.convert("RGBA")
            rgb = np.array(image.convert("RGB"))  # a writable copy: C extensions (CRF) need one
    except _PIL_ERRORS as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DataError(f"{path}: unexpected image shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def rgb_to_tensor(rgb: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 in [0, 1], on ``device`` (moved as uint8)."""
    tensor = torch.from_numpy(np.require(rgb, requirements=["C", "W"]))  # copies only if needed
    if device is not None:
        tensor = tensor.to(device)
    return tensor.permute(2, 0, 1).float().div_(255)


def load_tensor(path: str | Path, device: torch.device | str | None = None) -> torch.Tensor:
    """An image file as a (3, H, W) float32 tensor in [0, 1] (see `load_rgb`)."""
    return rgb_to_tensor(load_rgb(path), device)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except _PIL_ERRORS as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from exc


def checked_size(path: str | Path, width: int, height: int, source: str | Path) -> tuple[int, int]:
    """(width, height) that `source` (an annotation file) gives for the image at `path`.

    A missing size (<= 0) is read from the header. A given size must match the header: boxes
    are clipped to it and masks are decoded at it, so a wrong one makes every mask of the image
    the wrong shape. Only the header is read (about 50 us an image); a missing or unreadable
    file is left to `load_rgb`, which names it when a stage needs the pixels.
    """
    if width <= 0 or height <= 0:
        return image_size(path)
    try:
        actual = image_size(path)
    except DataError:
        return width, height
    if actual != (width, height):
        raise DataError(
            f"{path}: image is {actual[0]}x{actual[1]} but {source} says {width}x{height}"
        )
    return width, height


def path_in_root(root: Path, name: str, source: str | Path) -> Path:
    """`root / name` for a file name read from `source` (an annotation file), refusing names
    that lead outside `root` ("../x.jpg", "/etc/x"): annotations must not make the pipeline read
    files elsewhere. The check is lexical, so folders symlinked inside the root still work."""
    path = root / name
    absolute_root = os.path.abspath(root)
    if os.path.commonpath([absolute_root, os.path.abspath(path)]) != absolute_root:
        raise DataError(f"{source}: file name {name!r} is outside the image folder {root}")
    return path


def clip_box(box: list[float], width: int, height: int) -> np.ndarray | None:
    """xyxy `box` clipped to a width x height image (float32), or None when no area is left."""
    x1, y1, x2, y2 = box
    clipped = np.array(
        [
            min(max(x1, 0.0), width),
            min(max(y1, 0.0), height),
            min(max(x2, 0.0), width),
            min(max(y2, 0.0), height),
        ],
        dtype=np.float32,
    )
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None
    return clipped
