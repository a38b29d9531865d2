"""Mask R-CNN (torchvision) trained on instance pseudo GT with the reference's ignore-aware loss.

Mask targets are one uint8 map per instance: 0 = background, 1 = foreground, 2 = ignore.
Keeping ignore inside `target["masks"]` lets torchvision's transform resize it (nearest) with
the masks; `IgnoreAwareRoIHeads` splits it into a foreground and an ignore channel and crops
both with roi_align exactly like torchvision's `project_masks_on_boxes`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    project_masks_on_boxes,
)
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from bbam.data.images import load_rgb
from bbam.data.records import DataError, ImageRecord, SkipReport
from bbam.device import resolve_device
from bbam.segmenters import training as T

FG, IGNORE = 1, 2
ARCHS = {"resnet18_fpn": "resnet18", "resnet50_fpn": "resnet50", "resnet101_fpn": "resnet101"}
SUPERVISIONS = ("full", "bbam", "box")


@dataclass(frozen=True)
class InstanceTrainConfig:
    """Mask R-CNN training knobs; defaults are the small CPU setting (params.yaml overrides)."""

    arch: str = "resnet18_fpn"
    norm: str = "group"  # group | batch | frozen (frozen only makes sense with pretrained weights)
    supervision: str = "bbam"  # full | bbam | box
    weights: str | None = None  # full-model state dict (local file)
    weights_backbone: str | None = None  # backbone.body state dict, e.g. ImageNet ResNet (local)
    trainable_backbone_layers: int = 5
    min_size: int = (
        96  # torchvision transform resizes (short side), predictions come back full size
    )
    max_size: int = 136
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    fpn_channels: int = 128  # torchvision: 256
    representation_size: int = 512  # box head MLP width; torchvision: 1024
    mask_head_layers: tuple[int, ...] = (64, 64)  # torchvision: (256, 256, 256, 256)
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 300
    box_batch_size_per_image: int = 64
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 50
    mask_loss: str = "balanced"  # balanced (reference) | bce (torchvision)
    seed_hi: float = 0.9
    seed_lo: float = 0.1
    epochs: int = 3
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: tuple[int, ...] = (2,)
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = 10.0
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    hflip: bool = True
    amp: bool = True
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    max_iters_per_epoch: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"InstanceTrainConfig.arch: {self.arch!r} not in {sorted(ARCHS)}")
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"InstanceTrainConfig.supervision: {self.supervision!r}")
        if self.norm not in ("group", "batch", "frozen"):
            raise ValueError(f"InstanceTrainConfig.norm: {self.norm!r}")
        if self.mask_loss not in ("balanced", "bce"):
            raise ValueError(f"InstanceTrainConfig.mask_loss: {self.mask_loss!r}")


# ----------------------------------------------------------------------------- loss


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
    fg = project_masks_on_boxes((masks == FG).to(torch.uint8), boxes, matched_idxs, size)
    ign = project_masks_on_boxes((masks == IGNORE).to(torch.uint8), boxes, matched_idxs, size)
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


# ----------------------------------------------------------------------------- model


def _norm_layer(name: str) -> Any:
    if name == "frozen":
        return FrozenBatchNorm2d
    if name == "batch":
        return nn.BatchNorm2d
    return lambda c: nn.GroupNorm(min(32, c // 2), c)


def build_instance_model(config: InstanceTrainConfig, num_classes: int) -> MaskRCNN:
    """Mask R-CNN from scratch (weights=None, weights_backbone=None) plus optional local weights."""
    norm = _norm_layer(config.norm)
    body = resnet.__dict__[ARCHS[config.arch]](weights=None, norm_layer=norm)
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][: config.trainable_backbone_layers]
    for name, param in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers):
            param.requires_grad_(False)
    c = body.inplanes // 8  # channels of layer1 output
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[c, c * 2, c * 4, c * 8],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    ch, rep = config.fpn_channels, config.representation_size
    box_head = TwoMLPHead(ch * 7 * 7, rep)
    mask_head = MaskRCNNHeads(ch, list(config.mask_head_layers), 1)
    mask_predictor = MaskRCNNPredictor(
        config.mask_head_layers[-1], config.mask_head_layers[-1], num_classes
    )
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in config.anchor_sizes),
        aspect_ratios=((0.5, 1.0, 2.0),) * len(config.anchor_sizes),
    )
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.min_size,
        max_size=config.max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_score_thresh=config.box_score_thresh,
        box_detections_per_img=config.box_detections_per_img,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, num_classes),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )
    old = model.roi_heads
    model.roi_heads = IgnoreAwareRoIHeads(
        old.box_roi_pool,
        old.box_head,
        old.box_predictor,
        0.5,
        0.5,
        config.box_batch_size_per_image,
        0.25,
        None,
        config.box_score_thresh,
        0.5,
        config.box_detections_per_img,
        mask_roi_pool=old.mask_roi_pool,
        mask_head=old.mask_head,
        mask_predictor=old.mask_predictor,
        mask_loss=config.mask_loss,
        seed_growing=config.supervision == "bbam",
        seed_hi=config.seed_hi,
        seed_lo=config.seed_lo,
    )
    if config.weights_backbone:
        state = T.load_weights_file(config.weights_backbone, "backbone")
        T.load_partial(model.backbone.body, state, config.weights_backbone)
    if config.weights:
        state = T.load_weights_file(config.weights, "Mask R-CNN")
        T.load_partial(model, state, config.weights)
    return model


# ----------------------------------------------------------------------------- data


def decode_segmentation(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    """COCO segmentation (RLE str/bytes counts, uncompressed RLE or polygons) -> HxW bool."""
    try:
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, dict):
            counts = seg["counts"]
            rle = {
                "size": list(seg["size"]),
                "counts": counts.encode() if isinstance(counts, str) else counts,
            }
        else:
            raise TypeError(f"unsupported segmentation type {type(seg).__name__}")
        mask = mask_utils.decode(rle).astype(bool)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: bad segmentation ({exc})") from exc
    if mask.shape != (height, width):
        raise DataError(f"{where}: mask is {mask.shape}, image is {(height, width)}")
    return mask


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class PseudoGT:
    """Instance pseudo GT indexed by image key (file stem and str(id)); annotations kept as RLE."""

    path: Path
    images: dict[str, dict[str, Any]]
    anns: dict[int, list[dict[str, Any]]]
    cat_to_label: dict[int, int]

    def lookup(self, record: ImageRecord) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        for key in (record.image_id, record.path.stem, record.path.name):
            if key in self.images:
                image = self.images[key]
                return image, self.anns.get(image["id"], [])
        return None


def load_pseudo_gt(path: str | Path, classes: list[str]) -> PseudoGT:
    """Read a pseudo-GT COCO JSON; categories are mapped to labels by name (else by id)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pseudo GT JSON not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, anns, cats = data["images"], data["annotations"], data.get("categories", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a COCO instances JSON ({exc})") from exc
    cat_to_label: dict[int, int] = {}
    for cat in cats:
        name = cat.get("name")
        if name in classes:
            cat_to_label[int(cat["id"])] = classes.index(name) + 1
        elif 1 <= int(cat["id"]) <= len(classes):
            cat_to_label[int(cat["id"])] = int(cat["id"])
        else:
            raise DataError(f"{path}: category {cat} matches no dataset class")
    index: dict[str, dict[str, Any]] = {}
    for image in images:
        index[str(image["id"])] = image
        if "file_name" in image:
            index[Path(image["file_name"]).stem] = image
            index[Path(image["file_name"]).name] = image
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    return PseudoGT(path, index, by_image, cat_to_label)


def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    x1, y1 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x2, y2 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def instance_targets(
    record: ImageRecord, supervision: str, pseudo: PseudoGT | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(boxes (n,4) xyxy, labels (n,), encoded masks (n,H,W) uint8) or a skip reason."""
    h, w = record.height, record.width
    boxes, labels, masks = [], [], []
    if supervision == "bbam":
        if pseudo is None:
            raise ValueError("supervision 'bbam' needs a pseudo GT JSON")
        found = pseudo.lookup(record)
        if found is None:
            return "no pseudo labels for image"
        image, anns = found
        h, w = int(image.get("height", h)), int(image.get("width", w))
        for ann in anns:
            if ann.get("iscrowd"):
                continue
            where = f"{pseudo.path} annotation {ann.get('id')}"
            fg = decode_segmentation(ann["segmentation"], h, w, where)
            enc = fg.astype(np.uint8) * FG
            if ann.get("ignore") is not None:
                ign = decode_segmentation(ann["ignore"], h, w, where + " (ignore)")
                enc[ign & ~fg] = IGNORE
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            boxes.append([x, y, x + bw, y + bh])
            labels.append(pseudo.cat_to_label[int(ann["category_id"])])
            masks.append(enc)
    else:
        for inst in record.instances:
            if inst.iscrowd:
                continue
            if supervision == "full":
                if not inst.has_mask:
                    return "instance without GT mask (full supervision)"
                enc = inst.mask.astype(np.uint8)
            else:
                enc = _box_mask(inst.box, h, w).astype(np.uint8)
            boxes.append(np.asarray(inst.box, dtype=np.float32).tolist())
            labels.append(int(inst.label))
            masks.append(enc)
    if (h, w) != (record.height, record.width):
        return "pseudo label size differs from image size"
    boxes_np = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    keep = (boxes_np[:, 2] > boxes_np[:, 0] + 1e-3) & (boxes_np[:, 3] > boxes_np[:, 1] + 1e-3)
    masks_np = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
    return boxes_np[keep], np.asarray(labels, dtype=np.int64)[keep], masks_np[keep]


class InstanceTrainDataset(torch.utils.data.Dataset):
    """Images + encoded targets; images are decoded lazily, records without labels are skipped."""

    def __init__(
        self,
        records: list[ImageRecord],
        supervision: str,
        pseudo: PseudoGT | None,
        hflip: bool,
        skipped: SkipReport,
    ) -> None:
        self.items: list[tuple[ImageRecord, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        for record in records:
            targets = instance_targets(record, supervision, pseudo)
            if isinstance(targets, str):
                skipped.add(targets, record.image_id)
                continue
            self.items.append((record, targets))
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record, (boxes, labels, masks) = self.items[i]
        image = torch.from_numpy(np.array(load_rgb(record.path))).permute(2, 0, 1).float() / 255.0
        boxes_t, masks_t = torch.from_numpy(boxes.copy()), torch.from_numpy(masks.copy())
        if self.hflip and torch.rand(()) < 0.5:
            image, masks_t = image.flip(-1), masks_t.flip(-1)
            w = image.shape[-1]
            boxes_t = torch.stack(
                [w - boxes_t[:, 2], boxes_t[:, 1], w - boxes_t[:, 0], boxes_t[:, 3]], 1
            )
        return image, {"boxes": boxes_t, "labels": torch.from_numpy(labels), "masks": masks_t}


def _collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch, strict=True))


# ----------------------------------------------------------------------------- train / infer


@dataclass
class InstanceTrainResult:
    model: MaskRCNN
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    start_epoch: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)


def train_instance(
    records: list[ImageRecord],
    classes: list[str],
    out_dir: str | Path,
    config: InstanceTrainConfig,
    pseudo_json: str | Path | None = None,
    progress: bool = True,
) -> InstanceTrainResult:
    """Train Mask R-CNN (torchvision-references style) and write model.pt + checkpoints + log."""
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    pseudo = load_pseudo_gt(pseudo_json, classes) if config.supervision == "bbam" else None
    skipped = SkipReport()
    dataset = InstanceTrainDataset(records, config.supervision, pseudo, config.hflip, skipped)
    if len(dataset) == 0:
        raise DataError(f"no trainable images ({dict(skipped.counts)})")
    model = build_instance_model(config, len(classes) + 1).to(device)
    extra = {"n_images": len(dataset), "classes": classes, "pseudo": str(pseudo_json)}
    files = [pseudo_json if config.supervision == "bbam" else None]
    extra["data"] = T.data_digest(records, files + [config.weights, config.weights_backbone])
    setup = T.setup_training(model, config, len(dataset), out_dir, device, extra, skipped)
    optimizer, scheduler, scaler = setup.optimizer, setup.scheduler, setup.scaler
    iters, use_amp, log = setup.iters, setup.use_amp, setup.log
    result = InstanceTrainResult(model, out_dir, [], setup.start_epoch, skipped)
    for epoch in range(setup.start_epoch, config.epochs):
        model.train()
        gen = T.seed_epoch(config.seed, epoch)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=config.num_workers,
            collate_fn=_collate,
        )
        bar = tqdm(loader, total=iters, desc=f"mask-rcnn epoch {epoch}", disable=not progress)
        t0 = time.time()
        for it, (images, targets) in enumerate(bar):
            if it >= iters:
                break
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss {loss_dict} at epoch {epoch} iter {it}")
            T.optimizer_step(model, optimizer, scheduler, scaler, loss, config.clip_grad_norm)
            result.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if it % config.log_every == 0 or it == iters - 1:
                rec = {k: round(v.item(), 5) for k, v in loss_dict.items()}
                rec.update(
                    epoch=epoch,
                    iter=it,
                    loss=round(loss.item(), 5),
                    lr=optimizer.param_groups[0]["lr"],
                    elapsed_s=round(time.time() - t0, 2),
                )
                log.write(rec)
        T.save_checkpoint(out_dir, setup.params_hash, epoch, model, optimizer, scheduler, scaler)
    T.save_model(out_dir, model, classes, config)
    return result


def load_instance_model(
    path: str | Path, config: InstanceTrainConfig, num_classes: int
) -> MaskRCNN:
    """Rebuild a trained model from `model.pt` (weights_only load)."""
    model = build_instance_model(config, num_classes)
    state = T.load_weights_file(path, "Mask R-CNN")
    model.load_state_dict(state)
    return model


@torch.no_grad()
def predict_instances(
    model: MaskRCNN,
    records: list[ImageRecord],
    device: str = "auto",
    mask_threshold: float = 0.5,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """COCO-style results (image_id = record.image_id, RLE segmentation, score, bbox xywh)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    results: list[dict[str, Any]] = []
    for record in tqdm(records, desc="mask-rcnn predict", disable=not progress):
        image = (
            torch.from_numpy(np.array(load_rgb(record.path))).permute(2, 0, 1).float().div(255.0)
        )
        out = model([image.to(dev)])[0]
        masks = (out["masks"][:, 0] >= mask_threshold).cpu().numpy()
        for box, label, score, mask in zip(
            out["boxes"].cpu().tolist(),
            out["labels"].tolist(),
            out["scores"].tolist(),
            masks,
            strict=True,
        ):
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": record.image_id,
                    "category_id": int(label),
                    "score": float(score),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": encode_mask(mask),
                }
            )
    return results
