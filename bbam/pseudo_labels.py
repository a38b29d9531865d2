"""Write refined masks as training targets: instance pseudo GT (COCO JSON) and semantic PNGs.

COCO annotations carry the fg mask as RLE `segmentation`, the input box as `bbox` (xywh, not the
mask's tight box), an extra `ignore` RLE (not-background minus foreground) and `bbam` stats.
Unlike the reference (which drops instances with an empty mask or no polygon), an empty fg is kept
with an empty RLE and flagged `bbam.empty_fg = true`, so boxes and masks never misalign.

Semantic labels follow the reference (§6f): drawn from the masks before proposal refinement
(``MCGConfig.refine_semantic`` opts into the refined ones); per-class union of fg masks,
pixels claimed by two or more classes -> 255; a box lying entirely inside another (not the
same box) re-assigns its own mask pixels to its class (largest to smallest box); finally every
instance's ignore band -> 255. Crowd regions (COCO `iscrowd`) are 255 too: they hold objects
of their class that no box singles out, so neither background nor a class is a safe target
there (`mark_crowd_ignore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bbam.atomic import atomic_write_json
from bbam.data.masks import box_region, mask_to_rle
from bbam.data.palette import IGNORE_LABEL, check_class_labels, save_palette_png
from bbam.data.records import ImageRecord, Instance
from bbam.data.writers import VOID_KEY
from bbam.mcg import MCGConfig, ProposalSource, apply_proposals
from bbam.refine import InstanceMasks, RefineConfig, refine_instance


class RefinedMasks(NamedTuple):
    """An image's masks, in record order: the instance pseudo GT's (proposal-refined when
    proposals are on) and the semantic labels' (before that refinement, unless
    ``MCGConfig.refine_semantic``)."""

    instance: list[InstanceMasks]
    semantic: list[InstanceMasks]


def refine_record(
    record: ImageRecord,
    image: np.ndarray,
    maps: Mapping[int, np.ndarray | None],
    refine_cfg: RefineConfig = RefineConfig(),  # noqa: B008 (frozen dataclass)
    mcg_cfg: MCGConfig | None = None,
    source: ProposalSource | None = None,
) -> RefinedMasks:
    """Masks for every instance of one image.

    maps: instance_id -> attribution map at original resolution (missing / None = empty map, which
    takes the empty-map fallback). Proposals are computed once per image when mcg_cfg is enabled."""
    proposals = None
    use_mcg = mcg_cfg is not None and mcg_cfg.enabled and source is not None
    if use_mcg:
        proposals = source.proposals(record.image_id, image)
    instance, semantic = [], []
    for inst in record.instances:
        masks = refine_instance(maps.get(inst.instance_id), inst.box, image, refine_cfg)
        masks.stats["instance_id"] = int(inst.instance_id)
        refined = apply_proposals(masks, inst.box, proposals, mcg_cfg) if use_mcg else masks
        instance.append(refined)
        semantic.append(refined if use_mcg and mcg_cfg.refine_semantic else masks)
    return RefinedMasks(instance, semantic)


def coco_image_id(image_id: str) -> int:
    """The reference's rule: the file stem with '_' removed, as an int (2007_000032 -> 2007000032).
    Raises ValueError for non-numeric ids: pass the input dataset's ids explicitly then."""
    digits = image_id.replace("_", "")
    if not digits.isdigit():
        raise ValueError(f"image id {image_id!r} is not numeric; pass the dataset's COCO image id")
    return int(digits)


def coco_image_entry(record: ImageRecord, coco_id: int, file_name: str | None = None) -> dict:
    return {
        "id": int(coco_id),
        "file_name": file_name if file_name is not None else Path(record.path).name,
        "width": int(record.width),
        "height": int(record.height),
    }


def build_instance_annotations(
    coco_id: int,
    instances: Sequence[Instance],
    masks: Sequence[InstanceMasks],
    first_ann_id: int = 1,
    category_ids: Sequence[int] | None = None,
) -> tuple[list[dict], list[dict]]:
    """COCO annotations for one image plus one manifest row per instance.

    Annotation ids are the instance ids where positive, else consecutive from first_ann_id.
    category_id is category_ids[label - 1] (default: the label)."""
    if len(instances) != len(masks):
        raise ValueError(f"{len(instances)} instances but {len(masks)} masks for image {coco_id}")
    annotations, rows = [], []
    next_id = first_ann_id
    for inst, m in zip(instances, masks, strict=True):
        x1, y1, x2, y2 = (float(v) for v in inst.box)
        ann_id = int(inst.instance_id) if inst.instance_id > 0 else next_id
        next_id = max(next_id, ann_id) + 1
        fg_area = int(m.fg.sum())
        ignore_area = int(m.ignore.sum())
        box_area = max((x2 - x1) * (y2 - y1), 1e-12)
        stats = {k: _jsonable(v) for k, v in m.stats.items()}
        stats.update(fg_area=fg_area, ignore_area=ignore_area, empty_fg=fg_area == 0)
        cat = int(category_ids[inst.label - 1]) if category_ids else int(inst.label)
        annotations.append(
            {
                "id": ann_id,
                "image_id": int(coco_id),
                "category_id": cat,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(fg_area),
                "iscrowd": int(bool(inst.iscrowd)),
                "segmentation": mask_to_rle(m.fg),
                "ignore": mask_to_rle(m.ignore),
                "bbam": stats,
            }
        )
        rows.append(
            {
                "image_id": int(coco_id),
                "annotation_id": ann_id,
                "label": int(inst.label),
                "box_area": float(box_area),
                "fg_area": fg_area,
                "ignore_area": ignore_area,
                "fg_fraction": fg_area / box_area,
                "ignore_fraction": ignore_area / box_area,
                "empty_fg": fg_area == 0,
                "fallback": str(m.stats.get("fallback", "none")),
                "mcg_used": bool(m.stats.get("mcg_used", False)),
                "mcg_reason": str(m.stats.get("mcg_reason", "disabled")),
            }
        )
    return annotations, rows


def proposal_skip_counts(rows: Sequence[Mapping]) -> dict[str, int]:
    """Instances whose foreground proposals did not refine, by reason (e.g. no_proposal_file:
    the image has no MCG file and keeps its BBAM mask), so a gap in the proposal files shows."""
    counts: dict[str, int] = {}
    for row in rows:
        if not row["mcg_used"] and row["mcg_reason"] != "disabled":
            counts[row["mcg_reason"]] = counts.get(row["mcg_reason"], 0) + 1
    return counts


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def write_coco_pseudo_gt(
    path: str | Path, images: list[dict], categories: list[dict], annotations: list[dict]
) -> None:
    """Atomic COCO instances JSON (images / categories as the input dataset's, less the GT
    void region an image entry may carry: pseudo GT knows only the boxes)."""
    atomic_write_json(
        path,
        {
            "info": {"description": "BBAM pseudo ground truth (fg RLE + ignore RLE)"},
            "images": [{k: v for k, v in image.items() if k != VOID_KEY} for image in images],
            "annotations": annotations,
            "categories": categories,
        },
    )


def _box_inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    """inner lies within outer and is not the same box: two instances with one box are not
    nested, so their conflicting pixels stay ignored (the reference's check_entire_overlap)."""
    return bool(
        not np.array_equal(inner, outer)
        and inner[0] >= outer[0]
        and inner[1] >= outer[1]
        and inner[2] <= outer[2]
        and inner[3] <= outer[3]
    )


def semantic_label(
    height: int,
    width: int,
    instances: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
) -> np.ndarray:
    """uint8 HxW: 0 background, label per class, 255 for conflicts and ignore bands.

    instances: (label, box xyxy, fg HxW bool, ignore HxW bool)."""
    label = np.zeros((height, width), dtype=np.uint8)
    if not instances:
        return label
    classes = sorted({int(c) for c, *_ in instances})
    check_class_labels(classes, "semantic pseudo label")
    claims = np.zeros((height, width), dtype=np.int32)
    for c in classes:
        union = np.zeros((height, width), dtype=bool)
        for lab, _, fg, _ in instances:
            if int(lab) == c:
                union |= fg
        claims += union
        label[union] = c
    label[claims >= 2] = IGNORE_LABEL
    boxes = [np.asarray(b, dtype=np.float64) for _, b, _, _ in instances]
    nested = [i for i, b in enumerate(boxes) if any(_box_inside(b, other) for other in boxes)]
    areas = {i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]) for i in nested}
    for i in sorted(nested, key=lambda k: -areas[k]):
        lab, _, fg, _ = instances[i]
        label[fg] = int(lab)
    for _, _, _, ignore in instances:
        label[ignore] = IGNORE_LABEL
    return label


def mark_crowd_ignore(label: np.ndarray, instances: Sequence[Instance]) -> np.ndarray:
    """Set the crowd regions of ``instances`` to 255 in ``label`` (in place; returned).

    A crowd region is its mask, or its box when it has none."""
    for inst in instances:
        if inst.iscrowd:
            label[crowd_region(inst, *label.shape)] = IGNORE_LABEL
    return label


def crowd_region(inst: Instance, height: int, width: int) -> np.ndarray:
    """HxW bool: a crowd instance's mask, or its box when it has no mask."""
    mask = inst.mask
    if mask is not None and mask.shape == (height, width):
        return mask.astype(bool)
    return box_region(np.asarray(inst.box), height, width)


def write_semantic_png(path: str | Path, label: np.ndarray) -> None:
    """VOC-palette P-mode PNG, written atomically."""
    save_palette_png(path, label)
