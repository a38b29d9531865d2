"""The contract between the detector and the attribution engine.

A *heads function* takes a batch of already normalised, already resized images
(B, 3, H, W) and, for each image, arbitrary proposal boxes (xyxy, in the
coordinates of that resized image), runs the backbone and the second-stage
(RoI) heads only -- no RPN -- and returns, for the concatenation of all
proposals in image order, raw class logits (N, C) including background at
index 0, raw class-specific regression deltas (N, C, 4) and the decoded,
unclipped boxes (N, C, 4). It must be differentiable w.r.t. the images.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class RoIHeadOutputs(NamedTuple):
    logits: torch.Tensor  # (N, C)
    deltas: torch.Tensor  # (N, C, 4)
    boxes: torch.Tensor  # (N, C, 4)


class HeadsFn(Protocol):
    def __call__(self, images: torch.Tensor, proposals: list[torch.Tensor]) -> RoIHeadOutputs: ...
