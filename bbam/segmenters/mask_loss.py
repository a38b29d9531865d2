"""The reference's ignore-aware Mask R-CNN mask loss, then the RoIHeads that use it.

Mask targets are one uint8 map per instance: 0 = background, ``MASK_FG`` = foreground,
``MASK_IGNORE`` = ignore. Keeping ignore inside ``target["masks"]`` lets torchvision's
transform resize it (nearest) with the masks; `IgnoreAwareRoIHeads` splits it into a
foreground and an ignore channel and crops both with roi_align exactly like torchvision's
``project_masks_on_boxes``. Laid out like torchvision's ``roi_heads.py``: loss functions
first, then the class that calls them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    project_masks_on_boxes,
)

MASK_FG, MASK_IGNORE = 1, 2  # codes inside one instance's encoded mask (not label 255)


def _neighbour_any(mask: torch.Tensor) -> torch.Tensor:
    """(N,H,W) bool -> True where at least one of the 8 neighbours (not the pixel) is True."""
    kernel = torch.ones(1, 1, 3, 3, dtype=torch.float32, device=mask.device)
    kernel[0, 0, 1, 1] = 0
    count = F.conv2d(mask[:, None].float(), kernel, padding=1)[:, 0]
    return count > 0


def grow_seeds(
    probs: torch.Tensor, fg: torch.Tensor, ignore: torch.Tensor, hi: float = 0.9, lo: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference seed growing (BBAM mask_head/loss.py): which pixels count as fg / bg.

    Seeds: fg = foreground mask, bg = outside the not-background mask (fg | ignore band); they
    are never flipped. Any non-bg-seed pixel with sigma > hi joins the fg selection and any
    non-fg-seed pixel with sigma < lo the bg selection (so only ignore-band pixels are added).
    As in the reference, a selected pixel - seed or grown - counts only if at least one of its
    8 neighbours is selected with the same label (isolated pixels drop out). One pass.
    """
    ignore = ignore.bool()
    seed_fg = fg.bool() & ~ignore
    seed_bg = ~seed_fg & ~ignore
    sel_fg = (seed_fg | (probs > hi)) & ~seed_bg
    sel_bg = (seed_bg | (probs < lo)) & ~seed_fg
    return sel_fg & _neighbour_any(sel_fg), sel_bg & _neighbour_any(sel_bg)


def ignore_aware_mask_loss(
    logits: torch.Tensor,
    fg: torch.Tensor,
    ignore: torch.Tensor,
    balanced: bool = True,
    hi: float = 0.9,
    lo: float = 0.1,
    seed_growing: bool = True,
) -> torch.Tensor:
    """Class-balanced BCE: (mean over counted fg + mean over counted bg) / 2.

    With seed growing (pseudo GT with ignore) the counted pixels come from `grow_seeds`, every
    other pixel gets exactly zero gradient, and a batch lacking either counted fg or counted bg
    gives a zero loss (reference behaviour). Without it (full/box masks) all pixels count and
    an empty side contributes 0.
    """
    if seed_growing:
        with torch.no_grad():
            use_fg, use_bg = grow_seeds(torch.sigmoid(logits.float()), fg, ignore, hi, lo)
    else:
        use_fg = fg.bool() & ~ignore.bool()
        use_bg = ~fg.bool() & ~ignore.bool()
    bce = F.binary_cross_entropy_with_logits(logits.float(), use_fg.float(), reduction="none")
    counted = (use_fg | use_bg).float()
    if not balanced:
        return (bce * counted).sum() / counted.sum().clamp(min=1)
    if seed_growing and not (use_fg.any() and use_bg.any()):
        return (bce * counted).sum() * 0
    fgw, bgw = use_fg.float(), use_bg.float()
    loss_fg = (bce * fgw).sum() / fgw.sum().clamp(min=1)
    loss_bg = (bce * bgw).sum() / bgw.sum().clamp(min=1)
    return 0.5 * (loss_fg + loss_bg)


def project_targets(
    masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded (n,H,W) masks -> (fg, ignore) RoI targets, each cropped like torchvision does."""
    fg = project_masks_on_boxes((masks == MASK_FG).to(torch.uint8), boxes, matched_idxs, size)
    ign = project_masks_on_boxes((masks == MASK_IGNORE).to(torch.uint8), boxes, matched_idxs, size)
    ign_b = ign >= 0.5
    return (fg >= 0.5) & ~ign_b, ign_b


class IgnoreAwareRoIHeads(RoIHeads):
    """torchvision RoIHeads whose mask loss is the reference's ignore-aware seed-growing loss."""

    def __init__(
        self,
        *args: Any,
        mask_loss: str = "balanced",
        seed_growing: bool = True,
        seed_hi: float = 0.9,
        seed_lo: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.balanced = mask_loss == "balanced"
        self.seed_growing = seed_growing
        self.seed_hi = seed_hi
        self.seed_lo = seed_lo

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("IgnoreAwareRoIHeads: targets are required in training")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

        mask_proposals, pos_idxs = [], []
        for img_id in range(len(proposals)):
            pos = torch.where(labels[img_id] > 0)[0]
            mask_proposals.append(proposals[img_id][pos])
            pos_idxs.append(matched_idxs[img_id][pos])
        mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        mask_logits = self.mask_predictor(mask_features)
        losses["loss_mask"] = self.mask_loss(mask_logits, mask_proposals, targets, pos_idxs)
        return [], losses

    def mask_loss(self, mask_logits, proposals, targets, pos_idxs) -> torch.Tensor:  # noqa: ANN001
        size = mask_logits.shape[-1]
        fgs, igns, labels = [], [], []
        for t, p, idx in zip(targets, proposals, pos_idxs, strict=True):
            if len(idx) == 0:
                continue
            fg, ign = project_targets(t["masks"], p, idx, size)
            fgs.append(fg)
            igns.append(ign)
            labels.append(t["labels"][idx])
        if not labels:
            return mask_logits.sum() * 0
        labels_t = torch.cat(labels)
        logits = mask_logits[torch.arange(labels_t.shape[0], device=labels_t.device), labels_t]
        return ignore_aware_mask_loss(
            logits,
            torch.cat(fgs),
            torch.cat(igns),
            self.balanced,
            self.seed_hi,
            self.seed_lo,
            self.seed_growing,
        )
