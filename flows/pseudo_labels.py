"""Stage 4: refine attribution maps into pseudo ground truth.

``python -m flows.pseudo_labels --params params.yaml``

Writes ``runs/pseudo_labels/instances_<split>.json`` (COCO, RLE foreground + an
``ignore`` RLE per instance), ``semantic/<image_id>.png`` (VOC palette, 255 =
ignore) and a per-instance ``manifest.parquet``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import load_params, stage_cli, write_json
from tasks.pseudo_labels import make_pseudo_labels

ATTRIBUTION_DIR = Path("runs/attribution")
OUT_DIR = Path("runs/pseudo_labels")
METRICS = Path("metrics/pseudo_labels.json")


@flow(name="pseudo-labels")
def pseudo_labels_flow(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    summary = make_pseudo_labels(params_path, str(ATTRIBUTION_DIR), str(OUT_DIR))
    write_json(METRICS, summary)
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
