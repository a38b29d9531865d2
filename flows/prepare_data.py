"""Stage 1: get the data where the readers expect it and summarise it.

``python -m flows.prepare_data --params params.yaml``

- ``synthetic``: generate the embedded default dataset (no network).
- ``voc`` / ``coco``: download (or take from ``data.archives_dir``), verify, extract,
  lay out; VOC (train_aug + SBD) is also written as COCO JSON, the format every
  later stage reads.
- ``custom``: your own COCO files, used as they are; only summarised.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task

from flows.common import load_params, split_paths, stage_cli, write_json

METRICS = Path("metrics/data.json")


@task(name="prepare-dataset", retries=2, retry_delay_seconds=10)
def prepare(params_path: str) -> dict:
    from bbam.data.prepare import prepare_dataset

    params = load_params(params_path)
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


@task(name="voc-to-coco")
def voc_to_coco(params_path: str) -> None:
    """Write VOC splits as COCO JSON (the format later stages read), unless present.

    ``data.<split>_voc_split`` names the VOC split (``train_aug`` needs ``<root>/SBD``);
    ``file_name``s are relative to ``data.<split>_images``, which must hold the split's images
    (``<root>/VOC2012/JPEGImages``; every train_aug image is there).
    """
    from bbam.data.records import DataError
    from bbam.data.voc import read_voc
    from bbam.data.writers import write_coco_json

    params = load_params(params_path)
    root = Path(os.path.abspath(params["data"]["root"]))
    sbd = root / "SBD" if (root / "SBD").exists() else None
    for split in ("train", "val"):
        annotation_json, image_root = split_paths(params, split)
        if annotation_json.exists():
            continue
        voc_split = params["data"].get(f"{split}_voc_split", split)
        dataset = read_voc(root, voc_split, sbd_root=sbd)
        image_root = Path(os.path.abspath(image_root))
        for record in dataset.records:
            if not Path(record.path).is_relative_to(image_root):
                raise DataError(
                    f"{params_path}: data.{split}_images={image_root} does not hold "
                    f"{record.path} (VOC images are in <data.root>/VOC2012/JPEGImages)"
                )
        write_coco_json(annotation_json, dataset, image_root=image_root)


@task(name="summarise-splits")
def summarise(params_path: str) -> dict:
    """Counts, skips and repairs per split; every image is decoded once (cached)."""
    from bbam.data.prepare import summarize_split

    params = load_params(params_path)
    workers = int(params["data"].get("verify_workers", 0))
    return {
        s: summarize_split(*split_paths(params, s), workers=workers, progress=True)
        for s in ("train", "val")
    }


@flow(name="prepare-data")
def prepare_data(params_path: str = "params.yaml") -> dict:
    """Prepare, summarise and verify; fails when a split has too many unreadable images."""
    from bbam.data.prepare import summary_line
    from bbam.data.records import DataError
    from bbam.data.verify import unreadable_limit_error, unreadable_limits

    params = load_params(params_path)
    prepare(params_path)
    if params["data"]["name"] == "voc":
        voc_to_coco(params_path)
    summary = summarise(params_path)
    write_json(METRICS, summary)
    print(
        "[bbam] prepare_data: " + "; ".join(f"{s}: {summary_line(v)}" for s, v in summary.items())
    )
    if error := unreadable_limit_error(summary, unreadable_limits(params["data"])):
        raise DataError(error)
    return summary


if __name__ == "__main__":
    stage_cli("prepare_data", prepare_data)
