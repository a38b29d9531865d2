"""Train the Faster R-CNN that BBAM explains (after torchvision's references/detection).

Defaults are for training from scratch on CPU on small images (no pretrained weights can be
downloaded here): ResNet-18-FPN with ordinary BatchNorm (FrozenBatchNorm with random init
would freeze random statistics), all backbone stages trainable, short side 160 / long side
224 (params.yaml sets 128 / 176, the synthetic images' own size: no upscaling), anchors 16..256 (objects of 10-150 px),
FPN with 128 channels and a 512-wide box head (torchvision: 256 / 1024), fewer RPN/RoI
samples than torchvision's defaults to keep a CPU epoch short, and gradient clipping for
stability without pretraining. For the paper's setup use arch="resnet101_fpn",
fpn_channels=256, representation_size=1024 and, with pretrained local weights,
norm="frozen", trainable_backbone_layers=3 like torchvision.

Trains with the shared loop of ``bbam.training`` (checkpoint, resume, log and ``model.pt``
as the segmenters): each epoch ends with an atomic out_dir/checkpoint.pt; a rerun with the
same params_hash continues after the last finished epoch, with a different one it starts
over, as it does (with a warning naming the file) from a checkpoint that is unreadable or
not one of ours (see ``bbam.checkpoint.resume_checkpoint``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pycocotools.coco import COCO

from bbam import training as T
from bbam.atomic import atomic_write_text
from bbam.data.coco import cocoeval_stats
from bbam.data.images import load_tensor
from bbam.data.records import Dataset, ImageRecord
from bbam.data.torch_dataset import DetectionDataset, collate_fn
from bbam.detector import ARCHS, NORMS, build_detector
from bbam.device import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorTrainConfig:
    arch: str = "resnet18_fpn"
    norm: Literal["batch", "group", "frozen"] = "batch"  # as segmenters.instance.norm
    trainable_backbone_layers: int = 5
    min_size: int | tuple[int, ...] = 160  # a list: multi-scale training, tested at the last
    max_size: int = 224
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    fpn_channels: int = 128  # torchvision: 256
    representation_size: int = 512  # box-head MLP width; torchvision: 1024
    epochs: int = 8
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (6,)
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = 10.0  # None (or 0) disables
    hflip: bool = True
    num_workers: int = 0
    amp: bool = True  # only effective on CUDA
    seed: int = 0
    device: str = "auto"  # auto = CUDA when present; "cpu" keeps the detector off a GPU
    rpn_batch_size_per_image: int = 256
    rpn_post_nms_top_n_train: int = 300
    rpn_post_nms_top_n_test: int = 300
    box_batch_size_per_image: int = 64
    log_every: int = 10
    weights: str | None = None
    weights_backbone: str | None = None

    def __post_init__(self) -> None:
        T.check_min_size(self)
        for name in ("anchor_sizes", "lr_steps"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("weights", "weights_backbone"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else str(value))
        if self.arch not in ARCHS:
            raise ValueError(f"detector arch {self.arch!r} not in {ARCHS}")
        if self.norm not in NORMS:
            raise ValueError(f"detector norm {self.norm!r} not in {NORMS}")
        T.check_schedule(self)


def detector_from_config(
    config: DetectorTrainConfig, num_classes: int, weights: str | Path | None = None
) -> torch.nn.Module:
    """The model a config describes (weights: override config.weights, e.g. a trained model.pt)."""
    return build_detector(
        config.arch,
        num_classes,
        config.min_size,
        config.max_size,
        anchor_sizes=config.anchor_sizes,
        weights=weights if weights is not None else config.weights,
        weights_backbone=config.weights_backbone,
        trainable_backbone_layers=config.trainable_backbone_layers,
        norm=config.norm,
        fpn_channels=config.fpn_channels,
        representation_size=config.representation_size,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        box_batch_size_per_image=config.box_batch_size_per_image,
    )


def _training_target(target: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Crowd regions are not objects to learn (as in torchvision's COCO reference)."""
    keep = target["iscrowd"] == 0
    return {"boxes": target["boxes"][keep].to(device), "labels": target["labels"][keep].to(device)}


def _coco_ground_truth(records: list[ImageRecord], classes: list[str]) -> COCO:
    images, annotations = [], []
    for index, record in enumerate(records):
        images.append({"id": index, "width": record.width, "height": record.height})
        for inst in record.instances:
            x1, y1, x2, y2 = (float(v) for v in inst.box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(inst.label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(inst.iscrowd),  # COCOeval ignores crowd matches
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.inference_mode()
def evaluate_box_ap(
    model: torch.nn.Module,
    records: list[ImageRecord],
    classes: list[str],
    device: str | torch.device,
    batch_size: int = 4,
) -> dict[str, float]:
    """COCO box AP, AP50, AP75 of the model on `records` (crowd GT is ignored, not missed)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = [load_tensor(r.path, device) for r in chunk]
            for offset, output in enumerate(model(images)):
                boxes = output["boxes"].cpu().numpy()
                for box, score, label in zip(
                    boxes,
                    output["scores"].cpu().tolist(),
                    output["labels"].cpu().tolist(),
                    strict=True,
                ):
                    x1, y1, x2, y2 = (float(v) for v in box)
                    results.append(
                        {
                            "image_id": start + offset,
                            "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score),
                        }
                    )
    finally:
        model.train(was_training)
    gt = _coco_ground_truth(records, classes)
    if not results or not gt.getAnnIds():
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    stats = [max(s, 0.0) for s in cocoeval_stats(gt, results, "bbox")[:3]]  # -1 = no GT: 0
    return {"ap": stats[0], "ap50": stats[1], "ap75": stats[2]}


def train_detector(
    train: Dataset,
    val: Dataset,
    out_dir: Path,
    config: DetectorTrainConfig,
    params_hash: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume), then write out_dir/{checkpoint.pt, model.pt, metrics.json, train_log.jsonl}.

    Returns the metrics written to metrics.json: box AP/AP50/AP75 on `val` and train seconds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if list(val.classes) != list(train.classes):
        raise ValueError(f"train classes {train.classes} differ from val classes {val.classes}")
    if not train.records:
        raise ValueError("no training records")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = detector_from_config(config, len(train.classes) + 1).to(device)
    # The detector keeps its own schedule and reseeding (torchvision's detection reference,
    # epoch e seeded with seed + e): a given seed trains the same detector as before the
    # loop was shared.
    setup = T.setup_training(
        model,
        config,
        len(train.records),
        out_dir,
        device,
        params_hash,
        schedule="epoch",
        seed_stride=1,
    )

    def step_loss(batch: tuple, epoch: int, it: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = [img.to(device, non_blocking=True) for img in batch[0]]
        targets = [_training_target(t, device) for t in batch[1]]
        with torch.autocast(device_type=device.type, enabled=setup.use_amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"epoch {epoch} iter {it}: non-finite loss {values}")
        return loss, values

    dataset = DetectionDataset(train.records, hflip=config.hflip)
    _, train_seconds = T.run_epochs(
        model, dataset, config, setup, out_dir, train.classes, step_loss, "faster-rcnn", progress,
        collate_fn=collate_fn, pin_memory=device.type == "cuda",
    )  # fmt: skip
    ap = evaluate_box_ap(model, val.records, val.classes, device)
    metrics = {
        "box_ap": ap["ap"],
        "box_ap50": ap["ap50"],
        "box_ap75": ap["ap75"],
        "train_seconds": round(train_seconds, 2),
        "epochs": config.epochs,
        "num_train_images": len(train.records),
        "num_val_images": len(val.records),
        "device": device.type,
        "params_hash": params_hash,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
