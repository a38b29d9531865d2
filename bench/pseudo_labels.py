"""Benchmark: quality of the pseudo masks against GT masks, BBAM variants vs box-only baselines.

For every non-crowd instance with a GT mask it builds the fg pseudo mask five ways and reports
the mean instance IoU with the GT mask (percent):
- bbam_raw: normalised attribution map > 0.5 inside the box (no rank rule, blur or CRF);
- bbam_crf: the reference post-processing (rank rule, blur, DenseCRF, fallbacks);
- bbam_crf_proposals: the same plus the proposal refinement (MCG .mat files with --mcg-dir,
  otherwise scikit-image superpixel proposals);
- box: the filled box; grabcut: OpenCV GrabCut initialised with the box;
- gt_map_crf (a diagnostic, not a method): the GT mask itself fed to the bbam_crf
  refinement as if it were the attribution map, i.e. what the refinement keeps of a perfect
  map. The gap between it and 100 is lost by the post-processing (blur, CRF, cut), whatever
  the attribution does.
It also reports the class-wise semantic mIoU (background included; pixels the pseudo label marks
255 count as wrong; crowd regions are not scored) and merges `pseudo_labels` into
bench/results.json.

    python -m bench.pseudo_labels --annotations data/synthetic/annotations/instances_val.json \\
        --image-root data/synthetic/VOC2012/JPEGImages --maps runs/attribution/val

--maps is the attribution stage output: a directory holding shard directories (or one shard)
with Parquet manifests and map arrays (`bbam.manifest`); maps are upsampled with
`bbam.attribution.map_to_image`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from bbam.baselines import box_mask, grabcut_mask
from bbam.data.images import load_rgb
from bbam.data.palette import IGNORE_LABEL
from bbam.data.records import ImageRecord
from bbam.mcg import MCGConfig, MCGMatSource, ProposalSource, SuperpixelSource, apply_proposals
from bbam.pseudo_labels import mark_crowd_ignore, semantic_label
from bbam.refine import RefineConfig, refine_instance
from bbam.segmenters.targets import mark_void_ignore
from bench.results import RESULTS, merge_results

VARIANTS = ("bbam_raw", "bbam_crf", "bbam_crf_proposals", "box", "grabcut", "gt_map_crf")


def map_key(image_id: str, instance_id: int) -> str:
    """The attribution manifest key (`bbam.shards.instance_key`)."""
    return f"{image_id}/{instance_id}"


class ManifestMaps(Mapping):
    """Lazy key -> float32 HxW map at original resolution, read from attribution manifests.

    Rows with status ok / no_positive have a map; failed / skipped rows are absent (the
    refinement then takes its empty-map fallback)."""

    def __init__(self, maps_dir: str | Path, align_corners: bool = True) -> None:
        from bbam.manifest import read_shard

        root = Path(maps_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: attribution output directory not found")
        shard_dirs = sorted(
            {p.parent for p in root.rglob("*.parquet") if p.name.startswith(("manifest", "part-"))}
        )
        self.align_corners = align_corners
        self._rows: dict[str, tuple[Path, dict]] = {}
        self._cache: dict = {}
        for shard_dir in shard_dirs:
            for row in read_shard(shard_dir).to_pylist():
                if row["status"] in ("ok", "no_positive") and row.get("array_file"):
                    self._rows[row["key"]] = (shard_dir, row)

    def __getitem__(self, key: str) -> np.ndarray:
        from bbam.attribution import map_to_image
        from bbam.manifest import load_grid

        shard_dir, row = self._rows[key]
        grid = load_grid(shard_dir, row, self._cache)
        return map_to_image(
            grid,
            (int(row["resized_h"]), int(row["resized_w"])),
            (int(row["image_h"]), int(row["image_w"])),
            self.align_corners,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def load_maps(maps_dir: str | Path, align_corners: bool = True) -> Mapping[str, np.ndarray]:
    """Attribution maps of a run directory, keyed `<image_id>/<instance_id>` (lazy)."""
    return ManifestMaps(maps_dir, align_corners)


def default_configs() -> dict:
    return {
        "raw": RefineConfig(mode="absolute", abs_fg=0.5, abs_bg=0.5, abs_crf=False, blur=False),
        "crf": RefineConfig(),
        "proposals": MCGConfig(),
    }


def params_configs(params_path: Path) -> dict:
    """The pipeline's own `refine` and `proposals` settings (the raw variant stays raw)."""
    from tasks.params import load_params
    from tasks.pseudo_label_config import proposal_config, refine_config

    params = load_params(params_path)
    return {
        "crf": refine_config(params),
        "proposals": proposal_config(params)[0],
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n+1) counts over pixels with GT != 255; the last column is predicted 255."""
    valid = gt != IGNORE_LABEL
    p = np.where(pred[valid] == IGNORE_LABEL, n, np.minimum(pred[valid], n))
    return np.bincount(gt[valid].astype(np.int64) * (n + 1) + p, minlength=n * (n + 1)).reshape(
        n, n + 1
    )


def evaluate_pseudo_labels(
    records: list[ImageRecord],
    maps: Mapping[str, np.ndarray],
    images: Callable[[ImageRecord], np.ndarray] = lambda r: load_rgb(r.path),
    configs: dict | None = None,
    source: ProposalSource | None = None,
    num_classes: int | None = None,
    grabcut_iterations: int = 5,
) -> dict:
    """Mean instance IoU (percent) of each variant's fg mask with the GT mask, plus semantic mIoU.

    maps: `<image_id>/<instance_id>` -> HxW float32 map at original resolution (missing = empty).
    configs: {"raw": RefineConfig, "crf": RefineConfig, "proposals": MCGConfig}."""
    cfg = default_configs() | (configs or {})
    source = source if source is not None else SuperpixelSource()
    if num_classes is None:
        num_classes = max((i.label for r in records for i in r.instances), default=0)
    n = num_classes + 1
    ious: dict[str, list[float]] = {v: [] for v in VARIANTS}
    # Which instances the detector could explain (a map with any mass): the comparison on
    # that subset separates the attribution's quality from the detector's positive coverage.
    explained: list[bool] = []
    conf = {v: np.zeros((n, n + 1), dtype=np.int64) for v in VARIANTS}
    counts = {"instances": 0, "no_gt_mask": 0, "crowd": 0, "missing_map": 0, "mcg_used": 0}
    fallbacks: dict[str, int] = {}
    for record in records:
        insts = [i for i in record.instances if not i.iscrowd and i.has_mask]
        counts["crowd"] += sum(i.iscrowd for i in record.instances)
        counts["no_gt_mask"] += sum(not i.has_mask and not i.iscrowd for i in record.instances)
        if not insts:
            continue
        image = images(record)
        props = source.proposals(record.image_id, image) if cfg["proposals"].enabled else None
        per_variant: dict[str, list] = {v: [] for v in VARIANTS}
        gt_sem = []
        for inst in insts:
            gt = inst.mask  # decoded once
            key = map_key(record.image_id, inst.instance_id)
            heat = maps.get(key)
            counts["missing_map"] += heat is None
            explained.append(heat is not None and float(np.max(heat, initial=0.0)) > 0.0)
            raw = refine_instance(heat, inst.box, image, cfg["raw"])
            crf = refine_instance(heat, inst.box, image, cfg["crf"])
            fallbacks[crf.stats["fallback"]] = fallbacks.get(crf.stats["fallback"], 0) + 1
            prop = apply_proposals(crf, inst.box, props, cfg["proposals"])
            ceiling = refine_instance(gt.astype(np.float32), inst.box, image, cfg["crf"])
            counts["mcg_used"] += bool(prop.stats["mcg_used"])
            h, w = image.shape[:2]
            none = np.zeros((h, w), dtype=bool)
            results = {
                "bbam_raw": (raw.fg, raw.ignore),
                "bbam_crf": (crf.fg, crf.ignore),
                "bbam_crf_proposals": (prop.fg, prop.ignore),
                "box": (box_mask(inst.box, h, w), none),
                "grabcut": (grabcut_mask(image, inst.box, grabcut_iterations), none),
                "gt_map_crf": (ceiling.fg, ceiling.ignore),
            }
            for variant, (fg, ignore) in results.items():
                ious[variant].append(_iou(fg, gt))
                per_variant[variant].append((inst.label, inst.box, fg, ignore))
            gt_sem.append((inst.label, inst.box, gt, none))
            counts["instances"] += 1
        h, w = image.shape[:2]
        gt_label = mark_crowd_ignore(semantic_label(h, w, gt_sem), record.instances)
        mark_void_ignore(gt_label, record)  # VOC's void band, as the evaluation ignores it
        for variant in VARIANTS:
            conf[variant] += _confusion(gt_label, semantic_label(h, w, per_variant[variant]), n)
    out: dict = {}
    mask = np.asarray(explained, dtype=bool)
    for variant in VARIANTS:
        values = np.asarray(ious[variant], dtype=np.float64)
        out[f"miou_{variant}"] = round(100.0 * float(values.mean()), 2) if values.size else None
        out[f"miou_{variant}_explained"] = (
            round(100.0 * float(values[mask].mean()), 2) if mask.any() else None
        )
        c = conf[variant]
        inter = np.diag(c[:, :n]).astype(np.float64)
        union = c.sum(axis=1) + c[:, :n].sum(axis=0) - inter
        present = union > 0
        out[f"semantic_miou_{variant}"] = (
            round(100.0 * float(np.mean(inter[present] / union[present])), 2)
            if present.any()
            else None
        )
    out.update({f"n_{k}": v for k, v in counts.items()})
    out["n_explained"] = int(mask.sum())
    out["fallbacks"] = fallbacks
    return out


def main(argv: list[str] | None = None) -> int:
    from bbam.data.coco import read_coco

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", type=Path, required=True, help="COCO json with GT masks")
    parser.add_argument("--image-root", type=Path, required=True)
    parser.add_argument("--maps", type=Path, required=True, help="attribution stage output dir")
    parser.add_argument("--mcg-dir", type=Path, default=None, help="MCG .mat files (optional)")
    parser.add_argument("--align-corners", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="take `refine` and `proposals` from this params.yaml (what the pipeline runs); "
        "without it, the reference defaults",
    )
    args = parser.parse_args(argv)

    dataset = read_coco(args.annotations, args.image_root, with_masks=True)
    records = dataset.records[: args.limit] if args.limit else dataset.records
    maps = load_maps(args.maps, bool(args.align_corners))
    source = MCGMatSource(args.mcg_dir) if args.mcg_dir else SuperpixelSource()
    configs = params_configs(args.params) if args.params else None
    result = evaluate_pseudo_labels(
        records, maps, configs=configs, source=source, num_classes=len(dataset.classes)
    )
    result["refine_config"] = "params" if args.params else "reference defaults"
    result["proposal_source"] = "mcg" if args.mcg_dir else "superpixel"
    result["n_images"] = len(records)
    for variant in VARIANTS:
        print(
            f"{variant:>20}: instance mIoU {result[f'miou_{variant}']}  "
            f"(explained instances {result[f'miou_{variant}_explained']})  "
            f"semantic mIoU {result[f'semantic_miou_{variant}']}"
        )
    print(json.dumps({k: v for k, v in result.items() if k.startswith("n_")}))
    merge_results("pseudo_labels", result, args.results, update=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
