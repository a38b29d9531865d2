"""The detector BBAM explains: torchvision's Faster R-CNN, plus a no-RPN heads function.

`build_detector` never downloads anything: pretrained weights, when wanted, come from
local files. `roi_head_forward` runs backbone -> RoIAlign -> box head -> predictor on
caller-given proposals (the reference code's `fixed_proposals`), which is all BBAM needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import _setup_scales

from bbam.data.images import rgb_to_tensor
from bbam.heads import HeadsFn, RoIHeadOutputs

RESNET_ARCHS = {
    "resnet18_fpn": resnet.resnet18,
    "resnet34_fpn": resnet.resnet34,
    "resnet50_fpn": resnet.resnet50,
    "resnet101_fpn": resnet.resnet101,
}
ARCHS = (*RESNET_ARCHS, "mobilenet_v3_large_fpn")
NORMS = ("batch", "group", "frozen")  # as InstanceTrainConfig.norm
# torchvision's defaults: one anchor size per FPN level (P2..P6) for ResNet-FPN;
# all sizes on each of the 3 levels for MobileNet-FPN.
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """BatchNorm2d/GroupNorm for training from scratch; FrozenBatchNorm2d for pretrained backbones.

    FrozenBatchNorm2d with random init is an identity with fixed statistics: useless from scratch.
    """
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return partial(nn.GroupNorm, 32)
    if norm == "frozen":
        return misc_nn_ops.FrozenBatchNorm2d
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A raw state_dict, or the "model" entry of a checkpoint dict; never unpickles code."""
    from bbam.checkpoint import load_weights

    state = load_weights(path, "weights")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: not a state_dict (expected a dict of tensors or {{'model': ...}})"
        )
    return state


def _load_into(
    module: nn.Module,
    path: str | Path,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load weights, or raise ValueError naming the file and every mismatching key."""
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors have incompatible shapes: " + "; ".join(bad))
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ignore_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit the model: missing keys {missing[:20]}"
            f" ({len(missing)} in all), unexpected keys "
            f"{result.unexpected_keys[:20]} ({len(result.unexpected_keys)} in all)"
        )


def build_fpn_backbone(
    arch: str,
    weights_backbone: str | Path | None = None,
    trainable_layers: int = 5,
    norm: str = "batch",
    fpn_channels: int = 256,
) -> nn.Module:
    """The detector's backbone + FPN (torchvision's ``BackboneWithFPN``), also the body of
    the semantic FPN segmenter, so a detector's ``backbone.*`` weights load into either.

    ResNet archs return P2..P5 (keys "0".."3") and "pool"; MobileNet returns its 2 levels
    and "pool". `weights_backbone` is a classification-network state_dict (head ignored).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; expected one of {ARCHS}")
    norm_layer = _norm_layer(norm)
    if arch in RESNET_ARCHS:
        body = RESNET_ARCHS[arch](weights=None, norm_layer=norm_layer)
        if weights_backbone is not None:
            _load_into(body, weights_backbone, ignore_prefixes=("fc.",))
        backbone = _resnet_fpn_extractor(body, trainable_layers)
    else:
        body = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        if weights_backbone is not None:
            _load_into(body, weights_backbone, ignore_prefixes=("classifier.",))
        backbone = _mobilenet_extractor(body, True, trainable_layers)
    if fpn_channels != backbone.out_channels:
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, LastLevelMaxPool())
        backbone.out_channels = fpn_channels
    return backbone


def build_detector(
    arch: str,
    num_classes: int,
    min_size: int | tuple[int, ...],
    max_size: int,
    anchor_sizes: tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    trainable_backbone_layers: int = 3,
    norm: str = "batch",
    fpn_channels: int = 256,
    representation_size: int = 1024,
    **rcnn_kwargs,
) -> FasterRCNN:
    """Faster R-CNN with an FPN backbone, 2-FC box head, class-specific regression.

    `num_classes` includes background. `min_size` is a short side, or several for
    multi-scale training (torchvision picks one per image; evaluation uses the last).
    `anchor_sizes`: one size per FPN level for the
    ResNet archs (5 levels, P2..P6); for mobilenet_v3_large_fpn the same sizes are used on
    each of its 3 levels (torchvision's layout). `weights` is a whole-detector state_dict,
    `weights_backbone` a classification-network state_dict (its head is ignored).
    `trainable_backbone_layers` counts backbone stages left trainable (5 = all for ResNet, 6 for
    MobileNet). `fpn_channels` / `representation_size` (box-head MLP width) default to
    torchvision's 256 / 1024; smaller values make CPU training affordable. Extra keyword
    arguments go to `FasterRCNN` (sampling sizes, thresholds).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; expected one of {ARCHS}")
    if num_classes < 2:
        raise ValueError(f"num_classes must include background and >=1 class, got {num_classes}")
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else DEFAULT_ANCHOR_SIZES
    if arch in RESNET_ARCHS and len(sizes) != 5:
        raise ValueError(f"{arch}: need 5 anchor sizes (P2..P6), got {sizes}")
    backbone = build_fpn_backbone(
        arch, weights_backbone, trainable_backbone_layers, norm, fpn_channels
    )
    per_level = tuple((s,) for s in sizes) if arch in RESNET_ARCHS else (sizes,) * 3
    anchors = AnchorGenerator(per_level, (ASPECT_RATIOS,) * len(per_level))
    resolution = 7  # FasterRCNN's default MultiScaleRoIAlign output size
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(fpn_channels * resolution**2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **rcnn_kwargs,
    )
    if weights is not None:
        _load_into(model, weights)
    return model


def freeze(model: nn.Module, fold_norms: bool = True) -> nn.Module:
    """Eval mode and no parameter gradients: BBAM optimises a mask, never the detector. With
    ``fold_norms``, batch norms are folded into their convolutions (``fold_batchnorm``)."""
    model.eval()
    model.requires_grad_(False)
    return fold_batchnorm(model) if fold_norms else model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each batch norm that follows a convolution (``convK``/``bnK`` siblings, or
    neighbours in a Sequential: torchvision's ResNet and MobileNet blocks) into that
    convolution, in place. In eval mode a batch norm is a fixed per-channel affine map, so
    the model computes the same function with one pass over each activation less, forward
    and backward: what BBAM's hundreds of masked passes repeat. Training-mode norms, and
    norms without running statistics, are left as they are."""
    norms = (nn.BatchNorm2d, misc_nn_ops.FrozenBatchNorm2d)
    for module in list(model.modules()):
        children = dict(module.named_children())
        names = list(children)
        for k, (name, norm) in enumerate(children.items()):
            if not isinstance(norm, norms) or norm.training or norm.running_mean is None:
                continue
            if name.startswith("bn") and f"conv{name[2:]}" in children:
                conv = children[f"conv{name[2:]}"]
            elif isinstance(module, nn.Sequential) and k > 0:
                conv = children[names[k - 1]]
            else:
                continue
            if not isinstance(conv, nn.Conv2d):
                continue
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                norm.weight, norm.bias,
            )  # fmt: skip
            conv.weight, conv.bias = weight, bias
            setattr(module, name, nn.Identity())
    return model


def _to_float_chw(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
        return rgb_to_tensor(image, device)
    if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a 3xHxW float tensor in [0, 1], got {image.dtype} {image.shape}"
        )
    return image.to(device)


def prepare_images(
    model: FasterRCNN, images: Sequence[np.ndarray | torch.Tensor]
) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
    """Normalise, resize (test-time size) and pad images with the model's own transform.

    Returns the padded batch (B, 3, H, W), the scale factor original -> resized per image
    (as torchvision computes it; per-axis ratios are resized_size / original_size), and each
    image's resized size (h, w) before padding. Float tensor inputs keep their autograd graph.
    """
    device = next(model.parameters()).device
    tensors = [_to_float_chw(image, device) for image in images]
    transform = model.transform
    was_training = transform.training
    transform.eval()  # test-time resize: always min_size[-1], never a random training size
    try:
        image_list, _ = transform(tensors)
    finally:
        transform.train(was_training)
    scales = []
    for tensor in tensors:
        h, w = tensor.shape[-2:]
        scales.append(
            min(float(transform.min_size[-1]) / min(h, w), float(transform.max_size) / max(h, w))
        )
    sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
    return image_list.tensors, scales, sizes


def roi_head_forward(
    model: FasterRCNN,
    images: torch.Tensor,
    proposals: list[torch.Tensor],
    image_sizes: list[tuple[int, int]] | None = None,
    body: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    all_levels: bool = False,
) -> RoIHeadOutputs:
    """Second-stage outputs for given proposals: backbone, RoIAlign, box head, predictor.

    `images` come from `prepare_images`; proposals are xyxy in resized coordinates. Without
    `image_sizes` the padded batch size is used to infer the FPN level scales (same result
    except in degenerate cases). Boxes are decoded with the model's box coder, unclipped.
    `body` replaces the FPN backbone's body (e.g. a compiled one; see `make_heads_fn`).
    `all_levels` builds and pools every pyramid level, as torchvision does (for comparison).
    """
    if images.ndim != 4 or len(proposals) != images.shape[0]:
        raise ValueError(
            f"need (B,3,H,W) images and B proposal tensors, got {tuple(images.shape)} and "
            f"{len(proposals)}"
        )
    if image_sizes is None:
        image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
    heads = model.roi_heads
    proposals = [p.to(device=images.device, dtype=images.dtype) for p in proposals]
    pooled = None if all_levels else _pool_used_levels(model, images, proposals, image_sizes, body)
    if pooled is None:
        features = model.backbone(images)
        pooled = heads.box_roi_pool(features, proposals, image_sizes)
    logits, regression = heads.box_predictor(heads.box_head(pooled))
    boxes = heads.box_coder.decode(regression, proposals)
    return RoIHeadOutputs(
        logits=logits, deltas=regression.reshape(regression.shape[0], -1, 4), boxes=boxes
    )


def _pool_used_levels(
    model: FasterRCNN,
    images: torch.Tensor,
    proposals: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    body: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor | None:
    """RoIAlign of ``proposals`` as torchvision's FPN + MultiScaleRoIAlign compute it, but
    building only the pyramid levels the proposals are pooled from (and the top-down path
    down to the finest of them). BBAM's proposals are jitters of one box, so they fall on one
    or two levels: the finest level's 3x3 output convolution alone is a quarter of a
    ResNet-50-FPN's forward FLOPs, and torchvision runs it (forward and backward, with zero
    gradients) even when no proposal uses it. None where the backbone is not a torchvision
    ``BackboneWithFPN`` pooled by ``MultiScaleRoIAlign`` (the caller then runs them as is)."""
    backbone, pooler = model.backbone, model.roi_heads.box_roi_pool
    fpn = getattr(backbone, "fpn", None)
    # torchvision's IntermediateLayerGetter names its outputs in return_layers, in order
    names = list(getattr(getattr(backbone, "body", None), "return_layers", {}).values())
    pooled_names = [name for name in names if name in getattr(pooler, "featmap_names", ())]
    if not (
        isinstance(fpn, FeaturePyramidNetwork)
        and isinstance(pooler, MultiScaleRoIAlign)
        and isinstance(fpn.extra_blocks, LastLevelMaxPool | None)  # extras feed no pooled level
        and len(names) == len(fpn.inner_blocks)
        and pooled_names
    ):
        return None
    inputs = (body or backbone.body)(images)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            [inputs[name] for name in pooled_names], image_sizes,
            pooler.canonical_scale, pooler.canonical_level,
        )  # fmt: skip
    levels = (
        pooler.map_levels(proposals)
        if len(pooled_names) > 1
        else torch.zeros(sum(len(p) for p in proposals), dtype=torch.int64, device=images.device)
    )
    used = levels.unique().tolist() or [len(pooled_names) - 1]  # sorted
    used_index = {names.index(pooled_names[level]): level for level in used}
    # FeaturePyramidNetwork.forward, from the coarsest level down to the finest one used
    x = [inputs[name] for name in names]
    inner = fpn.get_result_from_inner_blocks(x[-1], -1)
    features: dict[int, torch.Tensor] = {}
    for idx in range(len(x) - 1, min(used_index) - 1, -1):
        if idx < len(x) - 1:
            lateral = fpn.get_result_from_inner_blocks(x[idx], idx)
            top_down = F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            inner = lateral + top_down
        if idx in used_index:
            features[used_index[idx]] = fpn.get_result_from_layer_blocks(inner, idx)
    # torchvision's _multiscale_roi_align over the used levels only
    rois = torch.cat(
        [torch.cat([torch.full_like(p[:, :1], k), p], dim=1) for k, p in enumerate(proposals)]
    )
    first = features[used[0]]
    result = first.new_zeros((rois.shape[0], first.shape[1], *pooler.output_size))
    for level in used:
        idx = torch.where(levels == level)[0]
        result[idx] = roi_align(
            features[level], rois[idx], pooler.output_size, pooler.scales[level],
            pooler.sampling_ratio,
        ).to(result.dtype)  # fmt: skip
    return result


def make_heads_fn(
    model: FasterRCNN, compile_backbone: bool = False, all_levels: bool = False
) -> HeadsFn:
    """Bind a model to the HeadsFn protocol the attribution engine consumes. With
    ``compile_backbone`` its FPN backbone's body runs under ``torch.compile`` (the model itself
    is left as it is, so its state_dict keeps its keys); the first calls of each new batch shape
    pay the compilation. ``all_levels``: see `roi_head_forward`."""
    body = None
    if compile_backbone and isinstance(getattr(model.backbone, "body", None), nn.Module):
        body = torch.compile(model.backbone.body)

    def heads(images: torch.Tensor, proposals: list[torch.Tensor]) -> RoIHeadOutputs:
        return roi_head_forward(model, images, proposals, body=body, all_levels=all_levels)

    return heads
