"""Tests of the BBAM engine on a hand-built toy detector (no training needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.builders import SIZE, SMALL, four_items

from bbam.attribution import (
    AttributionConfig,
    AttributionItem,
    attribute_instances,
    box_union_grid,
    grid_shape,
    map_to_image,
    mask_stride,
    profile_config,
    tv_norm,
)
from bbam.jitter import instance_generator, jitter_boxes, select_positives
from bbam.toy_detector import ToyDetector, toy_scene

torch.set_num_threads(1)

# Small images need small strides; fewer iterations keep the tests fast.


@pytest.fixture(scope="module")
def detector() -> ToyDetector:
    return ToyDetector().eval()


@pytest.fixture(scope="module")
def scene():
    img, boxes, masks = toy_scene(SIZE, [(44, 50, 18, 1)])
    return img, boxes[0], masks[0].numpy()


def _iou(result, region: np.ndarray) -> float:
    m = map_to_image(result.grid, result.resized_hw, result.resized_hw) > 0.5
    return float((m & region).sum() / max((m | region).sum(), 1))


@pytest.mark.parametrize("profile", ["fast", "reference"])
def test_recovers_textured_region(detector, scene, profile):
    img, box, region = scene
    cfg = profile_config(profile, **SMALL)
    (res,) = attribute_instances(detector, [AttributionItem("a", img, box, 1)], cfg, "cpu")
    assert res.status == "ok"
    assert res.grid.dtype == np.float16
    assert res.grid.shape == grid_shape(SIZE, res.stride, cfg.grid_rounding)
    assert res.stats["positives"] > 0 and res.stats["threshold_used"] in cfg.iou_thresholds
    assert _iou(res, region) >= 0.8
    # the whole box would not do: the disk covers ~pi/4 of it
    box_mask = np.zeros(SIZE, bool)
    x1, y1, x2, y2 = box.int().tolist()
    box_mask[y1:y2, x1:x2] = True
    assert (box_mask & region).sum() / (box_mask | region).sum() < 0.8


def test_gradients_reach_only_the_mask(scene):
    det = ToyDetector()
    assert all(p.requires_grad for p in det.parameters())
    img, box, _ = scene
    img = img.clone().requires_grad_(True)
    seen = []

    def heads(images, proposals):
        seen.append(images.requires_grad)
        return det(images, proposals)

    cfg = profile_config("fast", **{**SMALL, "iterations": 5, "early_stop": False})
    (res,) = attribute_instances(heads, [AttributionItem("a", img, box, 1)], cfg, "cpu")
    assert res.stats["iterations"] == 5
    assert all(p.grad is None for p in det.parameters())
    assert img.grad is None
    assert seen[0] is False and all(seen[1:])  # reference pass no-grad, masked passes grad


def test_seeded_runs_are_deterministic(detector, scene):
    img, box, _ = scene
    cfg = profile_config("fast", **{**SMALL, "iterations": 40})
    items = [AttributionItem("a", img, box, 1)]
    a = attribute_instances(detector, items, cfg, "cpu")[0]
    b = attribute_instances(detector, items, cfg, "cpu")[0]
    assert np.array_equal(a.grid, b.grid)
    c = attribute_instances(detector, items, dataclasses.replace(cfg, seed=1), "cpu")[0]
    assert a.stats["positives"] != c.stats["positives"] or not np.array_equal(a.grid, c.grid)


def test_batched_matches_one_at_a_time(detector):
    items = four_items()
    base = profile_config("fast", **{**SMALL, "iterations": 60})
    batched = attribute_instances(detector, items, dataclasses.replace(base, batch_size=4), "cpu")
    single = attribute_instances(detector, items, dataclasses.replace(base, batch_size=1), "cpu")
    assert [r.key for r in batched] == [it.key for it in items]
    for b, s in zip(batched, single, strict=True):
        assert b.status == s.status == "ok"
        assert b.stats["positives"] == s.stats["positives"]
        np.testing.assert_allclose(b.grid.astype(np.float32), s.grid.astype(np.float32), atol=1e-2)


def test_a_batch_holds_boxes_of_like_size(detector):
    """Largest boxes first, so a pyramid detector's batch pools from the same levels; the
    results keep the items' order."""
    items = four_items()  # box sides 28, 32, 40, 20 px
    widths = []

    def heads(images, proposals):
        if images.requires_grad:  # a masked pass: the mean proposal width of each instance
            widths.append(sorted(float((p[:, 2] - p[:, 0]).mean()) for p in proposals))
        return detector(images, proposals)

    cfg = profile_config("fast", **{**SMALL, "iterations": 2, "batch_size": 2})
    results = attribute_instances(heads, items, cfg, "cpu")
    assert [r.key for r in results] == [it.key for it in items]
    assert len(widths) == 4 and all(len(w) == 2 for w in widths)
    assert min(widths[0]) > 34 and max(widths[-1]) < 34  # {40, 32} first, then {28, 20}


@pytest.mark.parametrize("switch", ["use_box_head", "use_cls_head"])
def test_each_head_alone(detector, scene, switch):
    img, box, region = scene
    # The cls term alone is bounded (|dp| < 1) and the toy's probability saturates, so the
    # default sum-L1 (0.007 per cell) would win everywhere; a weaker L1 keeps the test about
    # the switch, not about the balance of the two terms.
    l1 = 0.001 if switch == "use_box_head" else 0.007
    cfg = profile_config("fast", **{**SMALL, switch: False, "l1_weight": l1})
    (res,) = attribute_instances(detector, [AttributionItem("a", img, box, 1)], cfg, "cpu")
    off = "loss_box" if switch == "use_box_head" else "loss_cls"
    on = "loss_cls" if switch == "use_box_head" else "loss_box"
    assert res.stats[off] == 0.0
    assert res.stats[on] > 0.0
    assert _iou(res, region) >= 0.7


def test_no_positive_is_reported(detector, scene):
    img, box, _ = scene
    items = [
        AttributionItem("wrong_class", img, box, 2),
        AttributionItem("empty", img, torch.tensor([2.0, 2.0, 22.0, 22.0]), 1),
        AttributionItem("good", img, box, 1),
    ]
    cfg = profile_config("fast", **{**SMALL, "iterations": 5, "batch_size": 3})
    res = attribute_instances(detector, items, cfg, "cpu")
    for r in res[:2]:
        assert r.status == "no_positive"
        assert r.stats["positives"] == 0 and r.stats["threshold_used"] is None
        assert r.grid.shape == grid_shape(SIZE, r.stride, cfg.grid_rounding)
        assert not r.grid.any()
    assert res[2].status == "ok" and res[2].grid.any()


def test_config_profiles_and_validation():
    ref = profile_config("reference")
    assert (ref.num_jitters, ref.max_positives, ref.iterations, ref.batch_size) == (
        1000,
        100,
        300,
        1,
    )
    assert ref.positives_per_iter == 0 and not ref.early_stop
    assert (ref.lr, ref.l1_weight, ref.tv_weight) == (0.02, 0.007, 1e-4)
    assert profile_config("fast") == AttributionConfig()
    cfg = AttributionConfig(**{"iou_thresholds": [0.9, 0.8], "stride_coefs": [8, 16]})
    assert cfg.iou_thresholds == (0.9, 0.8) and cfg.stride_coefs == (8.0, 16.0)
    with pytest.raises(TypeError):
        AttributionConfig(**{"no_such_key": 1})
    with pytest.raises(ValueError):
        AttributionConfig(param="tanh")
    with pytest.raises(ValueError):
        profile_config("nope")


def test_tv_weight_zero_and_l1_mean(detector, scene):
    img, box, _ = scene
    cfg = profile_config(
        "fast", **{**SMALL, "iterations": 3, "tv_weight": 0.0, "l1_reduction": "mean"}
    )
    (res,) = attribute_instances(detector, [AttributionItem("a", img, box, 1)], cfg, "cpu")
    assert res.stats["loss_tv"] == 0.0
    assert 0.0 < res.stats["loss_l1"] <= 1.0


def test_sigmoid_param_and_constant_init(detector, scene):
    img, box, region = scene
    cfg = profile_config("fast", **{**SMALL, "param": "sigmoid", "init": "constant", "lr": 0.1})
    (res,) = attribute_instances(detector, [AttributionItem("a", img, box, 1)], cfg, "cpu")
    assert res.status == "ok"
    assert _iou(res, region) >= 0.6


def test_tv_norm_counts_diagonals_twice():
    g = torch.zeros(2, 2)
    g[0, 0] = 1.0
    # one vertical, one horizontal and one main-diagonal difference of 1
    assert float(tv_norm(g, 3.0)) == pytest.approx(1 + 1 + 2 * 1)


def test_stride_grid_and_box_union():
    s = mask_stride(torch.tensor([0.0, 0.0, 50.0, 50.0]), (100, 100), (16.0, 48.0))
    assert s == pytest.approx(16 + 48 * 0.5)
    assert grid_shape((100, 130), s, "floor") == (2, 3)
    assert grid_shape((100, 130), s, "ceil") == (3, 4)
    g = box_union_grid(torch.tensor([[0.0, 0.0, 9.9, 4.0], [12.0, 12.0, 20.0, 20.0]]), (6, 6), 4.0)
    assert g[0, :2].tolist() == [1, 1] and g[0, 2] == 0 and g[1].sum() == 0
    assert g[3:5, 3:5].all() and g.sum() == 2 + 4


def test_jitter_and_positive_cascade():
    box = torch.tensor([10.0, 20.0, 50.0, 40.0])
    j1 = jitter_boxes(box, 500, 0.3, (60, 55), instance_generator(0, "k"))
    j2 = jitter_boxes(box, 500, 0.3, (60, 55), instance_generator(0, "k"))
    assert torch.equal(j1, j2)
    assert (j1[:, 0::2] >= 0).all() and (j1[:, 0::2] <= 55).all() and (j1[:, 3] <= 60).all()
    assert ((j1 - box).abs() <= torch.tensor([12.0, 6.0, 12.0, 6.0]) + 1e-4).all()
    assert not torch.equal(j1, jitter_boxes(box, 500, 0.3, (60, 55), instance_generator(0, "x")))

    def setup(n_hi, n_mid):
        n = n_hi + n_mid + 5
        logits = torch.zeros(n, 3)
        logits[:, 1] = 1.0
        logits[-5:, 0] = 2.0  # misclassified as background
        dec = box.repeat(n, 3, 1)
        dec[n_hi : n_hi + n_mid, 1, 2] = 46.0  # IoU 0.9 -> fails 0.9/0.85? (36/40)=0.9
        return logits, dec

    logits, dec = setup(150, 20)
    idx, thr = select_positives(logits, dec, 1, box, (0.9, 0.85, 0.8), 100)
    assert thr == 0.9 and idx.tolist() == list(range(100))
    logits, dec = setup(50, 30)
    idx, thr = select_positives(logits, dec, 1, box, (0.9, 0.85, 0.8), 100)
    assert thr == 0.8 and idx.tolist() == list(range(80))
    idx, thr = select_positives(logits, dec, 2, box, (0.9, 0.85, 0.8), 100)
    assert thr is None and idx.numel() == 0


def test_map_to_image_sizes():
    grid = np.zeros((4, 5), np.float16)
    grid[1:3, 1:4] = 1
    m = map_to_image(grid, (40, 50), (30, 35))
    assert m.shape == (30, 35) and m.dtype == np.float32
    assert 0.0 <= m.min() and m.max() <= 1.0 and m[15, 17] > 0.9 and m[0, 0] < 0.01


def test_valid_hw_crops_padding(detector, scene):
    img, box, _ = scene
    padded = torch.zeros(3, 128, 112)
    padded[:, :96, :96] = img
    cfg = profile_config("fast", **{**SMALL, "iterations": 3})
    items = [AttributionItem("p", padded, box, 1, valid_hw=(96, 96))]
    (res,) = attribute_instances(detector, items, cfg, "cpu")
    assert res.resized_hw == (128, 112) and res.valid_hw == (96, 96)
    assert res.stride == pytest.approx(mask_stride(box, (96, 96), cfg.stride_coefs))
    full = map_to_image(res.grid, res.resized_hw, res.resized_hw)
    m = map_to_image(res.grid, res.resized_hw, (96, 96), valid_hw=res.valid_hw)
    np.testing.assert_allclose(m, full[:96, :96], atol=1e-6)
    with pytest.raises(ValueError):
        attribute_instances(detector, [AttributionItem("q", img, box, 1, (97, 96))], cfg, "cpu")


def test_crop_window_matches_full_image(detector, scene):
    img, box, _ = scene
    items = [AttributionItem("a", img, box, 1)]
    crop = profile_config(
        "fast",
        **{**SMALL, "iterations": 60, "early_stop": False, "crop_context": 0.5, "crop_align": 8},
    )
    full = dataclasses.replace(crop, crop_context=0.0)
    seen = []

    def heads(images, proposals):
        seen.append(tuple(images.shape[-2:]))
        return detector(images, proposals)

    a = attribute_instances(heads, items, crop, "cpu")[0]
    assert min(h * w for h, w in seen[1:]) < SIZE[0] * SIZE[1]  # masked passes were cropped
    b = attribute_instances(detector, items, full, "cpu")[0]
    ma = map_to_image(a.grid, a.resized_hw, a.resized_hw) > 0.5
    mb = map_to_image(b.grid, b.resized_hw, b.resized_hw) > 0.5
    assert (ma & mb).sum() / (ma | mb).sum() >= 0.9


def test_stride_scales_with_image_size_when_asked():
    box = torch.tensor([0.0, 0.0, 50.0, 50.0])
    raw = mask_stride(box, (100, 100), (16.0, 48.0))
    assert mask_stride(box, (100, 100), (16.0, 48.0), reference_size=800.0) == pytest.approx(
        raw * 100 / 800
    )
    big = torch.tensor([0.0, 0.0, 400.0, 400.0])
    assert mask_stride(big, (800, 800), (16.0, 48.0), 800.0) == pytest.approx(raw)
    assert profile_config("reference").stride_reference_size == 0.0  # raw pixels


def test_profile_fields_name_what_the_reference_fixes():
    from bbam.attribution import profile_fields

    fields = profile_fields("reference")
    assert {"iterations", "num_jitters", "positives_per_iter", "early_stop"} <= fields
    assert "stride_reference_size" not in fields
    with pytest.raises(ValueError, match="unknown attribution profile"):
        profile_fields("nope")


def test_fast_draws_the_same_proposals_as_reference(detector, scene):
    """With one seed both profiles see the same jitters, hence the same positives (lr 0 keeps
    the grid at its init, the union of the positives' regressed boxes)."""
    img, box, _ = scene
    item = AttributionItem("a", img, box, 1)
    frozen = {"stride_coefs": (2.0, 6.0), "iterations": 1, "lr": 0.0, "early_stop": False}
    fast = profile_config("fast", **frozen)
    reference = profile_config("reference", **frozen)
    assert fast.num_jitters == reference.num_jitters
    (a,) = attribute_instances(detector, [item], fast, "cpu")
    (b,) = attribute_instances(detector, [item], reference, "cpu")
    assert a.stats["positives"] == b.stats["positives"] > 0
    assert a.stats["threshold_used"] == b.stats["threshold_used"]
    np.testing.assert_array_equal(a.grid, b.grid)


def test_blurred_baseline_scales_with_the_image():
    from bbam.attribution import blurred_baseline

    flat = torch.full((3, 40, 60), 0.7)
    torch.testing.assert_close(blurred_baseline(flat, 0.1), flat)  # a constant stays itself
    edge = torch.zeros(3, 40, 60)
    edge[:, :, 30:] = 1.0
    soft = blurred_baseline(edge, 0.1)
    assert soft.shape == edge.shape
    assert 0.4 < float(soft[0, 20, 30]) < 0.7 and float(soft[0, 20, 26]) > 0.0
    # twice the image at the same fraction: the same profile at twice the length
    big = blurred_baseline(edge.repeat_interleave(2, 1).repeat_interleave(2, 2), 0.1)
    np.testing.assert_allclose(big[0, 40, ::2].numpy(), soft[0, 20].numpy(), atol=0.05)


def test_blur_baseline_fills_the_masked_out_pixels(detector, scene):
    """With baseline "blur" a pixel the mask drops shows the blurred image, not the mean."""
    from bbam.attribution import blurred_baseline

    img, box, _ = scene
    seen = []

    def heads(images, proposals):
        seen.append(images.detach().clone())
        return detector(images, proposals)

    cfg = profile_config(
        "fast", **{**SMALL, "iterations": 1, "early_stop": False, "baseline": "blur"}
    )
    (res,) = attribute_instances(heads, [AttributionItem("a", img, box, 1)], cfg, "cpu")
    assert res.status == "ok"
    masked = seen[1][0]
    blurred = blurred_baseline(img, cfg.baseline_blur)
    corner = (slice(None), slice(0, 4), slice(0, 4))  # far from the box: mask 0 at init
    torch.testing.assert_close(masked[corner], blurred[corner])
    assert not torch.allclose(masked[corner], torch.zeros_like(masked[corner]))
    assert profile_config("reference").baseline == "mean"
    with pytest.raises(ValueError, match="baseline"):
        AttributionConfig(baseline="noise")
    with pytest.raises(ValueError, match="baseline_blur"):
        AttributionConfig(baseline="blur", baseline_blur=0.0)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    ("grid_hw", "size"), [((5, 7), (64, 96)), ((1, 3), (9, 20)), ((8, 8), (8, 8))]
)
def test_upsample_grid_is_bilinear_interpolation(grid_hw, size, align_corners):
    from bbam.attribution import upsample_grid

    grid = torch.rand(grid_hw, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = torch.rand(size, generator=torch.Generator().manual_seed(1))
    ours = upsample_grid(grid, size, align_corners)
    (g_ours,) = torch.autograd.grad((ours * weight).sum(), grid)
    theirs = F.interpolate(
        grid[None, None], size=size, mode="bilinear", align_corners=align_corners
    )[0, 0]
    (g_theirs,) = torch.autograd.grad((theirs * weight).sum(), grid)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)


def test_reference_turns_tf32_off_on_cuda_and_restores_the_flags():
    """TF32 would run `reference`'s fp32 convolutions at a 10-bit mantissa on Ampere+ GPUs."""
    from bbam.attribution import _backend_flags

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    matmul.allow_tf32 = True
    try:
        with cudnn.flags(enabled=cudnn.enabled, allow_tf32=True):
            with _backend_flags(profile_config("reference"), torch.device("cuda")):
                assert not cudnn.allow_tf32 and not matmul.allow_tf32
            assert cudnn.allow_tf32 and matmul.allow_tf32
            with _backend_flags(profile_config("fast"), torch.device("cuda")):
                assert cudnn.allow_tf32 and matmul.allow_tf32
            with _backend_flags(profile_config("reference"), torch.device("cpu")):
                assert cudnn.allow_tf32 and matmul.allow_tf32  # nothing to change on CPU
    finally:
        matmul.allow_tf32 = before[1]
    assert cudnn.allow_tf32 == before[0]
