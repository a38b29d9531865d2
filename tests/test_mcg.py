import numpy as np
import pytest
import scipy.io
import torch

from bbam.data.records import DataError
from bbam.mcg import (
    MCGConfig,
    MCGMatSource,
    SuperpixelSource,
    apply_proposals,
    refine_each_with_proposals,
    refine_with_proposals,
)
from bbam.refine import InstanceMasks

torch.set_num_threads(1)

# 40x40 image, 10x10 grid of 4x4-px superpixels with MCG-style 1-based ids r*10+c+1.
H = W = 40
SP = (np.arange(H)[:, None] // 4) * 10 + (np.arange(W)[None, :] // 4) + 1
BOX = np.array([8.0, 8.0, 30.0, 30.0])  # block rows/cols 2..6 inside, row/col 7 straddles


def blocks(rows, cols):
    return np.array([r * 10 + c + 1 for r in rows for c in cols])


def block_mask(ids):
    return np.isin(SP, ids)


FG_IDS = np.concatenate([blocks(range(3, 6), range(3, 7)), blocks([2], [3])])  # 13 blocks
PROPOSALS = {
    "P0_outside": np.concatenate([FG_IDS, blocks([0], [0])]),  # best IoU but has an outside sp
    "P2_best": blocks(range(3, 7), range(3, 7)),
    "P3_box": blocks(range(2, 8), range(2, 8)),
    "P6_straddle": blocks(range(3, 6), range(3, 8)),  # IoU 0.75 but only 90% inside the box
    "P7_extra": blocks([2], [3]),
    "P8_half": blocks(range(5, 7), range(5, 7)),
}
CFG = MCGConfig(min_box_area=0)


def test_union_rule_with_known_proposals():
    fg = block_mask(FG_IDS)
    result = refine_with_proposals(fg, BOX, SP, list(PROPOSALS.values()), CFG)
    assert result.reason == "used"
    expected = block_mask(np.concatenate([PROPOSALS["P2_best"], PROPOSALS["P7_extra"]]))
    assert np.array_equal(result.mask, expected)
    assert result.best_iou == pytest.approx(12 / 17)
    assert result.n_extra == 1


def test_extras_are_cropped_to_box():
    fg = block_mask(blocks(range(3, 6), range(3, 8)))  # reaches into the straddling column
    props = [blocks(range(3, 6), range(3, 7)), blocks([4], [7])]
    result = refine_with_proposals(fg, BOX, SP, props, CFG)
    assert result.reason == "used"
    assert result.mask[17, 29] and not result.mask[17, 30]
    assert not result.mask[:, 30:].any()


def test_pixel_counts_differ_from_reference_coordinate_sums():
    fg = block_mask(FG_IDS)
    props = [PROPOSALS["P2_best"], PROPOSALS["P3_box"]]
    counts = refine_with_proposals(fg, BOX, SP, props, CFG)
    coords = refine_with_proposals(
        fg, BOX, SP, props, MCGConfig(min_box_area=0, count="coordinate_sum")
    )
    prop = block_mask(PROPOSALS["P2_best"])
    true_iou = (prop & fg).sum() / (prop | fg).sum()
    ref_iou = np.sum(np.where(prop & fg)) / np.sum(np.where(prop | fg))  # the reference's formula
    assert counts.best_iou == pytest.approx(true_iou)
    assert coords.best_iou == pytest.approx(ref_iou)
    assert abs(true_iou - ref_iou) > 1e-3


def test_skips_small_box_empty_fg_and_missing_candidates():
    fg = block_mask(FG_IDS)
    assert refine_with_proposals(fg, BOX, SP, list(PROPOSALS.values())).reason == "small_box"
    empty = np.zeros_like(fg)
    assert refine_with_proposals(empty, BOX, SP, list(PROPOSALS.values()), CFG).reason == "empty_fg"
    only_outside = [PROPOSALS["P0_outside"]]
    assert refine_with_proposals(fg, BOX, SP, only_outside, CFG).mask is None


def test_apply_proposals_updates_masks_and_stats():
    fg = block_mask(FG_IDS)
    not_bg = block_mask(blocks(range(2, 6), range(2, 7)))
    masks = InstanceMasks(fg, not_bg, not_bg & ~fg, {"fg_area": int(fg.sum()), "mcg_used": False})
    out = apply_proposals(masks, BOX, (SP, list(PROPOSALS.values())), CFG)
    assert out.stats["mcg_used"] is True
    assert out.stats["mcg_not_bg_reason"] == "used"
    # not_bg gets its own best proposal (P2, IoU 0.5 with it) plus the one inside it (P7),
    # then the refined fg, as the reference's 0.2 mask does: not the old not_bg grown by fg.
    region = np.zeros((H, W), dtype=bool)
    region[8:30, 8:30] = True
    own = block_mask(np.concatenate([PROPOSALS["P2_best"], PROPOSALS["P7_extra"]])) & region
    assert np.array_equal(out.not_bg, own | out.fg)
    assert not np.array_equal(out.not_bg, not_bg | out.fg)
    assert np.array_equal(out.ignore, out.not_bg & ~out.fg)
    assert out.stats["fg_area"] == int(out.fg.sum())
    assert out.stats["not_bg_area"] == int(out.not_bg.sum())
    skipped = apply_proposals(masks, BOX, None, CFG)
    assert skipped.stats["mcg_used"] is False and skipped.stats["mcg_reason"] == "no_proposal_file"
    assert np.array_equal(skipped.fg, fg)


def test_apply_proposals_refines_not_bg_when_fg_is_skipped():
    """An empty fg skips its own refinement, but not_bg is still refined (reference §6e)."""
    empty = np.zeros((H, W), dtype=bool)
    not_bg = block_mask(blocks(range(2, 6), range(2, 7)))
    masks = InstanceMasks(empty, not_bg, not_bg.copy(), {})
    out = apply_proposals(masks, BOX, (SP, list(PROPOSALS.values())), CFG)
    assert out.stats["mcg_used"] is False and out.stats["mcg_reason"] == "empty_fg"
    assert out.stats["mcg_not_bg_reason"] == "used"
    assert not out.fg.any()
    assert not np.array_equal(out.not_bg, not_bg)
    assert np.array_equal(out.ignore, out.not_bg)


def test_mcg_mat_source_reads_reference_layout(tmp_path):
    cells = np.empty((len(PROPOSALS), 1), dtype=object)
    for i, ids in enumerate(PROPOSALS.values()):
        cells[i, 0] = ids.reshape(1, -1).astype(np.uint16)
    scipy.io.savemat(
        tmp_path / "2007_000032.mat", {"superpixels": SP.astype(np.uint16), "labels": cells}
    )
    source = MCGMatSource(tmp_path)
    image = np.zeros((H, W, 3), np.uint8)
    sp, props = source.proposals("2007_000032", image)
    assert np.array_equal(sp, SP)
    assert len(props) == len(PROPOSALS)
    for got, want in zip(props, PROPOSALS.values(), strict=True):
        assert np.array_equal(np.sort(got), np.sort(want))
    assert source.proposals("missing", image) is None
    with pytest.raises(DataError, match="shape"):
        source.proposals("2007_000032", np.zeros((H + 1, W, 3), np.uint8))
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="bad.mat"):
        source.proposals("bad", image)


def test_superpixel_source_recovers_object_from_sloppy_mask():
    rng = np.random.default_rng(0)
    h, w = 80, 96
    image = np.full((h, w, 3), (90, 110, 90), dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    obj = ((yy - 40) / 22.0) ** 2 + ((xx - 48) / 30.0) ** 2 <= 1.0
    image[obj] = (200, 40, 60)
    image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    box = np.array([16.0, 16.0, 80.0, 64.0])
    sloppy = np.zeros((h, w), bool)
    sloppy[22:58, 24:72] = True  # a rectangle, not the ellipse
    source = SuperpixelSource(scales=(50.0, 200.0))
    sp, props = source.proposals("x", image)
    assert sp.shape == (h, w) and len(props) > sp.max()
    result = refine_with_proposals(sloppy, box, sp, props, MCGConfig())
    assert result.reason == "used"

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(result.mask, obj) > iou(sloppy, obj) + 0.05
    assert iou(result.mask, obj) > 0.85
    slic = SuperpixelSource(method="slic", n_segments=60, scales=(200.0,))
    sp2, props2 = slic.proposals("x", image)
    assert sp2.shape == (h, w) and len(props2) > 0


def test_config_validation():
    with pytest.raises(TypeError):
        MCGConfig(**{"containment": 0.9, "nope": 1})
    with pytest.raises(ValueError):
        MCGConfig(count="sum")


def test_make_source(tmp_path):
    from bbam.mcg import make_source

    assert isinstance(make_source(MCGConfig(source="mcg"), tmp_path), MCGMatSource)
    src = make_source(MCGConfig(source="superpixel", sp_method="slic", sp_scales=[200]))
    assert isinstance(src, SuperpixelSource) and src.method == "slic" and src.scales == (200.0,)
    with pytest.raises(ValueError):
        make_source(MCGConfig(source="mcg"))


def test_mcg_mat_source_refuses_ids_its_superpixels_lack(tmp_path):
    """Proposals naming superpixels the map does not have are another image's (or re-based by a
    tool): refining with them would use the wrong regions, so the file is refused by name."""
    cells = np.empty((2, 1), dtype=object)
    cells[0, 0] = np.array([[1, 2]], np.uint16)
    cells[1, 0] = np.array([[1, 101]], np.uint16)  # SP holds ids 1..100
    scipy.io.savemat(tmp_path / "img.mat", {"superpixels": SP.astype(np.uint16), "labels": cells})
    with pytest.raises(DataError, match=r"img\.mat: labels name superpixel ids .*\[101\]"):
        MCGMatSource(tmp_path).proposals("img", np.zeros((H, W, 3), np.uint8))


def _eq4_by_pixel_sets(mask, box, sp, proposals, containment, count):
    """Eq. 4 straight from the pixel sets, each pixel weighted 1 (``pixels``) or y + x (the
    reference's ``coordinate_sum``): the oracle for the shared path."""
    yy, xx = np.mgrid[0 : sp.shape[0], 0 : sp.shape[1]]
    weight = np.ones(sp.shape) if count == "pixels" else (yy + xx).astype(float)
    region = np.zeros(sp.shape, dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    region[y0:y1, x0:x1] = True
    touching = set(np.unique(sp[region]).tolist())
    kept = [np.isin(sp, p) for p in proposals if set(np.unique(p).tolist()) <= touching]
    inside = [k for k in kept if weight[k & region].sum() / weight[k].sum() > containment]
    if not inside:
        return None
    best = max(inside, key=lambda k: weight[k & mask].sum() / weight[k | mask].sum())
    if not weight[best & mask].sum() > 0:
        return None
    union = best.copy()
    for k in kept:
        if weight[k & mask].sum() / weight[k].sum() > containment:
            union |= k
    return union & region


@pytest.mark.parametrize("count", ["pixels", "coordinate_sum"])
def test_each_mask_refined_as_if_alone(count):
    """Masks of one box share the superpixel sums: each result is the one-mask result and the
    pixel-set oracle's, whatever the other masks are (empty, disjoint, the whole image)."""
    rng = np.random.default_rng(0)
    cfg = MCGConfig(min_box_area=0, count=count)
    for _ in range(20):
        proposals = [
            np.unique(rng.integers(1, 101, size=rng.integers(1, 12))) for _ in range(40)
        ] + [blocks(range(r, r + 3), range(c, c + 3)) for r in (2, 4) for c in (2, 4)]
        masks = [rng.random((H, W)) < q for q in (0.0, 0.3, 0.7, 1.0)]
        masks.append(block_mask(blocks(range(3, 6), range(3, 6))))
        joint = refine_each_with_proposals(masks, BOX, SP, proposals, cfg)
        for mask, together in zip(masks, joint, strict=True):
            alone = refine_with_proposals(mask, BOX, SP, proposals, cfg)
            assert (together.reason, together.best_iou) == (alone.reason, alone.best_iou)
            oracle = _eq4_by_pixel_sets(mask, BOX, SP, proposals, cfg.containment, count)
            if together.mask is None:
                assert oracle is None or not mask.any()
            else:
                assert np.array_equal(together.mask, alone.mask)
                assert np.array_equal(together.mask, oracle)
    small = MCGConfig(min_box_area=22 * 22 + 1, count=count)  # BOX covers 22 x 22 pixels
    assert {r.reason for r in refine_each_with_proposals(masks, BOX, SP, proposals, small)} == {
        "small_box"
    }
