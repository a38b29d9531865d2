"""Attribution map -> per-instance foreground / not-background / ignore masks (reference §6b).

Two modes:
- "reference": what the reference code does. The box-restricted map is rescaled by a rank rule
  (the top (1 - th) fraction of box pixels saturates to 1), Gaussian-blurred, passed through a
  two-label DenseCRF, and cut at Q_fg > crf_cut. It is run twice: th_fg (0.85) gives the tight
  foreground, th_bg (0.2) the loose not-background mask. Fallbacks handle small masks and
  empty maps.
- "absolute": the paper's wording, theta_fg / theta_bg as thresholds on the normalised map
  (optionally on the CRF marginal instead).

Pixels in not-background but not foreground are "ignore". Differences from the reference, all
switchable or documented:
- The CRF runs on a crop (box + crf_margin) when crf_on_crop is set (default): pixels outside the
  crop, which all have a near-certain background unary, no longer pull on in-box pixels through the
  80-px bilateral kernel. crf_on_crop=False reproduces the whole-image CRF.
- The masks are clipped to the box after the CRF (clip_to_box, default on); the reference leaves
  CRF output outside the box as is.
- not_bg is forced to contain fg (so fg pixels are never "outside" the loose mask).
- The empty-map fallback never drops the instance: if no prior passes, the last CRF result is used,
  or the filled box when that is empty too (empty_final="box" uses the filled box directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from bbam.data.masks import box_slices

MODES = ("reference", "absolute")
FALLBACKS = ("none", "small_mask", "empty_map")


@dataclass(frozen=True)
class RefineConfig:
    mode: str = "reference"
    # reference mode: rank fractions (the top 1 - th of box pixels saturate)
    th_fg: float = 0.85
    th_bg: float = 0.2
    # absolute mode: thresholds on the normalised map (the paper's theta_fg / theta_bg)
    abs_fg: float = 0.8
    abs_bg: float = 0.2
    abs_crf: bool = False
    # Gaussian blur: k = int(blur_base + blur_scale * sqrt(B / (W * H))), kernel 2k+1, sigma k
    blur: bool = True
    blur_base: float = 16.0
    blur_scale: float = 48.0
    blur_reference_size: float = 0.0  # >0: scale k by image short side / this (0 = reference)
    # DenseCRF
    crf: bool = True
    crf_iterations: int = 10
    crf_clip: float = 1e-5
    crf_gauss_sxy: float = 1.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 80.0
    crf_bilateral_srgb: float = 3.0
    crf_bilateral_compat: float = 4.0
    crf_cut: float = 0.9
    crf_on_crop: bool = True
    crf_margin: int = 40
    clip_to_box: bool = True
    # small-mask fallback: mask <= small_mask_frac * B and box <= small_box_frac * image
    small_fallback: bool = True
    small_mask_frac: float = 0.2
    small_box_frac: float = 0.1
    small_priors: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95, 0.96)
    small_accept_frac: float = 1.0 / 3.0
    # empty-map fallback: box prior, first result above empty_accept_frac * B
    empty_priors: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95)
    empty_accept_frac: float = 0.2
    empty_final: str = "last"  # "last" (last CRF result, box if empty) | "box"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RefineConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.empty_final not in ("last", "box"):
            raise ValueError(
                f"RefineConfig.empty_final must be 'last' or 'box', got {self.empty_final!r}"
            )
        for name in ("th_fg", "th_bg", "abs_fg", "abs_bg", "crf_cut"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RefineConfig.{name} must be in [0, 1], got {value}")
        # YAML gives lists; keep the dataclass hashable
        object.__setattr__(self, "small_priors", tuple(float(p) for p in self.small_priors))
        object.__setattr__(self, "empty_priors", tuple(float(p) for p in self.empty_priors))


@dataclass
class InstanceMasks:
    fg: np.ndarray
    not_bg: np.ndarray
    ignore: np.ndarray
    stats: dict = field(default_factory=dict)


def normalise_in_box(heatmap: np.ndarray, sl: tuple[slice, slice]) -> np.ndarray:
    """Zero outside the box, then (m - min) / max over the image, as the reference (the divisor is
    max, not the range; min is 0 unless the box covers the whole image)."""
    out = np.zeros(heatmap.shape, dtype=np.float32)
    out[sl] = np.nan_to_num(heatmap[sl].astype(np.float32), nan=0.0)
    peak = float(out.max(initial=0.0))
    out = out - out.min(initial=0.0)
    if peak > 0:
        out = out / peak
    return np.clip(out, 0.0, 1.0)


def rank_rescale(heatmap: np.ndarray, sl: tuple[slice, slice], th: float) -> np.ndarray:
    """Divide by the box value at descending rank floor(B * (1 - th)) (+1e-8), clip to [0, 1]."""
    values = np.sort(heatmap[sl].ravel())[::-1]
    if values.size == 0:
        return heatmap.copy()
    rank = min(int(math.floor(values.size * (1.0 - th))), values.size - 1)
    return np.clip(heatmap / (values[rank] + 1e-8), 0.0, 1.0).astype(np.float32)


def blur_kernel_k(box_area: int, height: int, width: int, cfg: RefineConfig) -> int:
    """k = int(16 + 48 sqrt(B / (W H))) in pixels (reference, tuned on VOC's ~500x375
    images); with ``blur_reference_size`` > 0, scaled by short side / that size."""
    k = cfg.blur_base + cfg.blur_scale * math.sqrt(box_area / float(height * width))
    if cfg.blur_reference_size > 0:
        k *= min(height, width) / float(cfg.blur_reference_size)
    return max(1, int(k))


def dense_crf(image: np.ndarray, prob_fg: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """Q(fg) of a 2-label DenseCRF with unary -log[m, 1 - m] on an RGB uint8 image.

    The reference passes a BGR image; the bilateral kernel only uses colour distances, so the
    channel order does not matter."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    height, width = prob_fg.shape
    prob = np.clip(prob_fg.astype(np.float32), 0.0, 1.0)
    probs = np.stack([prob, 1.0 - prob])
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=cfg.crf_clip)))
    crf.addPairwiseGaussian(sxy=cfg.crf_gauss_sxy, compat=cfg.crf_gauss_compat)
    crf.addPairwiseBilateral(
        sxy=cfg.crf_bilateral_sxy,
        srgb=cfg.crf_bilateral_srgb,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8),
        compat=cfg.crf_bilateral_compat,
    )
    q = np.array(crf.inference(cfg.crf_iterations), dtype=np.float32).reshape(2, height, width)
    return q[0]


def crf_fg_prob(
    image: np.ndarray, prob_fg: np.ndarray, sl: tuple[slice, slice], cfg: RefineConfig
) -> np.ndarray:
    """DenseCRF Q(fg) at full resolution; on a box+margin crop when cfg.crf_on_crop (0 outside)."""
    height, width = prob_fg.shape
    if not cfg.crf_on_crop:
        return dense_crf(image, prob_fg, cfg)
    m = int(cfg.crf_margin)
    ys = slice(max(sl[0].start - m, 0), min(sl[0].stop + m, height))
    xs = slice(max(sl[1].start - m, 0), min(sl[1].stop + m, width))
    out = np.zeros((height, width), dtype=np.float32)
    out[ys, xs] = dense_crf(image[ys, xs], prob_fg[ys, xs], cfg)
    return out


def _cut(q: np.ndarray, cut: float, region: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    mask = q > cut
    return mask & region if cfg.clip_to_box else mask


def _prior_search(
    image: np.ndarray,
    region: np.ndarray,
    sl: tuple[slice, slice],
    keep: np.ndarray | None,
    priors: tuple[float, ...],
    accept: float,
    cfg: RefineConfig,
) -> tuple[np.ndarray | None, bool]:
    """Fill the box with prior p (existing fg kept at 1), CRF, cut; first result with area > accept."""
    last = None
    for p in priors:
        prior = np.where(region, np.float32(p), np.float32(0.0))
        if keep is not None:
            prior[keep] = 1.0
        last = _cut(crf_fg_prob(image, prior, sl, cfg), cfg.crf_cut, region, cfg)
        if last.sum() > accept:
            return last, True
    return last, False


def _reference_mask(
    image: np.ndarray,
    norm: np.ndarray,
    sl: tuple[slice, slice],
    region: np.ndarray,
    th: float,
    cfg: RefineConfig,
) -> tuple[np.ndarray, str, bool]:
    """One reference run (one th) -> (mask, fallback used, fallback accepted)."""
    height, width = norm.shape
    box_area = int(region.sum())
    if box_area == 0:
        return np.zeros_like(region), "none", True
    if float(norm[sl].max(initial=0.0)) <= 0.0:
        if not cfg.crf:
            return region.copy(), "empty_map", False
        mask = None
        passed = False
        if cfg.empty_final == "last":
            mask, passed = _prior_search(
                image, region, sl, None, cfg.empty_priors, cfg.empty_accept_frac * box_area, cfg
            )
        if mask is None or not mask.any():
            mask = region.copy()
        return mask, "empty_map", passed
    m = rank_rescale(norm, sl, th)
    if cfg.blur:
        k = blur_kernel_k(box_area, height, width, cfg)
        m = cv2.GaussianBlur(m, (2 * k + 1, 2 * k + 1), k)
        m = normalise_in_box(m, sl)
    if not cfg.crf:
        return (m > cfg.crf_cut) & region, "none", True
    mask = _cut(crf_fg_prob(image, m, sl, cfg), cfg.crf_cut, region, cfg)
    small = mask.sum() <= cfg.small_mask_frac * box_area
    small_box = box_area <= cfg.small_box_frac * height * width
    if cfg.small_fallback and small and small_box:
        new, passed = _prior_search(
            image, region, sl, mask, cfg.small_priors, cfg.small_accept_frac * box_area, cfg
        )
        if new is not None:
            return new, "small_mask", passed
    return mask, "none", True


def refine_instance(
    heatmap: np.ndarray | None,
    box: np.ndarray,
    image: np.ndarray,
    cfg: RefineConfig = RefineConfig(),  # noqa: B008 (frozen dataclass)
) -> InstanceMasks:
    """Masks for one instance from its attribution map at original resolution (None = no map)."""
    height, width = image.shape[:2]
    if heatmap is None:
        heatmap = np.zeros((height, width), dtype=np.float32)
    if heatmap.shape != (height, width):
        raise ValueError(f"attribution map shape {heatmap.shape} != image shape {(height, width)}")
    sl = box_slices(np.asarray(box), height, width)
    region = np.zeros((height, width), dtype=bool)
    region[sl] = True
    box_area = int(region.sum())
    norm = normalise_in_box(heatmap, sl)
    fallback_bg = "none"
    passed = True
    if cfg.mode == "reference":
        fg, fallback, passed = _reference_mask(image, norm, sl, region, cfg.th_fg, cfg)
        not_bg, fallback_bg, _ = _reference_mask(image, norm, sl, region, cfg.th_bg, cfg)
    else:
        fallback = "none"
        prob = crf_fg_prob(image, norm, sl, cfg) if cfg.abs_crf else norm
        fg = (prob >= cfg.abs_fg) & region
        not_bg = (prob >= cfg.abs_bg) & region
        if cfg.abs_crf and not cfg.clip_to_box:
            fg, not_bg = prob >= cfg.abs_fg, prob >= cfg.abs_bg
    not_bg = not_bg | fg
    ignore = not_bg & ~fg
    stats = {
        "fg_area": int(fg.sum()),
        "not_bg_area": int(not_bg.sum()),
        "ignore_area": int(ignore.sum()),
        "box_area": box_area,
        "fallback": fallback,
        "fallback_not_bg": fallback_bg,
        "fallback_passed": bool(passed),
        "mode": cfg.mode,
        "mcg_used": False,
    }
    return InstanceMasks(fg=fg, not_bg=not_bg, ignore=ignore, stats=stats)
