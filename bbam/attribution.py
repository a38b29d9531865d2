"""BBAM engine: optimise a coarse mask per box instance over any ``HeadsFn``.

One mask per instance (as in the reference, T L140/L192), but many instances run
together in one batched heads call, each with its own mask, its own Adam state and
its own seeded generator, so a result does not depend on the batch it ran in.
Gradients are taken with ``torch.autograd.grad`` w.r.t. the masks only: detector
parameters and images never receive ``.grad`` (no wasted parameter gradients).

Images are expected already normalised, so the perturbation baseline mu (the
per-channel normalisation mean, the paper's "training mean") is 0 by default.

Which box drives the stride and the positives is simply the box in the item: the
training pipeline passes the GT box (as the reference T does), explaining a detection
would pass the predicted box (as the paper and V do).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from bbam.heads import HeadsFn
from bbam.jitter import instance_generator, jitter_boxes, select_positives

_CHOICES = {
    "grid_rounding": ("floor", "ceil"),
    "init": ("box_union", "constant"),
    "param": ("clamp", "sigmoid"),
    "l1_reduction": ("sum", "mean"),
    "amp_dtype": ("bfloat16", "float16"),
    "baseline": ("mean", "blur"),
}
_SIGMOID_EPS = 0.01  # a 0/1 initial grid maps to logit(0.01)/logit(0.99) under "sigmoid"
_FP16_LOSS_SCALE = 1024.0  # static loss scale, only used with amp_dtype float16 on CUDA


@dataclass(frozen=True)
class AttributionConfig:
    """All knobs of the BBAM engine. Defaults are the ``fast`` profile."""

    seed: int = 0
    # proposals (reference T L119-162)
    # 1000 as the reference: the jitters are one no-grad pass, and the same seed then draws the
    # same proposals as `reference`. Measured with the CPU default detector (228 train
    # instances): 200 jitters left 36.4 % of instances without a positive, 1000 left 31.6 %;
    # on 6 instances agreement with `reference` rose from 0.71 to 0.80 IoU.
    num_jitters: int = 1000
    jitter_fraction: float = 0.3
    iou_thresholds: tuple[float, ...] = (0.9, 0.85, 0.8)
    max_positives: int = 100
    iou_truncate: bool = True
    # 0 = all positives every iteration (as the reference). The RoI heads are a small part of
    # a step (at the paper's scale ~1 % per 100 positives), and a short budget needs every
    # positive's gradient: with 30 steps, 16 positives per step gave a refined agreement with
    # `reference` of 0.74 against 0.82 for all (bench/attribution.py, demo detector, CPU).
    positives_per_iter: int = 0
    # mask (reference T L183-191, D L106-143)
    stride_coefs: tuple[float, float] = (16.0, 48.0)
    stride_reference_size: float = 0.0  # >0: scale strides by short side / this (see mask_stride)
    grid_rounding: str = "floor"
    init: str = "box_union"
    init_value: float = 0.5
    param: str = "clamp"
    align_corners: bool = True
    baseline_value: float = 0.0
    # What the masked-out pixels become. "mean" (the paper's and the reference's): the
    # constant baseline_value. "blur": the image blurred by a Gaussian of sigma
    # baseline_blur x the image's short side (Fong & Vedaldi's perturbation), so the mask's
    # own border draws no edge a box regressor can lock onto.
    baseline: str = "mean"
    baseline_blur: float = 0.05
    # loss (reference T L193-213, U L16-38)
    use_box_head: bool = True
    use_cls_head: bool = True
    box_weight: float = 0.5
    cls_weight: float = 0.5
    l1_weight: float = 0.007
    l1_reduction: str = "sum"
    tv_weight: float = 1e-4
    tv_beta: float = 3.0
    # optimiser and scheduling. The reference's 300 steps at lr 0.02 are what a GPU cannot
    # afford per instance at dataset scale; 30 steps at lr 0.15 move a cell 4.5 in all (6).
    # Refined agreement with `reference` (20 demo train instances, CPU; the reference against
    # itself with the next seed: 0.943): 30 steps at lr 0.1 / 0.15 / 0.2 / 0.25: 0.82 / 0.92 /
    # 0.87 / 0.86; 60 steps at 0.05: 0.88; a cosine decay of lr lowered it at 30 steps. On an
    # H200 (README, "GPU time"): 0.86 against the reference's own 0.91, at 36x its speed.
    lr: float = 0.15
    iterations: int = 30
    batch_size: int = 16
    early_stop: bool = True
    early_stop_tol: float = 0.01
    early_stop_patience: int = 20
    # Masked passes see only a window around the instance: the box grown by crop_context x
    # its size on each side (and covering all positives), snapped to crop_align pixels (the
    # backbone stride keeps features aligned). Outside it the input is the baseline, i.e.
    # the mask is 0 there -- where BBAM's sparsity drives it anyway. 0 disables (default):
    # measured with the CPU default detector (bench/attribution.py setup, 8 instances), a 0.5
    # window lowered the agreement with `reference` from 0.64 to 0.56 IoU (1.0: 0.62) and
    # saved no time on 128-px images. It pays on large images with small boxes.
    crop_context: float = 0.0
    crop_align: int = 32
    # CUDA-only speedups (ignored on CPU)
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = True
    # cuDNN's algorithm search (times its algorithms once per input shape, keeps the fastest).
    # Off: on an H200 (R-50-FPN, 800x1120, batch 64, bench.gpu_scale) steps were 0.2-0.6 ms
    # slower with it in two runs, and each new image size costs a search.
    cudnn_benchmark: bool = False
    # TF32 convolutions and matmuls (Ampere and later): fp32 inputs at a 10-bit mantissa.
    # `reference` turns them off, as its V100s computed in true fp32.
    tf32: bool = True

    def __post_init__(self) -> None:
        for name in ("iou_thresholds", "stride_coefs"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"AttributionConfig.{name}={getattr(self, name)!r}: not in {allowed}"
                )
        if len(self.stride_coefs) != 2:
            raise ValueError("AttributionConfig.stride_coefs must have 2 values (coef0, coef1)")
        if not self.iou_thresholds:
            raise ValueError("AttributionConfig.iou_thresholds must not be empty")
        for name in ("num_jitters", "max_positives", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttributionConfig.{name} must be >= 1")
        if not self.baseline_blur > 0:
            raise ValueError(
                "AttributionConfig.baseline_blur must be > 0 (a fraction of the short side)"
            )
        if self.crop_context < 0 or self.crop_align < 1:
            raise ValueError("crop_context must be >= 0 and crop_align >= 1")
        if self.positives_per_iter < 0 or self.early_stop_patience < 1:
            raise ValueError("positives_per_iter must be >= 0 and early_stop_patience >= 1")
        # YAML reads .nan and .inf as floats: a NaN lr or weight turns every mask to NaN (Adam
        # refuses a NaN lr only when the engine starts), a NaN stride crashes in int()
        for name, value in vars(self).items():
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"AttributionConfig.{name} must be finite, got {value}")
        # 0 keeps each grid at its init (tests compare profiles' proposals that way); a params
        # file may not ask for it (flows.params_schema)
        if self.lr < 0:
            raise ValueError(f"AttributionConfig.lr must be >= 0, got {self.lr}")
        # a positive needs IoU > threshold: at 1 or above none ever is, below 0 any box is
        if not all(0.0 <= t < 1.0 for t in self.iou_thresholds):
            raise ValueError(
                "AttributionConfig.iou_thresholds must be in [0, 1), got "
                f"{list(self.iou_thresholds)}"
            )
        # a negative weight rewards the term it should penalise (a negative l1_weight grows
        # the mask to the whole image)
        for name in ("box_weight", "cls_weight", "l1_weight", "tv_weight", "jitter_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"AttributionConfig.{name} must be >= 0, got {getattr(self, name)}"
                )
        # |d|^beta has an infinite gradient at d = 0 below 1, so the total variation turns NaN
        if self.tv_weight > 0 and self.tv_beta < 1:
            raise ValueError(f"AttributionConfig.tv_beta must be >= 1, got {self.tv_beta}")
        if min(self.stride_coefs) < 0 or self.stride_reference_size < 0:
            raise ValueError(
                "AttributionConfig.stride_coefs and stride_reference_size must be >= 0, got "
                f"{list(self.stride_coefs)}, {self.stride_reference_size}"
            )
        if not 0.0 <= self.init_value <= 1.0:
            raise ValueError(
                "AttributionConfig.init_value must be in [0, 1] (a mask value), got "
                f"{self.init_value}"
            )


_PROFILES: dict[str, dict[str, Any]] = {
    "fast": {},
    "reference": {
        "num_jitters": 1000,
        "max_positives": 100,
        "positives_per_iter": 0,
        "iterations": 300,
        "lr": 0.02,
        "batch_size": 1,
        "early_stop": False,
        "amp": False,
        "tf32": False,
        "channels_last": False,
        "grid_rounding": "floor",
        "init": "box_union",
        "param": "clamp",
        "align_corners": True,
        "l1_weight": 0.007,
        "l1_reduction": "sum",
        "tv_weight": 1e-4,
        "crop_context": 0.0,
        "baseline": "mean",
    },
}


def profile_fields(name: str) -> frozenset[str]:
    """The fields a profile sets itself (for ``reference``: what makes it the reference)."""
    if name not in _PROFILES:
        raise ValueError(f"unknown attribution profile {name!r}; known: {sorted(_PROFILES)}")
    return frozenset(_PROFILES[name])


def profile_config(name: str = "fast", **overrides: Any) -> AttributionConfig:
    """A named profile ("fast" or "reference") with keyword overrides."""
    if name not in _PROFILES:
        raise ValueError(f"unknown attribution profile {name!r}; known: {sorted(_PROFILES)}")
    return AttributionConfig(**{**_PROFILES[name], **overrides})


@dataclass
class AttributionItem:
    """One box instance: image (3, H, W) normalised+resized, box (4,) xyxy resized coords.

    ``valid_hw``: the resized image size before any batch padding (``prepare_images`` pads to
    a multiple of 32); it sets the box-area ratio of the stride and the jitter clipping.
    None means the whole tensor is image.
    """

    key: str
    image: torch.Tensor
    box: torch.Tensor
    label: int
    valid_hw: tuple[int, int] | None = None


@dataclass
class AttributionResult:
    key: str
    status: Literal["ok", "no_positive"]
    grid: np.ndarray  # (h', w') float16 in [0, 1]
    resized_hw: tuple[int, int]  # the size the grid is upsampled to (the image tensor's)
    stride: float
    stats: dict[str, Any] = field(default_factory=dict)
    valid_hw: tuple[int, int] | None = None  # unpadded part of resized_hw (None: all of it)


def _box_area(box: torch.Tensor) -> float:
    x0, y0, x1, y1 = box.reshape(4).tolist()
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def mask_stride(
    box: torch.Tensor,
    image_hw: tuple[int, int],
    coefs: Sequence[float],
    reference_size: float = 0.0,
) -> float:
    """s(a) = coef0 + coef1 * sqrt(a), a = box area / image area (both in the resized image).

    The reference's coefficients are pixels of an image resized to short side 800. With
    ``reference_size`` > 0 the stride is scaled by short side / ``reference_size``, so a
    detector run at another resolution gets a grid of the same shape (0: pixels as is).
    """
    stride = coefs[0] + coefs[1] * math.sqrt(_box_area(box) / float(image_hw[0] * image_hw[1]))
    if reference_size > 0:
        stride *= min(image_hw) / float(reference_size)
    return float(max(stride, 1.0))


def grid_shape(image_hw: tuple[int, int], stride: float, rounding: str) -> tuple[int, int]:
    """floor(H/s) x floor(W/s) (reference) or ceil (paper), at least 1 x 1."""
    op = math.floor if rounding == "floor" else math.ceil
    return max(1, int(op(image_hw[0] / stride))), max(1, int(op(image_hw[1] / stride)))


def box_union_grid(boxes: torch.Tensor, shape: tuple[int, int], stride: float) -> torch.Tensor:
    """1 on the union of ``boxes`` with coordinates divided by s and truncated (T L185-189)."""
    c = (boxes.float() / stride).trunc().long().cpu()
    ys = torch.arange(shape[0])[None, :]
    xs = torch.arange(shape[1])[None, :]
    in_y = (ys >= c[:, 1:2]) & (ys < c[:, 3:4])  # (P, h')
    in_x = (xs >= c[:, 0:1]) & (xs < c[:, 2:3])  # (P, w')
    return (in_y[:, :, None] & in_x[:, None, :]).any(dim=0).float()


def tv_norm(grid: torch.Tensor, beta: float) -> torch.Tensor:
    """Sum of |diff|^beta over vertical, horizontal and both diagonal neighbours,
    each diagonal counted twice as in the reference (U L20-31)."""
    v = (grid[1:, :] - grid[:-1, :]).abs().pow(beta).sum()
    h = (grid[:, 1:] - grid[:, :-1]).abs().pow(beta).sum()
    d1 = (grid[1:, 1:] - grid[:-1, :-1]).abs().pow(beta).sum()
    d2 = (grid[1:, :-1] - grid[:-1, 1:]).abs().pow(beta).sum()
    return v + h + 2.0 * (d1 + d2)


def map_to_image(
    grid: np.ndarray,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    align_corners: bool = True,
    valid_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Upsample a mask grid to the resized image (as during optimisation), crop away batch
    padding (``valid_hw``), then resize (bilinear, half-pixel centres) to the original
    image. Returns float32 (H, W)."""
    g = torch.from_numpy(np.asarray(grid, dtype=np.float32))[None, None]
    up = F.interpolate(g, size=tuple(resized_hw), mode="bilinear", align_corners=align_corners)
    if valid_hw is not None:
        up = up[..., : int(valid_hw[0]), : int(valid_hw[1])]
    if tuple(original_hw) != tuple(up.shape[-2:]):
        up = F.interpolate(up, size=tuple(original_hw), mode="bilinear", align_corners=False)
    return up[0, 0].numpy().astype(np.float32)


@functools.lru_cache(maxsize=256)
def _interp_matrix(
    out_size: int, in_size: int, align_corners: bool, device: torch.device
) -> torch.Tensor:
    """(out_size, in_size) weights of 1-D linear interpolation as F.interpolate computes it."""
    i = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        src = i * ((in_size - 1) / (out_size - 1)) if out_size > 1 else torch.zeros_like(i)
    else:
        src = ((i + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    weights[torch.arange(out_size), lo] += 1.0 - frac
    weights[torch.arange(out_size), hi] += frac
    return weights.to(device=device, dtype=torch.float32)


def upsample_grid(grid: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear upsampling of a (h, w) grid to ``size``, as F.interpolate(mode="bilinear"),
    done as two small matrix products. Bilinear is separable, so this is the same function; its
    backward is two matrix products too, where F.interpolate's scatters into the grid with
    atomics (14 % of a step's GPU time at batch 64 on 800-px images)."""
    rows = _interp_matrix(int(size[0]), int(grid.shape[0]), align_corners, grid.device)
    cols = _interp_matrix(int(size[1]), int(grid.shape[1]), align_corners, grid.device)
    return rows @ grid @ cols.T


@dataclass
class _State:
    """One instance being optimised."""

    item: AttributionItem
    image: torch.Tensor
    base: torch.Tensor | None  # the blurred image of baseline "blur", else None
    gen: torch.Generator
    proposals: torch.Tensor  # (P, 4) positives, on device
    t_ref: torch.Tensor  # (P, 4) reference deltas of the class slot
    p_ref: torch.Tensor  # (P,) reference target-class probability
    threshold: float
    stride: float
    window: tuple[int, int, int, int]  # y0, x0, y1, x1 of the masked-pass crop
    param: torch.Tensor
    opt: torch.optim.Optimizer
    prev: torch.Tensor
    seconds: float
    iterations: int = 0
    stable: int = 0
    losses: dict[str, float] = field(default_factory=dict)


def _grid_value(param: torch.Tensor, config: AttributionConfig) -> torch.Tensor:
    return torch.sigmoid(param) if config.param == "sigmoid" else param


def _autocast(config: AttributionConfig, device: torch.device):
    if config.amp and device.type == "cuda":
        dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext()


def _prepare_images(x: torch.Tensor, config: AttributionConfig, device: torch.device):
    if config.channels_last and device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def blurred_baseline(image: torch.Tensor, sigma_fraction: float) -> torch.Tensor:
    """The "blur" baseline of a (3, H, W) image: a Gaussian of sigma ``sigma_fraction`` x
    its short side (reflect padding), so it scales with the image, not with pixels."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    sigma = max(sigma_fraction * min(h, w), 1e-3)
    radius = min(math.ceil(3 * sigma), (min(h, w) - 1) // 2)
    if radius < 1:
        return image.clone()
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out[0]


def _valid_hw(item: AttributionItem) -> tuple[int, int]:
    if item.valid_hw is None:
        return int(item.image.shape[-2]), int(item.image.shape[-1])
    return int(item.valid_hw[0]), int(item.valid_hw[1])


def _no_positive(item: AttributionItem, hw, stride, config, seconds, device) -> AttributionResult:
    shape = grid_shape(hw, stride, config.grid_rounding)
    stats = {
        "positives": 0,
        "threshold_used": None,
        "iterations": 0,
        "loss_total": None,
        "loss_box": None,
        "loss_cls": None,
        "loss_l1": None,
        "loss_tv": None,
        "seconds": seconds,
        "device": str(device),
    }
    return AttributionResult(
        item.key, "no_positive", np.zeros(shape, np.float16), hw, stride, stats, _valid_hw(item)
    )


def _crop_window(
    box: torch.Tensor, proposals: torch.Tensor, hw: tuple[int, int], config: AttributionConfig
) -> tuple[int, int, int, int]:
    """The crop (y0, x0, y1, x1) of the masked passes; the whole image when disabled."""
    if config.crop_context <= 0:
        return 0, 0, hw[0], hw[1]
    b = box.reshape(4).float().cpu()
    p = proposals.float().cpu()
    bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
    c = config.crop_context
    x0 = min(float(b[0]) - c * bw, float(p[:, 0].min()))
    y0 = min(float(b[1]) - c * bh, float(p[:, 1].min()))
    x1 = max(float(b[2]) + c * bw, float(p[:, 2].max()))
    y1 = max(float(b[3]) + c * bh, float(p[:, 3].max()))
    a = config.crop_align
    return (
        max(0, math.floor(y0 / a) * a),
        max(0, math.floor(x0 / a) * a),
        min(hw[0], math.ceil(y1 / a) * a),
        min(hw[1], math.ceil(x1 / a) * a),
    )


def _reference_pass(
    heads: HeadsFn,
    items: list[AttributionItem],
    images: list[torch.Tensor],
    config: AttributionConfig,
    device: torch.device,
) -> tuple[list[_State], list[AttributionResult]]:
    """Jitter, one no-grad heads pass on the unmasked images, pick positives, init masks."""
    t0 = time.perf_counter()
    hw = (int(images[0].shape[-2]), int(images[0].shape[-1]))
    gens = [instance_generator(config.seed, it.key) for it in items]
    props = [
        jitter_boxes(it.box, config.num_jitters, config.jitter_fraction, _valid_hw(it), g).to(
            device
        )
        for it, g in zip(items, gens, strict=True)
    ]
    # The same image tensor (several instances of one image) goes through the backbone once.
    uniq: dict[int, int] = {}
    for img in images:
        uniq.setdefault(id(img), len(uniq))
    order = list(uniq)
    per_image: list[list[int]] = [[] for _ in order]
    for k, img in enumerate(images):
        per_image[uniq[id(img)]].append(k)
    by_id = {id(img): img for img in images}
    batch = torch.stack([by_id[i] for i in order])
    flat = [k for ks in per_image for k in ks]
    with torch.no_grad(), _autocast(config, device):
        out = heads(
            _prepare_images(batch, config, device),
            [torch.cat([props[k] for k in ks]) for ks in per_image],
        )
    logits = out.logits.float().split(config.num_jitters)
    deltas = out.deltas.float().split(config.num_jitters)
    boxes = out.boxes.float().split(config.num_jitters)
    where = {k: n for n, k in enumerate(flat)}
    bases: dict[int, torch.Tensor] = {}
    if config.baseline == "blur":
        bases = {i: blurred_baseline(img, config.baseline_blur) for i, img in by_id.items()}
    share = (time.perf_counter() - t0) / len(items)

    states: list[_State] = []
    done: list[AttributionResult] = []
    for k, it in enumerate(items):
        n = where[k]
        label = int(it.label)
        box = it.box.to(device=device, dtype=torch.float32)
        stride = mask_stride(
            it.box, _valid_hw(it), config.stride_coefs, config.stride_reference_size
        )
        idx, thr = select_positives(
            logits[n], boxes[n], label, box, config.iou_thresholds, config.max_positives,
            config.iou_truncate,
        )  # fmt: skip
        if idx.numel() == 0:
            done.append(_no_positive(it, hw, stride, config, share, device))
            continue
        shape = grid_shape(hw, stride, config.grid_rounding)
        if config.init == "box_union":
            init = box_union_grid(boxes[n][idx, label], shape, stride)
        else:
            init = torch.full(shape, float(config.init_value))
        init = init.to(device)
        if config.param == "sigmoid":
            init = torch.logit(init.clamp(_SIGMOID_EPS, 1.0 - _SIGMOID_EPS))
        param = init.clone().requires_grad_(True)
        states.append(
            _State(
                item=it,
                image=images[k],
                base=bases.get(id(images[k])),
                gen=gens[k],
                proposals=props[k][idx],
                t_ref=deltas[n][idx, label],
                p_ref=torch.softmax(logits[n][idx], dim=1)[:, label],
                threshold=float(thr),
                stride=stride,
                window=_crop_window(it.box, props[k][idx], hw, config),
                param=param,
                opt=torch.optim.Adam([param], lr=config.lr),
                prev=_grid_value(param.detach(), config).clone(),
                seconds=share,
            )
        )
    return states, done


def _losses(
    heads: HeadsFn,
    active: list[_State],
    images: torch.Tensor,
    bases: torch.Tensor | None,
    config: AttributionConfig,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-instance losses (B,) for one batched masked forward pass; ``bases`` holds the
    active instances' blurred images under baseline "blur" (else None)."""
    hw = images.shape[-2:]
    grids = [_grid_value(st.param, config) for st in active]
    masks = torch.stack([upsample_grid(g, hw, config.align_corners) for g in grids])[:, None]
    full = (0, 0, int(hw[0]), int(hw[1]))
    cropped = any(st.window != full for st in active)
    blur = config.baseline == "blur"
    if not cropped:
        x = images * masks
        if bases is not None:
            x = x + bases * (1.0 - masks)
        elif config.baseline_value != 0.0:
            x = x + config.baseline_value * (1.0 - masks)
    else:
        hc = max(st.window[2] - st.window[0] for st in active)
        wc = max(st.window[3] - st.window[1] for st in active)
        parts_x = []
        for n, st in enumerate(active):
            y0, x0, y1, x1 = st.window
            m = masks[n, :, y0:y1, x0:x1]
            xi = st.image[:, y0:y1, x0:x1] * m
            if blur:
                xi = xi + st.base[:, y0:y1, x0:x1] * (1.0 - m)
            elif config.baseline_value != 0.0:
                xi = xi + config.baseline_value * (1.0 - m)
            pad = (0, wc - (x1 - x0), 0, hc - (y1 - y0))
            parts_x.append(F.pad(xi, pad, value=config.baseline_value))
        x = torch.stack(parts_x)
    # Each instance's positives of this step, drawn on the CPU from its own generator, go to
    # the device in one copy (one per instance stalled the GPU's queue every step).
    picks: list[torch.Tensor] = []
    for st in active:
        num = st.proposals.shape[0]
        k = config.positives_per_iter
        picks.append(
            torch.randperm(num, generator=st.gen)[:k] if k and num > k else torch.arange(num)
        )
    sizes = [len(p) for p in picks]
    packed = torch.cat([*picks, torch.tensor(sizes)])
    if device.type == "cuda":
        packed = packed.pin_memory()
    *sel, counts = packed.to(device, non_blocking=True).split([*sizes, len(sizes)])
    props = [st.proposals[s] for st, s in zip(active, sel, strict=True)]
    if cropped:
        props = [
            p - p.new_tensor([st.window[1], st.window[0], st.window[1], st.window[0]])
            for st, p in zip(active, props, strict=True)
        ]
    seg = torch.repeat_interleave(
        torch.arange(len(active), device=device), counts, output_size=sum(sizes)
    )
    labels = torch.cat(
        [
            torch.full((len(s),), int(st.item.label), device=device)
            for st, s in zip(active, sel, strict=True)
        ]
    )
    t_ref = torch.cat([st.t_ref[s] for st, s in zip(active, sel, strict=True)])
    p_ref = torch.cat([st.p_ref[s] for st, s in zip(active, sel, strict=True)])
    with _autocast(config, device):
        out = heads(_prepare_images(x, config, device), props)
    rows = torch.arange(labels.shape[0], device=device)
    zeros = torch.zeros(len(active), device=device)
    nb = counts.float()
    if config.use_box_head:
        d = out.deltas.float()[rows, labels]
        per = config.box_weight * (d - t_ref).abs().mean(dim=1)
        loss_box = zeros.index_add(0, seg, per) / nb
    else:
        loss_box = zeros
    if config.use_cls_head:
        p = torch.softmax(out.logits.float(), dim=1)[rows, labels]
        per = config.cls_weight * (p - p_ref).abs()
        loss_cls = zeros.index_add(0, seg, per) / nb
    else:
        loss_cls = zeros
    if config.l1_reduction == "sum":
        loss_l1 = torch.stack([g.abs().sum() for g in grids])
    else:
        loss_l1 = torch.stack([g.abs().mean() for g in grids])
    if config.tv_weight > 0:
        loss_tv = torch.stack([tv_norm(g, config.tv_beta) for g in grids])
    else:
        loss_tv = zeros
    total = loss_box + loss_cls + config.l1_weight * loss_l1 + config.tv_weight * loss_tv
    parts = {"box": loss_box, "cls": loss_cls, "l1": loss_l1, "tv": loss_tv}
    return total, parts


def _finish(st: _State, config: AttributionConfig, device: torch.device) -> AttributionResult:
    grid = _grid_value(st.param.detach(), config).clamp(0.0, 1.0).cpu().numpy()
    stats = {
        "positives": int(st.proposals.shape[0]),
        "threshold_used": st.threshold,
        "iterations": st.iterations,
        "loss_total": st.losses.get("total"),
        "loss_box": st.losses.get("box"),
        "loss_cls": st.losses.get("cls"),
        "loss_l1": st.losses.get("l1"),
        "loss_tv": st.losses.get("tv"),
        "seconds": st.seconds,
        "device": str(device),
    }
    hw = (int(st.image.shape[-2]), int(st.image.shape[-1]))
    return AttributionResult(
        st.item.key, "ok", grid.astype(np.float16), hw, st.stride, stats, _valid_hw(st.item)
    )


def _run_group(
    heads: HeadsFn,
    items: list[AttributionItem],
    images: list[torch.Tensor],
    config: AttributionConfig,
    device: torch.device,
    on_result: Callable[[AttributionResult], None],
) -> None:
    """Optimise same-size instances, ``batch_size`` at a time; a finished instance leaves
    the batch and the next prepared one takes its place."""
    waiting = list(range(len(items)))
    ready: list[_State] = []
    active: list[_State] = []
    batch_images: torch.Tensor | None = None
    batch_bases: torch.Tensor | None = None
    scale = (
        _FP16_LOSS_SCALE
        if (config.amp and config.amp_dtype == "float16" and device.type == "cuda")
        else 1.0
    )
    while active or ready or waiting:
        if len(active) < config.batch_size and (ready or waiting):
            if not ready:
                take, waiting = waiting[: config.batch_size], waiting[config.batch_size :]
                states, done = _reference_pass(
                    heads, [items[i] for i in take], [images[i] for i in take], config, device
                )
                for res in done:
                    on_result(res)
                ready.extend(states)
                continue
            while ready and len(active) < config.batch_size:
                active.append(ready.pop(0))
            batch_images = None
        if not active:
            continue
        if batch_images is None:
            # in the backbone's memory layout once per batch, not on every step
            batch_images = _prepare_images(torch.stack([st.image for st in active]), config, device)
            batch_bases = (
                _prepare_images(torch.stack([st.base for st in active]), config, device)
                if config.baseline == "blur"
                else None
            )
        t0 = time.perf_counter()
        total, parts = _losses(heads, active, batch_images, batch_bases, config, device)
        params = [st.param for st in active]
        grads = torch.autograd.grad(total.sum() * scale, params)
        finished: list[int] = []
        with torch.no_grad():
            for n, (st, g) in enumerate(zip(active, grads, strict=True)):
                if not torch.isfinite(g).all():
                    g = torch.zeros_like(g)
                st.param.grad = g / scale
                st.opt.step()
                st.param.grad = None
                if config.param == "clamp":
                    st.param.clamp_(0.0, 1.0)
                st.iterations += 1
                st.losses = {"total": float(total[n])}
                st.losses.update({k: float(v[n]) for k, v in parts.items()})
                cur = _grid_value(st.param, config)
                change = float((cur - st.prev).abs().max())
                st.prev = cur.clone()
                st.stable = st.stable + 1 if change < config.early_stop_tol else 0
                stop = config.early_stop and st.stable >= config.early_stop_patience
                if stop or st.iterations >= config.iterations:
                    finished.append(n)
        dt = (time.perf_counter() - t0) / len(active)
        for st in active:
            st.seconds += dt
        if finished:
            for n in finished:
                on_result(_finish(active[n], config, device))
            active = [st for n, st in enumerate(active) if n not in finished]
            batch_images = None


@contextmanager
def _backend_flags(config: AttributionConfig, device: torch.device) -> Iterator[None]:
    """cuDNN search and TF32 as the config asks, on CUDA only; the caller's flags come back."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    on_cuda = device.type == "cuda"
    matmul_tf32 = matmul.allow_tf32
    try:
        if on_cuda and not config.tf32:
            matmul.allow_tf32 = False
        with cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark or (config.cudnn_benchmark and on_cuda),
            deterministic=cudnn.deterministic,
            allow_tf32=cudnn.allow_tf32 and (config.tf32 or not on_cuda),
        ):
            yield
    finally:
        matmul.allow_tf32 = matmul_tf32


def attribute_instances(
    heads: HeadsFn,
    items: list[AttributionItem],
    config: AttributionConfig,
    device: torch.device | str,
) -> list[AttributionResult]:
    """BBAM for every item; results in the order of ``items``.

    Instances are grouped by resized image size (one heads call needs one size) and
    optimised ``config.batch_size`` at a time. The caller should freeze the detector
    (eval mode); the engine differentiates w.r.t. the masks only in any case.
    """
    device = torch.device(device)
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("attribute_instances: item keys must be unique")
    for it in items:
        if it.image.ndim != 3 or it.image.shape[0] != 3:
            raise ValueError(f"item {it.key}: image must be (3, H, W), got {tuple(it.image.shape)}")
        if tuple(it.box.reshape(-1).shape) != (4,):
            raise ValueError(f"item {it.key}: box must have 4 values")
        vh, vw = _valid_hw(it)
        if not (0 < vh <= it.image.shape[-2] and 0 < vw <= it.image.shape[-1]):
            raise ValueError(f"item {it.key}: valid_hw {it.valid_hw} outside the image tensor")
    # Move each distinct image once (instances of one image share the tensor).
    moved: dict[int, torch.Tensor] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for k, it in enumerate(items):
        if id(it.image) not in moved:
            moved[id(it.image)] = it.image.detach().to(device=device, dtype=torch.float32)
        groups.setdefault((int(it.image.shape[-2]), int(it.image.shape[-1])), []).append(k)
    # Largest boxes first: a batch then holds boxes of like size, whose proposals a pyramid
    # detector pools from the same levels, and it builds only those (bbam.detector). Each
    # instance has its own generator, so its result does not depend on this order.
    for idx in groups.values():
        idx.sort(key=lambda k: -_box_area(items[k].box))
    results: dict[str, AttributionResult] = {}

    def on_result(res: AttributionResult) -> None:
        results[res.key] = res

    with _backend_flags(config, device):
        for idx in groups.values():
            _run_group(
                heads,
                [items[k] for k in idx],
                [moved[id(items[k].image)] for k in idx],
                config,
                device,
                on_result,
            )
    return [results[k] for k in keys]
