"""Attribution map -> per-instance foreground / not-background / ignore masks (reference §6b).

Three modes:
- "reference": what the reference code does. The box-restricted map is rescaled by a rank rule
  (the top (1 - th) fraction of box pixels saturates to 1), Gaussian-blurred, passed through a
  two-label DenseCRF, and cut at Q_fg > crf_cut. It is run twice: th_fg (0.85) gives the tight
  foreground, th_bg (0.2) the loose not-background mask. Fallbacks handle small masks and
  empty maps.
- "absolute": the paper's wording, theta_fg / theta_bg as thresholds on the normalised map
  (optionally on the CRF marginal instead).
- "object": keeps what a good map knows. The reference's blur (k = 16 + 48 sqrt(B / WH) px) and
  80-px bilateral kernel are sized for ~500x375 images and its rank rule saturates 15 % of the
  box whatever the object; on a real photo they turn the GT mask itself into masks of about half
  its IoU when objects are thin or occluded. Here every length scales with the object
  (s = sqrt(box area)), and the map is read in bands of its own normalised value: >= obj_sure_fg
  is definite foreground, >= obj_fg probable foreground, the rest of the box probable background,
  and a margin of obj_margin * s around the box definite background. The cut is either a DenseCRF
  on a crop (box + margin) whose unary is the band prior (0 -> 0, obj_fg -> 0.5, obj_sure_fg ->
  0.99) and whose bilateral sxy is obj_crf_sxy * s, cut at Q_fg > 0.5 (obj_cut="crf", default),
  or cv2.grabCut initialised with the bands as GC_FGD / GC_PR_FGD / GC_PR_BGD / GC_BGD, so colour
  models learnt from the map's own bands decide the boundary (obj_cut="grabcut"), or a soft
  GrabCut: the map as a prior that is never 0 or 1, times colour likelihoods learnt from the
  estimate, cut by a DenseCRF, a few rounds (obj_cut="colour_crf"; colour_crf_cut). An optional
  blur has sigma obj_blur * s. not_bg = fg | (map >= obj_not_bg) (1.0: no ignore band). A map
  that is empty in the box gets a box-initialised GrabCut (the filled box when that keeps
  <= empty_accept_frac of it).
  Nothing depends on the image size but the CRF's 1-px Gaussian smoothness kernel.

In every mode the masks stay inside the box. Pixels in not-background but not foreground are
"ignore". Differences of the "reference" mode from the reference code, all switchable or
documented:
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
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from bbam.data.masks import box_slices

MODES = ("reference", "absolute", "object")
OBJECT_CUTS = ("grabcut", "crf", "colour_crf")
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
    # object mode: every length is a fraction of the box's size s = sqrt(box area), never pixels
    # of the image; the map is read in bands of its own normalised value
    obj_cut: str = "crf"  # "crf" (DenseCRF on the band prior) | "grabcut" (seeded by the bands)
    obj_fg: float = 0.25  # map >= this: probable foreground (prior >= 0.5); below: background
    obj_sure_fg: float = 0.8  # map >= this: definite foreground (prior 0.99 / GrabCut GC_FGD)
    # not-background = fg | map >= this (inside the box); the pixels it adds to fg are the
    # ignore band. 1.0: no band, the cut alone labels the box
    obj_not_bg: float = 0.1
    obj_blur: float = 0.0  # Gaussian sigma = obj_blur * s before the bands (0 = no blur)
    obj_crf_sxy: float = 0.3  # crf: bilateral sxy = obj_crf_sxy * s (srgb / compat as crf_*)
    obj_margin: float = 0.25  # crop = box + obj_margin * s on each side (background outside box)
    obj_iterations: int = 5  # grabcut: iterations
    # colour_crf: P(fg) = the map's prior (0 -> obj_prior_lo, obj_fg -> 0.5, 1 -> obj_prior_hi)
    # times colour likelihoods learnt from the current estimate (RGB histograms of
    # obj_colour_bins per channel), cut by a DenseCRF, obj_rounds times: a soft GrabCut
    obj_prior_lo: float = 0.1
    obj_prior_hi: float = 0.99
    obj_colour_bins: int = 8
    obj_rounds: int = 3
    obj_crf_srgb: float = 13.0  # bilateral colour scale (sxy: obj_crf_sxy * s)
    obj_crf_compat: float = 6.0  # bilateral weight
    obj_crf_smooth: float = 3.0  # weight of the 1-px Gaussian smoothness kernel
    obj_crf_iterations: int = 5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RefineConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.empty_final not in ("last", "box"):
            raise ValueError(
                f"RefineConfig.empty_final must be 'last' or 'box', got {self.empty_final!r}"
            )
        if self.obj_cut not in OBJECT_CUTS:
            raise ValueError(
                f"RefineConfig.obj_cut must be one of {OBJECT_CUTS}, got {self.obj_cut!r}"
            )
        if not 0.0 <= self.obj_fg <= self.obj_sure_fg <= 1.0:
            raise ValueError(
                "RefineConfig needs 0 <= obj_fg <= obj_sure_fg <= 1, got "
                f"{self.obj_fg}, {self.obj_sure_fg}"
            )
        if not 0.0 <= self.obj_not_bg <= 1.0:
            raise ValueError(f"RefineConfig.obj_not_bg must be in [0, 1], got {self.obj_not_bg}")
        for name in ("obj_blur", "obj_margin", "obj_crf_sxy"):
            value = getattr(self, name)
            if not 0.0 <= value <= 2.0:
                raise ValueError(f"RefineConfig.{name} must be in [0, 2], got {value}")
        if self.obj_iterations < 1:
            raise ValueError(f"RefineConfig.obj_iterations must be >= 1, got {self.obj_iterations}")
        if not 0.0 < self.obj_prior_lo < 0.5 < self.obj_prior_hi < 1.0:
            raise ValueError(
                "RefineConfig needs 0 < obj_prior_lo < 0.5 < obj_prior_hi < 1, got "
                f"{self.obj_prior_lo}, {self.obj_prior_hi}"
            )
        if not 2 <= self.obj_colour_bins <= 64:
            raise ValueError(
                f"RefineConfig.obj_colour_bins must be in [2, 64], got {self.obj_colour_bins}"
            )
        for name in ("obj_rounds", "obj_crf_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"RefineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("th_fg", "th_bg", "abs_fg", "abs_bg", "crf_cut"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RefineConfig.{name} must be in [0, 1], got {value}")
        # the loose not-background cut must not be tighter than the foreground one: swapped,
        # not_bg (forced to include fg) equals fg and the ignore band silently vanishes
        for fg, bg in (("th_fg", "th_bg"), ("abs_fg", "abs_bg")):
            if getattr(self, bg) > getattr(self, fg):
                raise ValueError(
                    f"RefineConfig needs {bg} <= {fg} (the ignore band lies between them), "
                    f"got {bg} {getattr(self, bg)} > {fg} {getattr(self, fg)}"
                )
        # YAML reads .nan and .inf as floats; no knob here means anything by them
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"RefineConfig.{name} must be a finite number, got {value}")
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


def object_blur(norm: np.ndarray, sl: tuple[slice, slice], cfg: RefineConfig) -> np.ndarray:
    """The box-restricted map blurred with sigma = obj_blur * sqrt(box area), renormalised."""
    box_h, box_w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
    sigma = cfg.obj_blur * math.sqrt(box_h * box_w)
    if sigma < 0.5:
        return norm
    blurred = cv2.GaussianBlur(norm, (0, 0), sigma)
    return normalise_in_box(blurred, sl)


def object_crop(
    sl: tuple[slice, slice], height: int, width: int, cfg: RefineConfig
) -> tuple[slice, slice]:
    """The box plus obj_margin * sqrt(box area) (at least 2 px) on each side, clipped."""
    box_h, box_w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
    m = max(2, int(round(cfg.obj_margin * math.sqrt(box_h * box_w))))
    return (
        slice(max(sl[0].start - m, 0), min(sl[0].stop + m, height)),
        slice(max(sl[1].start - m, 0), min(sl[1].stop + m, width)),
    )


def seeded_grabcut(image: np.ndarray, seeds: np.ndarray, iterations: int) -> np.ndarray | None:
    """cv2.grabCut initialised with a mask of GC_* seed labels; (probable) fg, None on failure.

    GrabCut needs both colour models: without a definite or probable sample of each, None."""
    fg_seed = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    bg_seed = (seeds == cv2.GC_BGD) | (seeds == cv2.GC_PR_BGD)
    if fg_seed.sum() < 10 or bg_seed.sum() < 10:
        return None
    mask = np.ascontiguousarray(seeds, dtype=np.uint8)
    bgd = np.zeros((1, 65), dtype=np.float64)
    fgd = np.zeros((1, 65), dtype=np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1], dtype=np.uint8)
    # GrabCut's k-means draws from OpenCV's global RNG: without a seed an instance's mask would
    # depend on what the worker process cut before it.
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(bgr, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return None
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def band_prior(m: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """Piecewise-linear map -> P(fg): 0 -> 0, obj_fg -> 0.5, obj_sure_fg and above -> 0.99, so
    the CRF cut at 0.5 starts where GrabCut's probable foreground starts."""
    lo = max(cfg.obj_fg, 1e-6)
    hi = max(cfg.obj_sure_fg, lo + 1e-6)
    below = 0.5 * m / lo
    above = 0.5 + 0.49 * np.clip((m - lo) / (hi - lo), 0.0, 1.0)
    return np.where(m < lo, below, above).astype(np.float32)


def map_prior(m: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """Piecewise-linear map -> P(fg) for colour_crf: 0 -> obj_prior_lo, obj_fg -> 0.5, 1 ->
    obj_prior_hi. Never 0 or 1: the colours may overrule the map anywhere in the box."""
    mid = min(max(cfg.obj_fg, 1e-6), 1.0 - 1e-6)
    return np.interp(m, (0.0, mid, 1.0), (cfg.obj_prior_lo, 0.5, cfg.obj_prior_hi))


def colour_likelihood(index: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """p(colour | weights) per pixel: the weighted RGB histogram (``index`` = bin of each
    pixel), smoothed over 3 neighbouring bins per axis and floored, so that a colour seen
    once or never still has some likelihood."""
    from scipy.ndimage import uniform_filter

    hist = np.bincount(index.ravel(), weights=weights.ravel(), minlength=bins**3)
    hist = uniform_filter(hist.reshape(bins, bins, bins), size=3, mode="constant")
    hist = hist + 1e-3 * hist.sum() / hist.size + 1e-12
    return (hist / hist.sum()).ravel()[index]


def colour_crf_cut(
    image: np.ndarray, m: np.ndarray, in_box: np.ndarray, size: float, cfg: RefineConfig
) -> np.ndarray:
    """The colour_crf cut of a crop: the map's prior times fg / bg colour likelihoods learnt
    from the current estimate (fg: box pixels weighted by Q(fg); bg: the crop weighted by
    1 - Q(fg), the margin outside the box counting fully), cut by a DenseCRF whose marginals
    are the next estimate; obj_rounds rounds, then Q(fg) > 0.5 inside the box.

    GrabCut's idea with the map as a soft prior: a strong map is kept where the colours do not
    clearly contradict it, and map values that are wrong (an outline, a hole) can be overruled,
    which the hard seeds of obj_cut="grabcut" cannot."""
    bins = cfg.obj_colour_bins
    q = (image.astype(np.int64) * bins) // 256
    index = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    prior = np.where(in_box, map_prior(m, cfg), 0.0)
    crf_cfg = replace(
        cfg,
        crf_iterations=cfg.obj_crf_iterations,
        crf_gauss_compat=cfg.obj_crf_smooth,
        crf_bilateral_sxy=max(1.0, cfg.obj_crf_sxy * size),
        crf_bilateral_srgb=cfg.obj_crf_srgb,
        crf_bilateral_compat=cfg.obj_crf_compat,
    )
    estimate = prior
    for _ in range(cfg.obj_rounds):
        fg = np.zeros_like(prior)
        fg[in_box] = prior[in_box] * colour_likelihood(index[in_box], estimate[in_box], bins)
        bg = (1.0 - prior) * colour_likelihood(index, 1.0 - estimate, bins)
        posterior = np.where(in_box, fg / np.maximum(fg + bg, 1e-12), 0.0)
        estimate = np.where(in_box, dense_crf(image, posterior, crf_cfg), 0.0)
    return (estimate > 0.5) & in_box


def _object_masks(
    image: np.ndarray,
    norm: np.ndarray,
    sl: tuple[slice, slice],
    region: np.ndarray,
    cfg: RefineConfig,
) -> tuple[np.ndarray, np.ndarray, str]:
    """object mode -> (fg, not_bg, fallback); lengths scale with the box, not the image."""
    height, width = norm.shape
    box_area = int(region.sum())
    if box_area == 0:
        return np.zeros_like(region), np.zeros_like(region), "none"
    crop = object_crop(sl, height, width, cfg)
    inner = (
        slice(sl[0].start - crop[0].start, sl[0].stop - crop[0].start),
        slice(sl[1].start - crop[1].start, sl[1].stop - crop[1].start),
    )
    empty = float(norm[sl].max(initial=0.0)) <= 0.0
    m = object_blur(norm, sl, cfg) if not empty else norm
    mc = m[crop]
    in_box = np.zeros(mc.shape, dtype=bool)
    in_box[inner] = True
    fallback = "none"
    if empty:  # no map: GrabCut from the box alone, the filled box when that fails or is small
        fallback = "empty_map"
        seeds = np.where(in_box, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
        cut = seeded_grabcut(image[crop], seeds, cfg.obj_iterations)
        if cut is None or (cut & in_box).sum() <= cfg.empty_accept_frac * box_area:
            cut = in_box
    elif cfg.obj_cut == "grabcut":
        seeds = np.full(mc.shape, cv2.GC_BGD, dtype=np.uint8)
        seeds[in_box] = cv2.GC_PR_BGD
        seeds[in_box & (mc >= cfg.obj_fg)] = cv2.GC_PR_FGD
        seeds[in_box & (mc >= cfg.obj_sure_fg)] = cv2.GC_FGD
        cut = seeded_grabcut(image[crop], seeds, cfg.obj_iterations)
        if cut is None:
            cut = in_box & (mc >= cfg.obj_fg)
            fallback = "grabcut_failed"
    elif cfg.obj_cut == "colour_crf":
        cut = colour_crf_cut(image[crop], mc, in_box, math.sqrt(box_area), cfg)
    else:
        crf_cfg = replace(cfg, crf_bilateral_sxy=max(1.0, cfg.obj_crf_sxy * math.sqrt(box_area)))
        cut = dense_crf(image[crop], band_prior(mc, cfg), crf_cfg) > 0.5
    fg = np.zeros_like(region)
    fg[crop] = cut & in_box
    not_bg = fg | ((m >= cfg.obj_not_bg) & region) if not empty else region.copy()
    return fg, not_bg, fallback


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
    elif cfg.mode == "object":
        fg, not_bg, fallback = _object_masks(image, norm, sl, region, cfg)
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
