"""The one record type every reader yields and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Instance:
    """One annotated object.

    `label` is 1-based into the dataset's class list (0 is background).
    `box` is xyxy in pixels of the original image, float, x2/y2 exclusive
    (VOC's inclusive 1-based boxes are converted on read).
    `mask` is an optional HxW bool array (GT where the dataset has it).
    """

    instance_id: int
    label: int
    box: np.ndarray
    mask: np.ndarray | None = None
    iscrowd: bool = False
    difficult: bool = False


@dataclass
class ImageRecord:
    image_id: str
    path: Path
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)


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


@dataclass
class Dataset:
    """Records plus the class names (index i+1 in `classes` is label i+1)."""

    classes: list[str]
    records: list[ImageRecord]
    skipped: SkipReport = field(default_factory=SkipReport)
    # original category id per label (COCO); empty means "the label itself"
    category_ids: list[int] = field(default_factory=list)


class DataError(ValueError):
    """Bad input that cannot be skipped; the message names the file and the problem."""
