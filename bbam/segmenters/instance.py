"""Mask R-CNN (torchvision) trained on instance pseudo GT with the reference's ignore-aware loss.

The config, the model builder, the training dataset, training and prediction. The loss and
its RoIHeads are in `bbam.segmenters.mask_loss`; what each supervision trains on is in
`bbam.segmenters.targets`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from bbam import training as T
from bbam.data.images import load_tensor
from bbam.data.masks import mask_to_rle
from bbam.data.records import DataError, ImageRecord, SkipReport
from bbam.data.torch_dataset import collate_fn
from bbam.device import resolve_device
from bbam.segmenters.mask_loss import IgnoreAwareRoIHeads
from bbam.segmenters.targets import SUPERVISIONS, PseudoGT, instance_targets, load_pseudo_gt

ARCHS = {"resnet18_fpn": "resnet18", "resnet50_fpn": "resnet50", "resnet101_fpn": "resnet101"}


@dataclass(frozen=True)
class InstanceTrainConfig(T.TrainSchedule):
    """Mask R-CNN training knobs; defaults are the small CPU setting (params.yaml overrides)."""

    arch: str = "resnet18_fpn"
    norm: str = "group"  # group | batch | frozen (frozen only makes sense with pretrained weights)
    supervision: str = "bbam"  # full | bbam | box
    weights: str | None = None  # full-model state dict (local file)
    weights_backbone: str | None = None  # backbone.body state dict, e.g. ImageNet ResNet (local)
    trainable_backbone_layers: int = 5
    # Short side the torchvision transform resizes to (predictions come back full size); a
    # list trains multi-scale, one size per image at random, and evaluates at the last.
    min_size: int | tuple[int, ...] = 96
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
    # schedule (the rest: T.TrainSchedule)
    epochs: int = 3
    batch_size: int = 4
    lr: float = 0.02
    lr_steps: tuple[int, ...] = (2,)
    warmup_iters: int = 50
    warmup_factor: float = 0.001

    def __post_init__(self) -> None:
        T.check_min_size(self)
        T.check_choices(
            self,
            arch=sorted(ARCHS),
            supervision=SUPERVISIONS,
            norm=("group", "batch", "frozen"),
            mask_loss=("balanced", "bce"),
        )
        T.check_schedule(self)
        # an ignore-band pixel between a seed_lo above seed_hi would be grown into both labels
        if not 0.0 <= self.seed_lo <= self.seed_hi <= 1.0:
            raise ValueError(
                "InstanceTrainConfig needs 0 <= seed_lo <= seed_hi <= 1, got "
                f"{self.seed_lo}, {self.seed_hi}"
            )
        if not 0.0 <= self.box_score_thresh <= 1.0:
            raise ValueError(
                "InstanceTrainConfig.box_score_thresh must be in [0, 1], got "
                f"{self.box_score_thresh}"
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
    T.freeze_resnet_stages(body, config.trainable_backbone_layers)
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
            if supervision == "bbam" and _lost_pseudo_labels(record, pseudo):
                skipped.add("pseudo GT has none of the image's boxes", record.image_id)
                continue
            self.items.append((record, targets))
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record, (boxes, labels, masks) = self.items[i]
        image = load_tensor(record.path)
        boxes_t, masks_t = torch.from_numpy(boxes.copy()), torch.from_numpy(masks.copy())
        if self.hflip and torch.rand(()) < 0.5:
            image, masks_t = image.flip(-1), masks_t.flip(-1)
            w = image.shape[-1]
            boxes_t = torch.stack(
                [w - boxes_t[:, 2], boxes_t[:, 1], w - boxes_t[:, 0], boxes_t[:, 3]], 1
            )
        return image, {"boxes": boxes_t, "labels": torch.from_numpy(labels), "masks": masks_t}


def _lost_pseudo_labels(record: ImageRecord, pseudo: PseudoGT | None) -> bool:
    """The pseudo GT lists the image but holds no annotation for any of its boxes.

    Why: the pseudo-label stage writes one annotation per non-crowd box (an empty mask
    included) and leaves out the images it failed on, so such an image comes from a file
    written otherwise (an older run, another tool). Trained on, its objects would be
    taught as background."""
    found = pseudo.lookup(record) if pseudo is not None else None
    if found is None or not any(not i.iscrowd for i in record.instances):
        return False
    return not any(not ann.get("iscrowd") for ann in found[1])


# ----------------------------------------------------------------------------- train / infer


def train_instance(
    records: list[ImageRecord],
    classes: list[str],
    out_dir: str | Path,
    config: InstanceTrainConfig,
    pseudo_json: str | Path | None = None,
    progress: bool = True,
) -> T.TrainResult:
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
    phash = T.params_hash(config, extra)
    setup = T.setup_training(model, config, len(dataset), out_dir, device, phash, skipped)

    def step_loss(batch, epoch: int, it: int):
        images = [im.to(device) for im in batch[0]]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
        with torch.autocast(device_type=device.type, enabled=setup.use_amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss {loss_dict} at epoch {epoch} iter {it}")
        return loss, {k: v.item() for k, v in loss_dict.items()}

    losses, _ = T.run_epochs(
        model, dataset, config, setup, out_dir, classes, step_loss, "mask-rcnn", progress,
        collate_fn=collate_fn,
    )  # fmt: skip
    return T.TrainResult(model, out_dir, losses, setup.start_epoch, skipped)


def load_instance_model(
    path: str | Path, config: InstanceTrainConfig, num_classes: int
) -> MaskRCNN:
    """Rebuild a trained model from `model.pt` (weights_only load)."""
    model = build_instance_model(config, num_classes)
    T.load_exact(model, T.load_weights_file(path, "Mask R-CNN"), path, "Mask R-CNN")
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
        out = model([load_tensor(record.path, dev)])[0]
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
                    "segmentation": mask_to_rle(mask),
                }
            )
    return results
