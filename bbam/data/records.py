"""The one record type every reader yields and every stage consumes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class CompressedMask:
    """An HxW bool mask held as COCO RLE (pycocotools), decoded when read.

    Readers keep GT masks this way: a 640x480 object mask is 300 kB as an array and about
    1 kB as RLE, so a COCO-sized split (860k masks) fits in memory."""

    rle: dict

    @classmethod
    def from_array(cls, mask: np.ndarray) -> CompressedMask:
        rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        return cls({"size": [int(v) for v in rle["size"]], "counts": rle["counts"]})

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rle["size"][0]), int(self.rle["size"][1])

    def decode(self) -> np.ndarray:
        with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
            return mask_utils.decode(self.rle).astype(bool)  # numpy 2 'copy' warning

    def area(self) -> int:
        return int(mask_utils.area(self.rle))


class Instance:
    """One annotated object.

    `label` is 1-based into the dataset's class list (0 is background).
    `box` is xyxy in pixels of the original image, float, x2/y2 exclusive
    (VOC's inclusive 1-based boxes are converted on read).
    `mask` is an optional HxW bool array (GT where the dataset has it). It may be given as a
    `CompressedMask`; reading `mask` then decodes a fresh array each time, so use
    `has_mask` / `mask_area` where the pixels are not needed.
    `area` is the annotation's own area where the source file gives one (COCO stores the
    polygon's area, which COCOeval sizes GT by for APs/APm/APl); None means "count the
    mask's pixels".
    """

    def __init__(
        self,
        instance_id: int,
        label: int,
        box: np.ndarray,
        mask: np.ndarray | CompressedMask | None = None,
        iscrowd: bool = False,
        difficult: bool = False,
        area: float | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.label = label
        self.box = box
        self.mask = mask
        self.iscrowd = iscrowd
        self.difficult = difficult
        self.area = area

    @property
    def mask(self) -> np.ndarray | None:
        stored = self._mask
        return stored.decode() if isinstance(stored, CompressedMask) else stored

    @mask.setter
    def mask(self, value: np.ndarray | CompressedMask | None) -> None:
        self._mask = value

    @property
    def has_mask(self) -> bool:
        return self._mask is not None

    @property
    def mask_area(self) -> int | None:
        """Pixel count of the mask without decoding it (None without a mask)."""
        stored = self._mask
        if stored is None:
            return None
        return stored.area() if isinstance(stored, CompressedMask) else int(stored.sum())

    def __repr__(self) -> str:
        return (
            f"Instance(instance_id={self.instance_id}, label={self.label}, "
            f"box={np.asarray(self.box).tolist()}, has_mask={self.has_mask}, "
            f"iscrowd={self.iscrowd}, difficult={self.difficult})"
        )


@dataclass
class ImageRecord:
    """One image and its instances.

    `void` is the dataset's own "don't care" region (VOC's 255 band around every object and
    its hard regions), held compressed; None when the dataset marks none. It is GT knowledge:
    evaluation and GT-supervised targets ignore it, box supervision never sees it."""

    image_id: str
    path: Path
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    void: CompressedMask | None = None


@dataclass
class SkipReport:
    """What a reader skipped instead of failing, counted per reason, each with examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 10:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipReport | dict) -> None:
        """Add another report's counts and examples (a dict as `as_dict` writes it)."""
        if isinstance(other, dict):
            other = SkipReport(dict(other.get("counts", {})), dict(other.get("examples", {})))
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
            room = 10 - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(list(other.examples.get(reason, []))[: max(room, 0)])

    def as_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


@dataclass
class Dataset:
    """Records plus the class names (index i+1 in `classes` is label i+1)."""

    classes: list[str]
    records: list[ImageRecord]
    skipped: SkipReport = field(default_factory=SkipReport)
    # original category id per label (COCO); empty means "the label itself"
    category_ids: list[int] = field(default_factory=list)
    # what a reader fixed and kept (such as boxes clipped to the image), counted the same way
    repaired: SkipReport = field(default_factory=SkipReport)


class DataError(ValueError):
    """Bad input that cannot be skipped; the message names the file and the problem."""
