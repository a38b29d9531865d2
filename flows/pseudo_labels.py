"""Stage 4: refine attribution maps into pseudo ground truth.

``python -m flows.pseudo_labels --params params.yaml``

Writes ``runs/pseudo_labels/instances_<split>.json`` (COCO, RLE foreground + an
``ignore`` RLE per instance), ``semantic/<image_id>.png`` (VOC palette, 255 =
ignore) and a per-instance ``manifest.parquet``.
"""

from __future__ import annotations

from prefect import flow

from bbam.atomic import atomic_write_json
from flows.common import stage_cli
from tasks.params import ATTRIBUTION_DIR, METRICS_DIR, PSEUDO_DIR
from tasks.pseudo_labels import make_pseudo_labels

METRICS = METRICS_DIR / "pseudo_labels.json"


@flow(name="pseudo-labels")
def pseudo_labels_flow(params: dict) -> dict:
    summary = make_pseudo_labels(params, str(ATTRIBUTION_DIR), str(PSEUDO_DIR))
    atomic_write_json(METRICS, summary)
    print(
        f"[bbam] pseudo_labels: {summary['instances']} instances, "
        f"mean IoU vs GT {summary['mean_instance_iou_vs_gt']}, fallbacks {summary['fallbacks']}, "
        f"unreadable images {len(summary['image_errors'])}"
    )
    limit = float(params["attribution"].get("max_failure_fraction", 0.05))
    if len(summary["image_errors"]) > limit * max(1, summary["images"]):
        raise RuntimeError(
            f"{len(summary['image_errors'])} images could not be labelled; see {METRICS}"
        )
    return summary


if __name__ == "__main__":
    stage_cli("pseudo_labels", pseudo_labels_flow)
