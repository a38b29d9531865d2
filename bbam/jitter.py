"""Jittered proposals around a box and the choice of positive proposals (BBAM §3.3).

Not the region proposals of ``params.yaml``'s ``proposals:`` section (MCG or superpixels,
``bbam.mcg``): these are the boxes the attribution explains the detector on.

The reference code draws proposals with Python's unseeded ``random``; here every
instance gets its own ``torch.Generator`` seeded from (seed, instance key), so a
result never depends on which other instances share its batch.
"""

from __future__ import annotations

import hashlib

import torch


def instance_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator whose seed depends only on ``seed`` and the instance ``key``."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def jitter_boxes(
    box: torch.Tensor,
    num: int,
    fraction: float,
    image_hw: tuple[int, int],
    generator: torch.Generator,
) -> torch.Tensor:
    """``num`` copies of ``box`` (xyxy) with each coordinate moved independently by
    U(-fraction, fraction) times the box width (x) or height (y), clipped to the image.

    The unjittered box is not included (as in the reference). Returns (num, 4) float32 on CPU.
    """
    box = box.detach().to("cpu", torch.float32).reshape(4)
    w = float(box[2] - box[0])
    h = float(box[3] - box[1])
    u = torch.rand((num, 4), generator=generator, dtype=torch.float32) * 2.0 - 1.0
    scale = torch.tensor([w, h, w, h], dtype=torch.float32) * fraction
    out = box[None, :] + u * scale[None, :]
    height, width = image_hw
    out[:, 0::2] = out[:, 0::2].clamp(0.0, float(width))
    out[:, 1::2] = out[:, 1::2].clamp(0.0, float(height))
    return out


def box_iou_to_one(boxes: torch.Tensor, box: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """IoU of each row of ``boxes`` (N, 4) with the single ``box`` (4,).

    ``truncate`` mimics the reference: coordinates cast to int, areas without the +1.
    """
    boxes = boxes.float()
    box = box.to(boxes).reshape(1, 4)
    if truncate:
        boxes = boxes.trunc()
        box = box.trunc()
    ix1 = torch.maximum(boxes[:, 0], box[:, 0])
    iy1 = torch.maximum(boxes[:, 1], box[:, 1])
    ix2 = torch.minimum(boxes[:, 2], box[:, 2])
    iy2 = torch.minimum(boxes[:, 3], box[:, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area_a = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    area_b = (box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def select_positives(
    logits: torch.Tensor,
    decoded: torch.Tensor,
    label: int,
    box: torch.Tensor,
    thresholds: tuple[float, ...],
    cap: int,
    truncate: bool = True,
) -> tuple[torch.Tensor, float | None]:
    """Indices of positive proposals and the IoU threshold that produced them.

    Positive: argmax over all logits (background included) is ``label`` and
    IoU(decoded box of class ``label``, ``box``) > threshold. Cascade as in the
    reference: stop at the first threshold giving MORE than ``cap`` positives and keep
    the first ``cap`` in index order; otherwise keep all positives at the last threshold.
    Returns (empty index tensor, None) when there is none.
    """
    correct = logits.argmax(dim=1) == label
    iou = box_iou_to_one(decoded[:, label, :], box, truncate=truncate)
    idx = torch.empty(0, dtype=torch.long, device=logits.device)
    for thr in thresholds:
        idx = torch.nonzero(correct & (iou > thr), as_tuple=False).flatten()
        if idx.numel() > cap:
            return idx[:cap], float(thr)
    if idx.numel() == 0:
        return idx, None
    return idx[:cap], float(thresholds[-1])
