"""Semantic segmenters trained on semantic pseudo labels, CrossEntropy with ignore_index 255.

Two heads: DeepLabV3 (torchvision; the paper's) and the semantic FPN of Panoptic FPN
(Kirillov et al. 2019), which reads the detector's own FPN at strides 4-32 and predicts at
stride 4, so the whole detector backbone, FPN included, carries over and thin parts survive
on small images.

Supervision:
- full: `<gt_dir>/<image_id>.png` (VOC SegmentationClass) when given, else rendered from the
  dataset's GT instance masks (records in order, a later instance overwrites an earlier one;
  crowd regions and VOC's void band 255, as the official VOC PNGs have them);
- bbam: the pseudo PNGs `<pseudo_dir>/<image_id>.png` (255 = ignore);
- box: boxes filled with their class, largest first, so a smaller box drawn later wins where
  boxes overlap (drawing order decides overlaps; no ignore).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
)
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from tqdm import tqdm

from bbam import training as T
from bbam.data.images import load_tensor
from bbam.data.palette import IGNORE_LABEL, check_class_labels
from bbam.data.records import DataError, ImageRecord, SkipReport
from bbam.detector import build_fpn_backbone
from bbam.device import resolve_device
from bbam.segmenters.targets import (
    SUPERVISIONS,
    semantic_label_file,
    semantic_skip,
    semantic_target,
)

ARCHS = ("resnet18", "mobilenet_v3_large", "resnet50", "resnet101")
HEADS = {"deeplab": "DeepLabV3", "fpn": "semantic FPN"}  # head -> name in tables
PROGRESS = {"deeplab": "deeplab", "fpn": "semantic-fpn"}  # head -> progress bar label
FPN_ARCHS = ("resnet18", "resnet50", "resnet101")  # the detector's ResNet-FPN backbones
# torchvision's DeepLabV3 builders fix the output stride; the ResNet-18 assembled here takes 8 or 16
NATIVE_OUTPUT_STRIDE = {"resnet18": 16, "mobilenet_v3_large": 16, "resnet50": 8, "resnet101": 8}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SemanticTrainConfig(T.TrainSchedule):
    """Semantic segmenter training knobs; defaults are the small CPU setting (params.yaml
    overrides)."""

    arch: str = "resnet18"  # resnet18 (dilated, OS16, assembled here) | mobilenet_v3_large | ...
    head: str = "deeplab"  # deeplab (DeepLabV3, the paper's) | fpn (on the detector's FPN)
    fpn_channels: int = 128  # fpn head: the detector's FPN width (params: detector.fpn_channels)
    supervision: str = "bbam"  # full | bbam | box
    weights: str | None = None
    weights_backbone: str | None = None
    # ResNet stages left trainable, top first (5: all; 3 freezes the stem and layer1, as
    # torchvision's detection default): frozen stages need no backward pass
    trainable_backbone_layers: int = 5
    output_stride: int | None = None  # None: the arch's own; resnet18 takes 8 (small objects) or 16
    scale: float = 0.5  # images (and labels, nearest) are resized by this for training + inference
    crop_size: int = 96  # random crop after scaling, padded with ignore where the image is smaller
    # schedule (the rest: T.TrainSchedule)
    epochs: int = 5
    batch_size: int = 8
    lr: float = 0.01
    lr_steps: tuple[int, ...] = (4,)
    warmup_iters: int = 20
    warmup_factor: float = 0.01

    def __post_init__(self) -> None:
        T.check_choices(self, arch=ARCHS, supervision=SUPERVISIONS, head=HEADS)
        T.check_schedule(self)
        if not 0 <= self.trainable_backbone_layers <= 5 or (
            not self.arch.startswith("resnet") and self.trainable_backbone_layers != 5
        ):
            raise ValueError(
                "SemanticTrainConfig.trainable_backbone_layers must be in [0, 5] (ResNet archs; "
                f"{self.arch} trains all), got {self.trainable_backbone_layers}"
            )
        if self.head == "fpn":
            if self.arch not in FPN_ARCHS:
                raise ValueError(
                    f"SemanticTrainConfig.head fpn needs one of {FPN_ARCHS}, got {self.arch}"
                )
            if self.output_stride is not None:
                raise ValueError("SemanticTrainConfig.output_stride applies to head deeplab only")
            return
        allowed = (8, 16) if self.arch == "resnet18" else (NATIVE_OUTPUT_STRIDE[self.arch],)
        if self.output_stride is not None and self.output_stride not in allowed:
            raise ValueError(
                f"SemanticTrainConfig.output_stride for {self.arch} must be one of {allowed} "
                f"(or null), got {self.output_stride}"
            )


class SemanticFPN(nn.Module):
    """Panoptic FPN's semantic branch on a ResNet-FPN backbone: each level P2..P5 goes
    through conv3x3-GN-ReLU(-2x upsample) stages down to stride 4, the sum is classified
    by a 1x1 conv and upsampled to the input; returns ``{"out": logits}`` as DeepLabV3."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.out_channels

        def stage(c_in: int, upsample: bool) -> list[nn.Module]:
            layers = [
                nn.Conv2d(c_in, channels, 3, padding=1, bias=False),
                nn.GroupNorm(32 if channels % 32 == 0 else 1, channels),
                nn.ReLU(inplace=True),
            ]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            return layers

        self.scale_heads = nn.ModuleList()
        for level in range(4):  # P2 (stride 4) .. P5 (stride 32)
            layers = stage(width, level > 0)
            for _ in range(1, level):
                layers += stage(channels, True)
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = list(self.backbone(images).values())[:4]
        x = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:], strict=True):
            y = head(feature)
            x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.predictor(x)
        size = images.shape[-2:]
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}


class SemanticNet(nn.Module):
    """DeepLabV3 or semantic FPN taking [0,1] RGB, normalising inside, returning logits at
    input size."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)["out"]


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one (torchvision's ``replace_stride_with_dilation``,
    which BasicBlock lacks): the first block keeps the previous dilation, as torchvision does."""
    block0 = layer[0]
    block0.conv1.stride = (1, 1)
    block0.downsample[0].stride = (1, 1)
    prev = dilation // 2
    block0.conv1.dilation, block0.conv1.padding = (prev, prev), (prev, prev)
    convs = [block0.conv2] + [c for b in layer[1:] for c in (b.conv1, b.conv2)]
    for conv in convs:
        conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


def _dilated_resnet18(output_stride: int) -> nn.Module:
    """ResNet-18 at output stride 16 (layer4 dilated) or 8 (layer3 and layer4, as torchvision's
    DeepLabV3 ResNets): same weights as the plain ResNet, so a detector's body loads into it."""
    body = resnet18(weights=None)
    if output_stride == 8:
        _dilate(body.layer3, 2)
        _dilate(body.layer4, 4)
    else:
        _dilate(body.layer4, 2)
    return body


def _fpn_width(state: dict[str, torch.Tensor]) -> int | None:
    """The output width of the FPN in a weights file (a detector's), None when it has no
    FPN (a classification network's)."""
    for key, value in state.items():
        if key.endswith("fpn.inner_blocks.0.0.weight"):
            return int(value.shape[0])
    return None


def build_semantic_model(config: SemanticTrainConfig, num_classes: int) -> SemanticNet:
    """The configured head from scratch (weights=None, weights_backbone=None) plus optional
    local weights; ``weights_backbone`` may be a detector's file (its backbone, FPN included)."""
    if config.head == "fpn":
        backbone = build_fpn_backbone(f"{config.arch}_fpn", fpn_channels=config.fpn_channels)
        if config.weights_backbone:
            state = T.load_weights_file(config.weights_backbone, "backbone")
            width = _fpn_width(state)
            if width is not None and width != config.fpn_channels:
                # loading would fill the ResNet only and leave the FPN random without a word
                raise ValueError(
                    f"{config.weights_backbone}: its FPN has {width} channels but "
                    f"segmenters.semantic.fpn_channels is {config.fpn_channels}; set it to "
                    f"{width} (the detector's fpn_channels)"
                )
            # a detector's file fills body and FPN; a classification network's, the body only
            target = backbone if width is not None else backbone.body
            T.load_partial(target, state, config.weights_backbone)
        net = SemanticFPN(backbone, num_classes)
    elif config.arch == "resnet18":
        body = _dilated_resnet18(config.output_stride or NATIVE_OUTPUT_STRIDE["resnet18"])
        if config.weights_backbone:
            state = T.load_weights_file(config.weights_backbone, "backbone")
            T.load_partial(body, state, config.weights_backbone)
        backbone = IntermediateLayerGetter(body, return_layers={"layer4": "out"})
        net = DeepLabV3(backbone, DeepLabHead(512, num_classes), None)
    else:
        builder = {
            "mobilenet_v3_large": deeplabv3_mobilenet_v3_large,
            "resnet50": deeplabv3_resnet50,
            "resnet101": deeplabv3_resnet101,
        }[config.arch]
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        if config.weights_backbone:
            state = T.load_weights_file(config.weights_backbone, "backbone")
            T.load_partial(net.backbone, state, config.weights_backbone)
    if config.arch.startswith("resnet"):  # the ResNet under either head (same stage names)
        resnet = net.backbone.body if config.head == "fpn" else net.backbone
        T.freeze_resnet_stages(resnet, config.trainable_backbone_layers)
    model = SemanticNet(net)
    if config.weights:
        state = T.load_weights_file(config.weights, "DeepLabV3")
        T.load_partial(model, state, config.weights)
    return model


# ----------------------------------------------------------------------------- targets


def _scaled_size(hw: tuple[int, ...], scale: float) -> tuple[int, int]:
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


class SemanticTrainDataset(torch.utils.data.Dataset):
    """Random crop (padded with ignore) + horizontal flip; labels are read lazily."""

    def __init__(
        self,
        records: list[ImageRecord],
        supervision: str,
        pseudo_dir: Path | None,
        gt_dir: Path | None,
        crop_size: int,
        hflip: bool,
        skipped: SkipReport,
        scale: float = 1.0,
    ) -> None:
        self.items: list[ImageRecord] = []
        self.args = (supervision, pseudo_dir, gt_dir)
        for record in records:
            skip = semantic_skip(record, *self.args)
            if skip is not None:
                skipped.add(skip, record.image_id)
                continue
            self.items.append(record)
        self.crop, self.hflip, self.scale = crop_size, hflip, scale
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.items)

    def _label_file(self, record: ImageRecord) -> Path:
        """The PNG the record's label map is read from, or the image itself when it is drawn
        from the annotations: the file a bad label map must be named by (a pseudo label of
        the wrong size is a fault of the PNG, not of the image)."""
        return semantic_label_file(record, *self.args) or Path(record.path)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.items[i]
        label = semantic_target(record, *self.args)
        if isinstance(label, str):
            where = self._label_file(record)
            image = "" if where == Path(record.path) else f" (image {record.path})"
            raise DataError(f"{where}: {label}{image}")
        image = load_tensor(record.path)
        target = torch.from_numpy(label.astype(np.int64))
        if self.scale != 1.0:
            size = _scaled_size(target.shape, self.scale)
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            target = F.interpolate(target[None, None].float(), size=size, mode="nearest")[
                0, 0
            ].long()
        h, w = target.shape
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            target = F.pad(target, (0, pw, 0, ph), value=IGNORE_LABEL)
        h, w = target.shape
        y = int(torch.randint(0, h - self.crop + 1, ()))
        x = int(torch.randint(0, w - self.crop + 1, ()))
        image = image[:, y : y + self.crop, x : x + self.crop]
        target = target[y : y + self.crop, x : x + self.crop]
        if self.hflip and torch.rand(()) < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return image, target


# ----------------------------------------------------------------------------- train / infer


def train_semantic(
    records: list[ImageRecord],
    classes: list[str],
    out_dir: str | Path,
    config: SemanticTrainConfig,
    pseudo_dir: str | Path | None = None,
    gt_dir: str | Path | None = None,
    progress: bool = True,
) -> T.TrainResult:
    """Train DeepLabV3 (CE, ignore 255) and write model.pt + per-epoch checkpoints + JSONL log."""
    out_dir = Path(out_dir)
    check_class_labels(range(1, len(classes) + 1), "semantic segmenter")  # before any epoch
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    pdir = Path(pseudo_dir) if pseudo_dir is not None else None
    gdir = Path(gt_dir) if gt_dir is not None else None
    skipped = SkipReport()
    dataset = SemanticTrainDataset(
        records,
        config.supervision,
        pdir,
        gdir,
        config.crop_size,
        config.hflip,
        skipped,
        config.scale,
    )
    if len(dataset) == 0:
        raise DataError(f"no trainable images ({dict(skipped.counts)})")
    model = build_semantic_model(config, len(classes) + 1).to(device)
    extra = {"n_images": len(dataset), "classes": classes, "pseudo": str(pseudo_dir)}
    label_dir = pdir if config.supervision == "bbam" else gdir
    pngs = [] if label_dir is None else [label_dir / f"{r.image_id}.png" for r in dataset.items]
    files = [p for p in pngs if p.is_file()] + [config.weights, config.weights_backbone]
    extra["data"] = T.data_digest(records, files)
    phash = T.params_hash(config, extra)
    setup = T.setup_training(model, config, len(dataset), out_dir, device, phash, skipped)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL)

    def step_loss(batch, epoch: int, it: int):
        images, targets = batch[0].to(device), batch[1].to(device)
        with torch.autocast(device_type=device.type, enabled=setup.use_amp):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        if not math.isfinite(loss.item()):
            if (targets == IGNORE_LABEL).all():
                return None, {}  # an all-ignore crop carries no signal (CE returns nan)
            raise FloatingPointError(f"non-finite loss at epoch {epoch} iter {it}")
        return loss, {}

    losses, _ = T.run_epochs(
        model, dataset, config, setup, out_dir, classes, step_loss, PROGRESS[config.head], progress,
        drop_last=len(dataset) % config.batch_size == 1,  # BN in ASPP pooling needs 2+
    )  # fmt: skip
    return T.TrainResult(model, out_dir, losses, setup.start_epoch, skipped)


def load_semantic_model(
    path: str | Path, config: SemanticTrainConfig, num_classes: int
) -> SemanticNet:
    model = build_semantic_model(config, num_classes)
    T.load_exact(model, T.load_weights_file(path, "DeepLabV3"), path, "DeepLabV3")
    return model


@torch.no_grad()
def predict_semantic(
    model: SemanticNet,
    records: list[ImageRecord],
    device: str = "auto",
    progress: bool = False,
    scale: float = 1.0,
) -> Iterator[tuple[ImageRecord, np.ndarray]]:
    """Yield (record, HxW uint8 label map) at the original image size, one image at a time.

    `scale` must be the training config's: the image is resized by it, logits go back bilinearly.
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    for record in tqdm(records, desc="deeplab predict", disable=not progress):
        image = load_tensor(record.path)
        image = image[None].to(dev)
        size = image.shape[-2:]
        if scale != 1.0:
            image = F.interpolate(
                image, size=_scaled_size(size, scale), mode="bilinear", align_corners=False
            )
        logits = model(image)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        yield record, logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
