"""ImageRecords as a torch Dataset in the (image, target) form torchvision detectors train on."""

from __future__ import annotations

import numpy as np
import torch

from bbam.data.images import load_rgb, rgb_to_tensor
from bbam.data.records import DataError, ImageRecord


class DetectionDataset(torch.utils.data.Dataset):
    """(image 3xHxW float in [0,1], target) pairs.

    target: boxes (N,4) float32 xyxy pixels, labels (N,) int64 (1-based), image_id (index
    into `records`, int64 scalar), iscrowd (N,) int64, and masks (N,H,W) uint8 when
    `with_masks`. Crowd instances stay in the target; the training loop drops them.
    `hflip` flips an item left-right with probability 0.5 (training augmentation).

    An unreadable image raises DataError from __getitem__ on purpose: a training run must
    not silently skip data (readers already count and report skippable records).
    """

    def __init__(self, records: list[ImageRecord], with_masks: bool = False, hflip: bool = False):
        self.records = list(records)
        self.with_masks = with_masks
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        rgb = load_rgb(record.path)
        height, width = rgb.shape[:2]
        if (width, height) != (record.width, record.height):
            raise DataError(
                f"{record.path}: image is {width}x{height} but the record says "
                f"{record.width}x{record.height}"
            )
        image = rgb_to_tensor(rgb)
        boxes = np.asarray([inst.box for inst in record.instances], dtype=np.float32)
        target = {
            "boxes": torch.from_numpy(boxes.reshape(-1, 4)),
            "labels": torch.tensor([inst.label for inst in record.instances], dtype=torch.int64),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "iscrowd": torch.tensor([int(inst.iscrowd) for inst in record.instances]).long(),
        }
        if self.with_masks:
            masks = np.zeros((len(record.instances), height, width), dtype=np.uint8)
            for i, inst in enumerate(record.instances):
                mask = inst.mask
                if mask is None:
                    raise DataError(f"{record.path}: instance {inst.instance_id} has no mask")
                masks[i] = mask
            target["masks"] = torch.from_numpy(masks)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            flipped = target["boxes"].clone()
            flipped[:, 0] = width - target["boxes"][:, 2]
            flipped[:, 2] = width - target["boxes"][:, 0]
            target["boxes"] = flipped
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate_fn(batch: list) -> tuple:
    """Images differ in size: keep lists, as torchvision's detection references do."""
    return tuple(zip(*batch, strict=True))
