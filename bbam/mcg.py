"""Proposal-based refinement of the BBAM foreground mask (paper Eq. 4, reference §6e).

A proposal source gives superpixels (HxW int) and proposals (arrays of superpixel ids). The rule:
1. drop proposals that contain a superpixel lying wholly outside the box;
2. best = the proposal with the highest IoU with the BBAM mask, among proposals more than
   `containment` inside the box;
3. add every proposal more than `containment` inside the BBAM mask; crop the union to the box;
4. that becomes the fg mask, and it is unioned into the not-background mask.

Overlaps use true pixel counts. The reference sums pixel *coordinates* (np.sum(np.where(m)) adds
row + col of every pixel), so its ratios weight each pixel by y + x; count="coordinate_sum"
reproduces that. Boxes smaller than min_box_area and images without proposals are skipped and keep
the BBAM mask.

Sources: `MCGMatSource` reads precomputed MCG `.mat` files as the reference does; for datasets
without them, `SuperpixelSource` builds class-agnostic proposals from scikit-image superpixels
(single superpixels, adjacent pairs, coarser-scale segments and a greedy colour-similarity merge
hierarchy), so custom datasets get the refinement too.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bbam.data.masks import box_slices
from bbam.data.records import DataError
from bbam.refine import InstanceMasks

Proposals = tuple[np.ndarray, list[np.ndarray]]


class ProposalSource(Protocol):
    def proposals(self, image_id: str, image: np.ndarray) -> Proposals | None:
        """(superpixels HxW int, list of superpixel-id arrays), or None when there are none."""
        ...


@dataclass(frozen=True)
class MCGConfig:
    enabled: bool = True
    source: str = "mcg"  # "mcg" (precomputed .mat) | "superpixel" (scikit-image)
    containment: float = 0.95
    min_box_area: int = 32 * 32
    count: str = "pixels"  # "pixels" | "coordinate_sum" (the reference's bug)
    # The semantic PNGs are drawn from the masks before this refinement, as the reference's
    # (its semantic labels read the non-MCG masks); true draws them from the refined ones.
    refine_semantic: bool = False
    # SuperpixelSource settings (source="superpixel")
    sp_method: str = "felzenszwalb"  # "felzenszwalb" | "slic"
    sp_scales: tuple[float, ...] = (100.0, 300.0, 1000.0)
    sp_sigma: float = 0.8
    sp_min_size: int = 20
    sp_n_segments: int = 200
    sp_merge: bool = True
    sp_max_proposals: int = 3000

    def __post_init__(self) -> None:
        if self.source not in ("mcg", "superpixel"):
            raise ValueError(f"MCGConfig.source must be 'mcg' or 'superpixel', got {self.source!r}")
        if self.count not in ("pixels", "coordinate_sum"):
            raise ValueError(
                f"MCGConfig.count must be 'pixels' or 'coordinate_sum', got {self.count!r}"
            )
        if not 0.0 < self.containment <= 1.0:
            raise ValueError(f"MCGConfig.containment must be in (0, 1], got {self.containment}")
        if self.sp_method not in ("felzenszwalb", "slic"):
            raise ValueError(
                f"MCGConfig.sp_method must be 'felzenszwalb' or 'slic', got {self.sp_method!r}"
            )
        object.__setattr__(self, "sp_scales", tuple(float(v) for v in self.sp_scales))


class MCGMatSource:
    """Reads `<directory>/<image_id>.mat` with `superpixels` (HxW) and `labels` (a cell array of
    superpixel-id vectors, one per proposal; ids are the values found in `superpixels`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def proposals(self, image_id: str, image: np.ndarray) -> Proposals | None:
        import scipy.io

        path = self.directory / f"{image_id}.mat"
        if not path.is_file():
            return None
        try:
            data = scipy.io.loadmat(path)
        except Exception as exc:  # scipy raises several types for corrupt files
            raise DataError(f"{path}: unreadable MCG .mat file ({exc})") from exc
        if "superpixels" not in data or "labels" not in data:
            raise DataError(f"{path}: MCG file lacks 'superpixels' or 'labels'")
        superpixels = np.asarray(data["superpixels"]).astype(np.int64)
        if superpixels.shape != image.shape[:2]:
            raise DataError(
                f"{path}: superpixels shape {superpixels.shape} != image shape {image.shape[:2]}"
            )
        labels = data["labels"]
        cells = labels.ravel() if labels.dtype == object else list(labels)
        props = [np.asarray(c, dtype=np.int64).ravel() for c in cells]
        ids = np.concatenate(props) if props else np.zeros(0, np.int64)
        unknown = np.setdiff1d(ids, superpixels)
        if unknown.size:
            # Proposals of another image, or ids re-based by a tool: using them would refine
            # with the wrong regions.
            raise DataError(
                f"{path}: labels name superpixel ids not in 'superpixels' "
                f"({unknown[:5].tolist()}{' ...' if unknown.size > 5 else ''})"
            )
        return superpixels, props


def _adjacent_pairs(superpixels: np.ndarray) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    for a, b in (
        (superpixels[:, :-1], superpixels[:, 1:]),
        (superpixels[:-1, :], superpixels[1:, :]),
    ):
        diff = a != b
        lo = np.minimum(a[diff], b[diff])
        hi = np.maximum(a[diff], b[diff])
        for x, y in set(zip(lo.tolist(), hi.tolist(), strict=True)):
            pairs.add((x, y))
    return pairs


class SuperpixelSource:
    """Class-agnostic proposals from scikit-image superpixels (no MCG needed).

    Fine superpixels come from felzenszwalb at scales[0] (or SLIC with n_segments); proposals are
    every superpixel, every adjacent pair, each coarser-scale felzenszwalb segment expressed as the
    fine superpixels it mostly covers, and each region of a greedy merge hierarchy that joins the
    adjacent pair with the closest mean colour (size-weighted), as selective search does."""

    def __init__(
        self,
        method: str = "felzenszwalb",
        scales: tuple[float, ...] = (100.0, 300.0, 1000.0),
        sigma: float = 0.8,
        min_size: int = 20,
        n_segments: int = 200,
        merge: bool = True,
        max_proposals: int = 3000,
    ) -> None:
        if method not in ("felzenszwalb", "slic"):
            raise ValueError(
                f"SuperpixelSource.method must be 'felzenszwalb' or 'slic', got {method!r}"
            )
        self.method = method
        self.scales = tuple(scales)
        self.sigma = sigma
        self.min_size = min_size
        self.n_segments = n_segments
        self.merge = merge
        self.max_proposals = max_proposals

    def _segment(self, image: np.ndarray, scale: float) -> np.ndarray:
        from skimage.segmentation import felzenszwalb

        return felzenszwalb(image, scale=scale, sigma=self.sigma, min_size=self.min_size)

    def proposals(self, image_id: str, image: np.ndarray) -> Proposals | None:
        if self.method == "slic":
            from skimage.segmentation import slic

            fine = slic(image, n_segments=self.n_segments, start_label=0).astype(np.int64)
            coarse_scales = self.scales
        else:
            fine = self._segment(image, self.scales[0]).astype(np.int64)
            coarse_scales = self.scales[1:]
        n = int(fine.max()) + 1
        props: list[np.ndarray] = [np.array([i]) for i in range(n)]
        pairs = _adjacent_pairs(fine)
        props += [np.array(p) for p in sorted(pairs)]
        area = np.bincount(fine.ravel(), minlength=n)
        for scale in coarse_scales:
            coarse = self._segment(image, scale).ravel()
            joint = np.bincount(fine.ravel() * (coarse.max() + 1) + coarse)
            joint = np.pad(joint, (0, n * (coarse.max() + 1) - joint.size))
            owner = joint.reshape(n, -1).argmax(axis=1)
            for seg in np.unique(owner):
                members = np.flatnonzero(owner == seg)
                if members.size > 1:
                    props.append(members)
        if self.merge and n > 1:
            props += _merge_hierarchy(image, fine, area, pairs)
        return fine, props[: self.max_proposals]


def _merge_hierarchy(
    image: np.ndarray, fine: np.ndarray, area: np.ndarray, pairs: set[tuple[int, int]]
) -> list[np.ndarray]:
    """Greedy agglomeration by mean-colour distance (+ a size term); each merged region is one
    proposal."""
    n = area.size
    flat = fine.ravel()
    colour = np.stack(
        [np.bincount(flat, weights=image[..., c].ravel(), minlength=n) for c in range(3)], axis=1
    )
    total = float(flat.size)
    regions: dict[int, dict] = {
        i: {"sum": colour[i].copy(), "area": float(area[i]), "members": [i], "nbrs": set()}
        for i in range(n)
    }
    for a, b in pairs:
        regions[a]["nbrs"].add(b)
        regions[b]["nbrs"].add(a)

    def cost(a: int, b: int) -> float:
        ra, rb = regions[a], regions[b]
        ca = ra["sum"] / max(ra["area"], 1.0)
        cb = rb["sum"] / max(rb["area"], 1.0)
        return float(np.abs(ca - cb).sum() / 255.0 + (ra["area"] + rb["area"]) / total)

    heap = [(cost(a, b), a, b) for a, b in pairs]
    heapq.heapify(heap)
    out: list[np.ndarray] = []
    next_id = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in regions or b not in regions:
            continue
        ra, rb = regions.pop(a), regions.pop(b)
        nbrs = (ra["nbrs"] | rb["nbrs"]) - {a, b}
        new = {
            "sum": ra["sum"] + rb["sum"],
            "area": ra["area"] + rb["area"],
            "members": ra["members"] + rb["members"],
            "nbrs": nbrs,
        }
        regions[next_id] = new
        for k in nbrs:
            regions[k]["nbrs"] -= {a, b}
            regions[k]["nbrs"].add(next_id)
            heapq.heappush(heap, (cost(next_id, k), next_id, k))
        out.append(np.array(sorted(new["members"])))
        next_id += 1
    return out


@dataclass
class ProposalRefinement:
    mask: np.ndarray | None  # refined fg (cropped to box), None when skipped
    reason: str  # "used" or why it was skipped
    best_iou: float = 0.0
    n_candidates: int = 0
    n_extra: int = 0


def refine_with_proposals(
    fg: np.ndarray,
    box: np.ndarray,
    superpixels: np.ndarray,
    proposals: list[np.ndarray],
    cfg: MCGConfig = MCGConfig(),  # noqa: B008 (frozen dataclass)
) -> ProposalRefinement:
    """Eq. 4: best-IoU in-box proposal, plus all proposals inside the mask, cropped to the box."""
    return refine_each_with_proposals([fg], box, superpixels, proposals, cfg)[0]


def refine_each_with_proposals(
    masks: Sequence[np.ndarray],
    box: np.ndarray,
    superpixels: np.ndarray,
    proposals: list[np.ndarray],
    cfg: MCGConfig = MCGConfig(),  # noqa: B008 (frozen dataclass)
) -> list[ProposalRefinement]:
    """``refine_with_proposals`` of each mask of one box: the superpixel weights and the
    proposals that stay in the box are computed once, only the overlaps per mask."""
    height, width = superpixels.shape
    sl = box_slices(np.asarray(box), height, width)
    region = np.zeros((height, width), dtype=bool)
    region[sl] = True
    if int(region.sum()) < cfg.min_box_area:
        return [ProposalRefinement(None, "small_box") for _ in masks]
    results: list[ProposalRefinement | None] = [
        None if mask.any() else ProposalRefinement(None, "empty_fg") for mask in masks
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo and not proposals:
        return [r or ProposalRefinement(None, "no_proposals") for r in results]
    if not todo:
        return results
    sp = superpixels.astype(np.int64).ravel()
    if sp.min() < 0:
        raise ValueError("superpixel ids must be non-negative")
    n = int(sp.max()) + 1
    if cfg.count == "pixels":
        weight = np.ones(sp.size, dtype=np.float64)
    else:
        yy, xx = np.mgrid[0:height, 0:width]
        weight = (yy + xx).ravel().astype(np.float64)
    w_all = np.bincount(sp, weights=weight, minlength=n)
    w_box = np.bincount(sp, weights=weight * region.ravel(), minlength=n)
    outside = np.bincount(sp, weights=region.ravel().astype(np.float64), minlength=n) == 0
    outside &= np.bincount(sp, minlength=n) > 0
    kept: list[np.ndarray] = []
    for ids in proposals:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < n)]
        if ids.size and not outside[ids].any():
            kept.append(ids)
    if not kept:
        return [r or ProposalRefinement(None, "no_proposals_in_box") for r in results]
    area = np.array([w_all[i].sum() for i in kept])
    safe = np.maximum(area, 1e-12)
    candidates = np.flatnonzero(np.array([w_box[i].sum() for i in kept]) / safe > cfg.containment)
    if candidates.size == 0:
        return [r or ProposalRefinement(None, "no_proposal_inside_box") for r in results]
    for index in todo:
        mask = masks[index]
        if mask.shape != (height, width):
            raise ValueError(f"mask {mask.shape} and superpixels {(height, width)} differ")
        w_fg = np.bincount(sp, weights=weight * mask.ravel(), minlength=n)
        inter = np.array([w_fg[i].sum() for i in kept])
        union = np.maximum(area + float(w_fg.sum()) - inter, 1e-12)
        iou = inter / union
        best = int(candidates[np.argmax(iou[candidates])])
        if iou[best] <= 0:
            results[index] = ProposalRefinement(
                None, "no_overlap", n_candidates=int(candidates.size)
            )
            continue
        extra = np.flatnonzero(inter / safe > cfg.containment)
        chosen = np.unique(np.concatenate([kept[best]] + [kept[i] for i in extra]))
        selected = np.zeros(n, dtype=bool)
        selected[chosen] = True
        results[index] = ProposalRefinement(
            selected[sp].reshape(height, width) & region,
            "used",
            float(iou[best]),
            n_candidates=int(candidates.size),
            n_extra=int(extra.size),
        )
    return results


def apply_proposals(
    masks: InstanceMasks,
    box: np.ndarray,
    source_output: Proposals | None,
    cfg: MCGConfig = MCGConfig(),  # noqa: B008 (frozen dataclass)
) -> InstanceMasks:
    """Refine fg and not_bg with proposals, each on its own, as the reference does (§6e).

    Each mask gets its own best-IoU proposal plus the proposals inside it; the refined fg is then
    unioned into not_bg, so fg stays inside it. A mask whose refinement is skipped is kept."""
    stats = dict(masks.stats)
    if not cfg.enabled:
        stats.update(mcg_used=False, mcg_reason="disabled")
        return InstanceMasks(masks.fg, masks.not_bg, masks.ignore, stats)
    if source_output is None:
        stats.update(mcg_used=False, mcg_reason="no_proposal_file")
        return InstanceMasks(masks.fg, masks.not_bg, masks.ignore, stats)
    superpixels, proposals = source_output
    fg_result, nb_result = refine_each_with_proposals(
        [masks.fg, masks.not_bg], box, superpixels, proposals, cfg
    )
    if fg_result.mask is None and nb_result.mask is None:
        stats.update(
            mcg_used=False, mcg_reason=fg_result.reason, mcg_not_bg_reason=nb_result.reason
        )
        return InstanceMasks(masks.fg, masks.not_bg, masks.ignore, stats)
    fg = masks.fg if fg_result.mask is None else fg_result.mask
    not_bg = (masks.not_bg if nb_result.mask is None else nb_result.mask) | fg
    ignore = not_bg & ~fg
    stats.update(
        fg_area=int(fg.sum()),
        not_bg_area=int(not_bg.sum()),
        ignore_area=int(ignore.sum()),
        mcg_used=fg_result.mask is not None,
        mcg_reason=fg_result.reason,
        mcg_best_iou=fg_result.best_iou,
        mcg_extra=fg_result.n_extra,
        mcg_not_bg_reason=nb_result.reason,
    )
    return InstanceMasks(fg, not_bg, ignore, stats)


def make_source(cfg: MCGConfig, mcg_dir: str | Path | None = None) -> ProposalSource:
    """The proposal source named by cfg.source (MCG .mat files need their directory)."""
    if cfg.source == "mcg":
        if mcg_dir is None:
            raise ValueError("MCGConfig.source='mcg' needs a directory of .mat files")
        return MCGMatSource(mcg_dir)
    return SuperpixelSource(
        method=cfg.sp_method,
        scales=cfg.sp_scales,
        sigma=cfg.sp_sigma,
        min_size=cfg.sp_min_size,
        n_segments=cfg.sp_n_segments,
        merge=cfg.sp_merge,
        max_proposals=cfg.sp_max_proposals,
    )
