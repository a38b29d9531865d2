import math

import numpy as np
import pytest
import torch

from bbam.data.masks import box_slices
from bbam.refine import (
    RefineConfig,
    blur_kernel_k,
    colour_likelihood,
    dense_crf,
    map_prior,
    normalise_in_box,
    rank_rescale,
    refine_instance,
)

torch.set_num_threads(1)


def _edge_image(h=64, w=64, edge=30, seed=0):
    """Red left of `edge`, blue right of it, a little noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.int64)
    img[:] = (40, 60, 200)
    img[:, :edge] = (210, 40, 40)
    img += rng.integers(-5, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sigmoid_map(h, w, centre, width):
    x = np.arange(w, dtype=np.float64)
    row = 1.0 / (1.0 + np.exp((x - centre) / width))
    return np.tile(row, (h, 1)).astype(np.float32)


def test_rank_rule_saturates_top_fraction():
    h, w = 20, 30
    box = np.array([5.0, 2.0, 25.0, 12.0])
    sl = box_slices(box, h, w)
    rng = np.random.default_rng(1)
    heat = np.zeros((h, w), dtype=np.float32)
    heat[sl] = rng.permutation(np.arange(1, 201)).reshape(10, 20) / 200.0
    norm = normalise_in_box(heat, sl)
    for th in (0.85, 0.2):
        out = rank_rescale(norm, sl, th)
        expected_ones = math.floor(200 * (1 - th)) + 1
        assert int((out[sl] >= 1.0 - 1e-6).sum()) == expected_ones
        assert out.max() <= 1.0 and out.min() >= 0.0
        # below the rank value the map is a plain rescale
        below = norm[sl] < np.sort(norm[sl].ravel())[::-1][math.floor(200 * (1 - th))]
        ratio = out[sl][below] / norm[sl][below]
        assert np.allclose(ratio, ratio[0], rtol=1e-4)


def test_normalise_zeroes_outside_box_and_divides_by_max():
    heat = np.full((10, 10), 0.5, dtype=np.float32)
    heat[2:5, 2:5] = np.linspace(0.2, 0.4, 9).reshape(3, 3)
    sl = box_slices(np.array([2.0, 2.0, 5.0, 5.0]), 10, 10)
    out = normalise_in_box(heat, sl)
    assert out[0, 0] == 0 and out[9, 9] == 0
    assert np.isclose(out[4, 4], 1.0)
    assert np.isclose(out[2, 2], 0.2 / 0.4)


def test_blur_kernel_formula():
    cfg = RefineConfig()
    assert blur_kernel_k(100 * 50, 200, 300, cfg) == int(16 + 48 * math.sqrt(5000 / 60000))
    assert blur_kernel_k(0, 200, 300, cfg) == 16
    scaled = RefineConfig(blur_reference_size=400.0)
    assert blur_kernel_k(0, 200, 300, scaled) == 8  # half the reference's short side


def test_absolute_mode_thresholds_and_ignore_band():
    h, w = 40, 60
    heat = np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
    box = np.array([10.0, 5.0, 50.0, 35.0])
    image = _edge_image(h, w)
    cfg = RefineConfig(mode="absolute", abs_fg=0.8, abs_bg=0.2)
    out = refine_instance(heat, box, image, cfg)
    sl = box_slices(box, h, w)
    norm = normalise_in_box(heat, sl)
    inside = np.zeros((h, w), bool)
    inside[sl] = True
    assert np.array_equal(out.fg, (norm >= 0.8) & inside)
    assert np.array_equal(out.not_bg, (norm >= 0.2) & inside)
    assert np.array_equal(out.ignore, (norm >= 0.2) & (norm < 0.8) & inside)
    assert not (out.fg & out.ignore).any()
    assert out.stats["ignore_area"] == int(out.ignore.sum()) > 0
    assert out.stats["fg_area"] == int(out.fg.sum()) > 0
    assert out.stats["box_area"] == 40 * 30


def test_reference_mode_ignore_band_between_th_fg_and_th_bg():
    h, w = 64, 64
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    heat = _sigmoid_map(h, w, centre=32, width=8)
    cfg = RefineConfig(blur=False, crf=False, crf_cut=0.9)
    out = refine_instance(heat, np.array([0.0, 0.0, 64.0, 64.0]), image, cfg)
    # th_fg = 0.85 saturates ~15% of the box, th_bg = 0.2 ~80%
    assert 0.1 < out.fg.mean() < 0.3
    assert 0.6 < out.not_bg.mean() < 0.95
    assert out.ignore.sum() == out.not_bg.sum() - out.fg.sum()
    assert not (out.fg & ~out.not_bg).any()


def test_dense_crf_snaps_to_colour_edge():
    h, w, edge = 48, 64, 30
    image = _edge_image(h, w, edge)
    blurry = _sigmoid_map(h, w, centre=36, width=6)  # the map's own 0.5 contour is at x = 36
    q = dense_crf(image, blurry, RefineConfig())
    cols = np.flatnonzero(q[h // 2] > 0.5)
    assert cols.size and abs(int(cols.max()) + 1 - edge) <= 2
    assert abs(int(np.flatnonzero(blurry[h // 2] > 0.5).max()) + 1 - edge) > 2


@pytest.mark.parametrize("on_crop", [True, False])
def test_reference_fg_boundary_at_colour_edge(on_crop):
    h, w, edge = 64, 64, 30
    image = _edge_image(h, w, edge)
    heat = _sigmoid_map(h, w, centre=34, width=5)
    box = np.array([4.0, 4.0, 60.0, 60.0])
    cfg = RefineConfig(blur=False, crf_on_crop=on_crop, crf_margin=8)
    out = refine_instance(heat, box, image, cfg)
    for row in (10, 32, 55):
        cols = np.flatnonzero(out.fg[row])
        assert cols.size and abs(int(cols.max()) + 1 - edge) <= 2
    assert not out.fg[:, :4].any() and not out.fg[:4].any()  # clipped to the box
    assert out.stats["fallback"] == "none"


def test_small_mask_fallback_fills_box():
    h, w = 128, 128
    image = np.full((h, w, 3), 100, dtype=np.uint8)
    image[40:80, 40:80] = (220, 50, 50)  # object = the whole box
    box = np.array([40.0, 40.0, 80.0, 80.0])  # 1600 px <= 1/10 of the image
    heat = np.zeros((h, w), dtype=np.float32)
    heat[58:60, 58:60] = 1.0  # tiny attribution blob
    cfg = RefineConfig(blur=False)
    out = refine_instance(heat, box, image, cfg)
    assert out.stats["fallback"] == "small_mask"
    assert out.fg.sum() > 1600 / 3
    assert out.stats["fallback_passed"]
    # the same blob in a box larger than 1/10 of the image: no fallback
    big = refine_instance(heat, np.array([10.0, 10.0, 110.0, 110.0]), image, cfg)
    assert big.stats["fallback"] == "none"
    # switched off: no fallback either
    off = refine_instance(heat, box, image, RefineConfig(blur=False, small_fallback=False))
    assert off.stats["fallback"] == "none" and off.fg.sum() <= 1600 / 5


def test_empty_map_fallback_keeps_instance():
    h, w = 64, 64
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    image[16:48, 16:48] = (30, 200, 30)
    box = np.array([16.0, 16.0, 48.0, 48.0])
    for heat in (None, np.zeros((h, w), np.float32)):
        out = refine_instance(heat, box, image, RefineConfig())
        assert out.stats["fallback"] == "empty_map"
        assert out.fg.sum() > 32 * 32 / 5
        assert not out.fg[:16].any()
    # nothing can pass: still a mask (last result or the box), flagged as not passed
    strict = refine_instance(None, box, image, RefineConfig(empty_accept_frac=1.5))
    assert strict.fg.any() and strict.stats["fallback_passed"] is False
    filled = refine_instance(None, box, image, RefineConfig(empty_final="box"))
    assert filled.fg.sum() == 32 * 32


def test_config_validation():
    with pytest.raises(TypeError):
        RefineConfig(**{"th_fg": 0.85, "bogus": 1})
    with pytest.raises(ValueError):
        RefineConfig(mode="paper")
    with pytest.raises(ValueError):
        RefineConfig(th_fg=1.5)
    assert RefineConfig(small_priors=[0.5, 0.6]).small_priors == (0.5, 0.6)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"th_fg": 0.2, "th_bg": 0.85}, "needs th_bg <= th_fg"),
        ({"abs_fg": 0.2, "abs_bg": 0.8}, "needs abs_bg <= abs_fg"),
        ({"blur_base": math.nan}, "blur_base must be a finite number"),
        ({"crf_bilateral_sxy": math.inf}, "crf_bilateral_sxy must be a finite number"),
    ],
)
def test_swapped_thresholds_and_non_finite_knobs_are_refused(bad, message):
    """Swapped, the not-background cut (which must contain fg) equals fg: no ignore band and
    no error. Equal thresholds (no band, asked for) stay allowed."""
    with pytest.raises(ValueError, match=message):
        RefineConfig(**bad)
    assert RefineConfig(th_fg=0.5, th_bg=0.5, abs_fg=0.4, abs_bg=0.4).th_bg == 0.5


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        refine_instance(
            np.zeros((10, 10), np.float32),
            np.array([0, 0, 5, 5.0]),
            np.zeros((12, 10, 3), np.uint8),
        )


COLOUR_CRF = RefineConfig(mode="object", obj_cut="colour_crf", obj_margin=0.5)


def _disc_scene(h=96, w=96, seed=0):
    """A red disc (radius 20) on a two-tone textured background, its box, its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.where(((xx // 6 + yy // 6) % 2)[..., None] == 0, (40, 150, 60), (70, 90, 170))
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 <= 20**2
    img = np.where(disc[..., None], (200, 50, 40), img) + rng.integers(-8, 9, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), np.array([28.0, 28.0, 69.0, 69.0]), disc


def test_map_prior_and_colour_likelihood():
    """The prior is never 0 or 1 (colours may overrule it) and passes 0.5 at obj_fg; the colour
    likelihood is a distribution over colours that favours the colours it was given."""
    cfg = RefineConfig(obj_fg=0.25, obj_prior_lo=0.2, obj_prior_hi=0.99)
    prior = map_prior(np.array([0.0, 0.125, 0.25, 1.0, 2.0]), cfg)
    assert np.allclose(prior, [0.2, 0.35, 0.5, 0.99, 0.99])
    bins = 4
    index = np.array([0, 0, 0, 63])
    per_pixel = colour_likelihood(index, np.array([1.0, 1.0, 1.0, 0.0]), bins)
    assert per_pixel[0] > 10 * per_pixel[3] > 0
    everywhere = colour_likelihood(np.arange(bins**3), np.eye(1, bins**3, 0).ravel(), bins)
    assert everywhere.sum() == pytest.approx(1.0)
    for bad in ({"obj_prior_lo": 0.0}, {"obj_prior_hi": 1.0}, {"obj_prior_lo": 0.6},
                {"obj_colour_bins": 1}, {"obj_rounds": 0}, {"obj_crf_iterations": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            RefineConfig(**bad)


def test_colour_crf_overrules_a_map_that_traces_the_outline():
    """A map strong on a band across the disc's outline (inside and out) and weak at its centre,
    as BBAM gives for objects recognised by their shape: thresholding it gives a ring, GrabCut
    seeded with its top band as definite foreground keeps the outside half of the band, and
    colour_crf, whose prior the colours may overrule, returns the disc."""
    img, box, disc = _disc_scene()
    yy, xx = np.mgrid[:96, :96]
    radius = np.hypot(yy - 48, xx - 48)
    heat = np.exp(-(((radius - 20) / 5) ** 2)).astype(np.float32)
    iou = lambda a: (a & disc).sum() / (a | disc).sum()  # noqa: E731
    sl = box_slices(box, 96, 96)
    thresholded = np.zeros_like(disc)
    thresholded[sl] = normalise_in_box(heat, sl)[sl] >= 0.5
    colour = refine_instance(heat, box, img, COLOUR_CRF)
    grabcut = refine_instance(heat, box, img, RefineConfig(mode="object", obj_cut="grabcut"))
    assert colour.stats["fallback"] == "none"
    assert iou(colour.fg) >= 0.9, iou(colour.fg)
    assert iou(colour.fg) > iou(grabcut.fg) + 0.05 and iou(thresholded) < 0.6
    # the right map comes back as it is
    assert iou(refine_instance(disc.astype(np.float32), box, img, COLOUR_CRF).fg) >= 0.95
