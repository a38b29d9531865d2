"""A hand-built, differentiable toy "two-stage detector" implementing ``HeadsFn``.

Used by the attribution tests and as the fallback of ``bench/attribution.py``. Objects
are disks filled with a +/-a checker along x (class 1) or along y (class 2) on a smooth
background; fixed second-difference filters respond only to that texture. Per proposal,
RoIAlign pools the response ("occupancy", ~1 on the object, ~0 elsewhere); the class
logit grows with the occupied fraction of the proposal, and the decoded box is the
occupancy centroid with the size of a disk of the occupied area. So keeping the object
and replacing the rest by the mean (0) preserves outputs, removing (part of) it does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from bbam.heads import RoIHeadOutputs

_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class ToyDetector(nn.Module):
    """3 classes (0 = background). Parameters keep ``requires_grad`` on purpose."""

    def __init__(self, amplitude: float = 1.0, pooled: int = 14) -> None:
        super().__init__()
        self.response_scale = nn.Parameter(torch.tensor(1.0 / (4.0 * amplitude)))
        self.alpha = nn.Parameter(torch.tensor(4.0))
        self.tau = nn.Parameter(torch.tensor(0.1))
        self.bg_logit = nn.Parameter(torch.tensor(0.0))
        self.pooled = pooled

    def occupancy(self, images: torch.Tensor) -> torch.Tensor:
        g = F.pad(images.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        c = g[:, :, 1:-1, 1:-1]
        dxx = g[:, :, 1:-1, :-2] - 2 * c + g[:, :, 1:-1, 2:]  # second difference along x
        dyy = g[:, :, :-2, 1:-1] - 2 * c + g[:, :, 2:, 1:-1]  # ... along y
        return torch.cat([dxx, dyy], dim=1).abs() * self.response_scale  # (B, 2, H, W)

    def forward(self, images: torch.Tensor, proposals: list[torch.Tensor]) -> RoIHeadOutputs:
        occ = self.occupancy(images.float())
        boxes = torch.cat([p.float() for p in proposals])
        pooled = roi_align(occ, [p.float() for p in proposals], self.pooled, 1.0, 2, True)
        n = boxes.shape[0]
        pw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3)
        ph = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
        px = boxes[:, 0] + 0.5 * pw
        py = boxes[:, 1] + 0.5 * ph
        frac = pooled.mean(dim=(2, 3))  # (N, 2) occupied fraction of the proposal
        area = frac * (pw * ph)[:, None]
        g = (torch.arange(self.pooled, device=occ.device, dtype=occ.dtype) + 0.5) / self.pooled
        mass = pooled.sum(dim=(2, 3)) + 1e-6
        cu = (pooled.sum(dim=2) * g).sum(dim=2) / mass  # (N, 2) in [0, 1] of the proposal
        cv = (pooled.sum(dim=3) * g).sum(dim=2) / mass
        cx = boxes[:, None, 0] + cu * pw[:, None]
        cy = boxes[:, None, 1] + cv * ph[:, None]
        side = 2.0 * torch.sqrt(area / math.pi + 1e-6)
        dec = torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=2)
        wx, wy, ww, wh = _WEIGHTS
        d = torch.stack(
            [
                wx * (cx - px[:, None]) / pw[:, None],
                wy * (cy - py[:, None]) / ph[:, None],
                ww * torch.log(side / pw[:, None]),
                wh * torch.log(side / ph[:, None]),
            ],
            dim=2,
        )
        logits = torch.cat([self.bg_logit.expand(n, 1), self.alpha * (frac - self.tau)], dim=1)
        deltas = torch.cat([torch.zeros_like(d[:, :1]), d], dim=1)
        decoded = torch.cat([boxes[:, None, :], dec], dim=1)
        return RoIHeadOutputs(logits, deltas, decoded)


def toy_scene(
    size: tuple[int, int],
    disks: list[tuple[float, float, float, int]],
    amplitude: float = 1.0,
    slope: float = 0.004,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A (3, H, W) "normalised" image with textured disks (cx, cy, r, label in {1, 2}) on a
    gentle ramp. Returns the image, the disks' boxes (xyxy) and their boolean masks."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = slope * (xs + ys).float() - slope * (h + w) / 2
    boxes, masks = [], []
    for cx, cy, r, label in disks:
        inside = (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= r * r
        checker = ((xs if label == 1 else ys) % 2).float() * 2 - 1
        img = torch.where(inside, amplitude * checker, img)
        yy, xx = torch.nonzero(inside, as_tuple=True)
        boxes.append(
            torch.tensor([xx.min(), yy.min(), xx.max() + 1, yy.max() + 1], dtype=torch.float32)
        )
        masks.append(inside)
    return img[None].repeat(3, 1, 1), boxes, masks
