"""Stage 1: get the data where the readers expect it and summarise it.

``python -m flows.prepare_data --params params.yaml``

- ``synthetic``: generate the embedded default dataset (no network).
- ``voc`` / ``coco``: download (or take from ``data.archives_dir``), verify, extract,
  lay out; VOC (train_aug + SBD) is also written as COCO JSON, the format every
  later stage reads.
- ``custom``: your own COCO files, used as they are; only summarised.
"""

from __future__ import annotations

from prefect import flow

from bbam.atomic import atomic_write_json
from bbam.data.prepare import summary_line
from bbam.data.records import DataError
from bbam.data.verify import unreadable_limit_error, unreadable_limits
from flows.common import publish_table, stage_cli
from tasks.params import METRICS_DIR, split_paths
from tasks.prepare_data import (
    KEPT_WITHOUT_VOID,
    cached_in_data_root,
    prepare,
    summarise,
    voc_to_coco,
)

METRICS = METRICS_DIR / "data.json"
ARTIFACT = "bbam-data"


def data_table(summary: dict) -> list[dict]:
    """Per split: images, instances, and how many the readers skipped or repaired."""
    return [
        {
            "split": split,
            "images": s["images"],
            "instances": s["instances"],
            "skipped": sum((s.get("skipped") or {}).values()),
            "repaired": sum((s.get("repaired") or {}).values()),
        }
        for split, s in summary.items()
    ]


@flow(name="prepare-data")
def prepare_data(params: dict) -> dict:
    """Prepare, summarise and verify; fails when a split has too many unreadable images."""
    cached = cached_in_data_root(params)
    prepare.with_options(**cached)(params)
    if params["data"]["name"] == "voc":
        converted = voc_to_coco.with_options(**cached)(params)
        for split in (s for s, done in converted.items() if done == KEPT_WITHOUT_VOID):
            print(
                f"[bbam] prepare_data: {split}: {split_paths(params, split)[0]} kept as an "
                "older version wrote it, without VOC's void band (delete it to rebuild)"
            )
    summary = summarise(params)  # not cached: it re-verifies the images (quick: size/mtime cache)
    atomic_write_json(METRICS, summary)
    publish_table(  # before the unreadable-image check: a failed run shows the counts
        ARTIFACT,
        data_table(summary),
        f"The dataset per split ({METRICS}; reasons per count there).",
    )
    print(
        "[bbam] prepare_data: " + "; ".join(f"{s}: {summary_line(v)}" for s, v in summary.items())
    )
    if error := unreadable_limit_error(summary, unreadable_limits(params["data"])):
        raise DataError(error)
    return summary


if __name__ == "__main__":
    stage_cli("prepare_data", prepare_data)
