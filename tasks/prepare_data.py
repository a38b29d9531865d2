"""Prefect tasks of the prepare_data stage: prepare the dataset, VOC -> COCO JSON, summaries."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prefect import task

from bbam.atomic import atomic_write_json
from bbam.data.prepare import prepare_dataset, summarize_split
from bbam.data.records import DataError
from bbam.data.voc import read_voc
from bbam.data.writers import PREPARED_FORMAT, write_coco_json
from tasks.caching import stage_cache
from tasks.params import METRICS_DIR, split_paths

logger = logging.getLogger(__name__)
# voc_to_coco's word for a JSON without its stamp, kept as it is (no void band)
KEPT_WITHOUT_VOID = "kept without void"


def cached_in_data_root(params: dict) -> dict:
    """``with_options`` for this stage's tasks: cache them (``tasks.caching``) with results in
    the dataset's own folder, so that deleting the data also drops the cache."""
    root = Path(params["data"].get("root") or METRICS_DIR)
    return stage_cache("prepare_data", root)


@task(name="prepare-dataset", retries=2, retry_delay_seconds=10)
def prepare(params: dict) -> dict:
    data = params["data"]
    if data["name"] == "custom":
        return {}
    root = Path(data["root"])
    archives = Path(data["archives_dir"]) if data.get("archives_dir") else None
    return prepare_dataset(
        data["name"],
        root,
        archives,
        Path(data.get("download_dir") or root.parent / "downloads"),
        synthetic=params.get("synthetic"),
    )


def conversion_stamp(annotation_json: Path) -> Path:
    """The file beside a converted split saying what it was written from and in which
    format (``writers.PREPARED_FORMAT``)."""
    return annotation_json.with_name(f".{annotation_json.stem}.voc_to_coco.json")


def _read_stamp(annotation_json: Path) -> dict | None:
    try:
        return json.loads(conversion_stamp(annotation_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


@task(name="voc-to-coco")
def voc_to_coco(params: dict) -> dict[str, str]:
    """Write VOC splits as COCO JSON (the format later stages read) where needed; per split,
    what was done: ``written``, ``up to date`` or ``KEPT_WITHOUT_VOID``.

    ``data.<split>_voc_split`` names the VOC split (``train_aug`` needs ``<root>/SBD``);
    ``file_name``s are relative to ``data.<split>_images``, which must hold the split's images
    (``<root>/VOC2012/JPEGImages``; every train_aug image is there). A split is rewritten when
    its stamp (``conversion_stamp``: format, VOC split, SBD or not) differs. A JSON without a
    stamp (written by hand, or before the void band was kept) is kept with a warning: the
    detector and attribution hashes cover its bytes, so rewriting it would redo their work.
    """
    root = Path(os.path.abspath(params["data"]["root"]))
    sbd = root / "SBD" if (root / "SBD").exists() else None
    done = {}
    for split in ("train", "val"):
        annotation_json, image_root = split_paths(params, split)
        voc_split = params["data"].get(f"{split}_voc_split", split)
        wanted = {"format": PREPARED_FORMAT, "voc_split": voc_split, "sbd": sbd is not None}
        stamp = conversion_stamp(annotation_json)
        if annotation_json.is_file() and not stamp.exists():
            logger.warning(
                "%s has no %s (written by hand or by a version before VOC's void band was "
                "kept): kept as it is, so GT label maps count void pixels as background. "
                "Delete it to rebuild it; the detector and attribution then run again.",
                annotation_json,
                stamp.name,
            )
            done[split] = KEPT_WITHOUT_VOID
            continue
        if annotation_json.is_file() and _read_stamp(annotation_json) == wanted:
            done[split] = "up to date"
            continue
        dataset = read_voc(root, voc_split, sbd_root=sbd)
        image_root = Path(os.path.abspath(image_root))
        for record in dataset.records:
            if not Path(record.path).is_relative_to(image_root):
                raise DataError(
                    f"data.{split}_images={image_root} does not hold "
                    f"{record.path} (VOC images are in <data.root>/VOC2012/JPEGImages)"
                )
        # The stale JSON goes first and the stamp comes before the new one: a kill anywhere
        # leaves a stamp without its JSON (rebuilt next time), never a stamp over a stale JSON.
        annotation_json.unlink(missing_ok=True)
        atomic_write_json(stamp, wanted)
        write_coco_json(annotation_json, dataset, image_root=image_root)
        done[split] = "written"
    return done


@task(name="summarise-splits")
def summarise(params: dict) -> dict:
    """Counts, skips and repairs per split; every image is decoded once (cached by size/mtime)."""
    workers = int(params["data"].get("verify_workers", 0))
    return {
        s: summarize_split(*split_paths(params, s), workers=workers, progress=True)
        for s in ("train", "val")
    }
