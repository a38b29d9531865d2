"""Stage 4: refine attribution maps into pseudo ground truth.

``python -m flows.pseudo_labels --params params.yaml``

Writes ``runs/pseudo_labels/instances_<split>.json`` (COCO, RLE foreground + an
``ignore`` RLE per instance), ``semantic/<image_id>.png`` (VOC palette, 255 =
ignore) and a per-instance ``manifest.parquet``.
"""

from __future__ import annotations

from prefect import flow

from bbam.atomic import atomic_write_json
from flows.common import publish_table, stage_cli
from tasks.params import ATTRIBUTION_DIR, METRICS_DIR, PSEUDO_DIR
from tasks.pseudo_labels import make_pseudo_labels

METRICS = METRICS_DIR / "pseudo_labels.json"
ARTIFACT = "bbam-pseudo-label-quality"
METHODS = {
    "bbam": "mean_instance_iou_vs_gt",
    "grabcut (baseline)": "mean_instance_iou_grabcut",
    "filled box (baseline)": "mean_instance_iou_box",
}


def quality_table(summary: dict) -> list[dict]:
    """Mean instance IoU vs GT of the BBAM pseudo masks beside the box-only baselines on the
    same instances: the one comparison that says whether attribution earned its cost."""
    return [
        {
            "masks": name,
            "mean instance IoU vs GT (%)": summary.get(key),
            "instances": summary["instances"],
        }
        for name, key in METHODS.items()
    ]


@flow(name="pseudo-labels")
def pseudo_labels_flow(params: dict) -> dict:
    summary = make_pseudo_labels(params, str(ATTRIBUTION_DIR), str(PSEUDO_DIR))
    atomic_write_json(METRICS, summary)
    publish_table(
        ARTIFACT,
        quality_table(summary),
        f"Pseudo-label quality vs GT ({METRICS}); maps by attribution status "
        f"{summary['attribution_status']}, fallbacks {summary['fallbacks']}, empty foreground "
        f"{summary['empty_fg']}, images that failed {len(summary['image_errors'])}.",
    )
    print(
        f"[bbam] pseudo_labels: {summary['instances']} instances, "
        f"mean IoU vs GT {summary['mean_instance_iou_vs_gt']}, fallbacks {summary['fallbacks']}, "
        f"images that failed {len(summary['image_errors'])}"
    )
    limit = float(params["attribution"].get("max_failure_fraction", 0.05))
    if len(summary["image_errors"]) > limit * max(1, summary["images"]):
        raise RuntimeError(
            f"{len(summary['image_errors'])} images could not be labelled; see {METRICS}"
        )
    return summary


if __name__ == "__main__":
    stage_cli("pseudo_labels", pseudo_labels_flow)
