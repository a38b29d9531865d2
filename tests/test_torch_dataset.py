from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bbam.data.records import DataError, ImageRecord, Instance
from bbam.data.torch_dataset import DetectionDataset, collate_fn


def _record(tmp_path: Path, name: str = "a", h: int = 40, w: int = 60) -> ImageRecord:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[5:15, 10:30] = 255
    path = tmp_path / f"{name}.png"
    Image.fromarray(rgb).save(path)
    mask = np.zeros((h, w), bool)
    mask[5:15, 10:30] = True
    inst = [
        Instance(1, 2, np.array([10, 5, 30, 15], np.float32), mask=mask),
        Instance(
            2, 1, np.array([0, 0, 8, 8], np.float32), mask=np.ones((h, w), bool), iscrowd=True
        ),
    ]
    return ImageRecord(name, path, w, h, inst)


def test_item_and_collate(tmp_path):
    ds = DetectionDataset([_record(tmp_path), _record(tmp_path, "b")], with_masks=True)
    image, target = ds[1]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    assert float(image.max()) == 1.0 and float(image[:, 0, 0].max()) == 0.0
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 8, 8]]
    assert target["labels"].tolist() == [2, 1]
    assert target["iscrowd"].tolist() == [0, 1]
    assert int(target["image_id"]) == 1
    assert target["masks"].shape == (2, 40, 60) and int(target["masks"][0].sum()) == 200
    images, targets = collate_fn([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2


def test_empty_record_has_0x4_boxes(tmp_path):
    record = _record(tmp_path)
    record.instances = []
    _, target = DetectionDataset([record])[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_hflip_moves_boxes_masks_and_pixels_together(tmp_path):
    ds = DetectionDataset([_record(tmp_path)], with_masks=True, hflip=True)
    plain_image, plain = DetectionDataset([_record(tmp_path)], with_masks=True)[0]
    seen_flip = False
    torch.manual_seed(0)
    for _ in range(20):
        image, target = ds[0]
        if torch.equal(image, plain_image):
            assert torch.equal(target["boxes"], plain["boxes"])
            continue
        seen_flip = True
        assert torch.equal(image, plain_image.flip(-1))
        assert target["boxes"][0].tolist() == [60 - 30, 5, 60 - 10, 15]
        x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
        assert int(target["masks"][0][y1:y2, x1:x2].sum()) == int(target["masks"][0].sum())
    assert seen_flip


def test_unreadable_image_raises(tmp_path):
    record = _record(tmp_path)
    record.path.write_bytes(b"not a png")
    with pytest.raises(DataError, match="a.png"):
        DetectionDataset([record])[0]


def test_size_mismatch_raises(tmp_path):
    record = _record(tmp_path)
    record.width = 61
    with pytest.raises(DataError, match="record says"):
        DetectionDataset([record])[0]
