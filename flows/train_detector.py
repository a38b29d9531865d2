"""Stage 2: train the two-stage detector BBAM explains (resumes from its checkpoint).

``python -m flows.train_detector --params params.yaml``
"""

from __future__ import annotations

from prefect import flow

from bbam.atomic import atomic_write_json
from flows.common import metric_rows, publish_table, stage_cli
from tasks.detector import train
from tasks.params import METRICS_DIR

METRICS = METRICS_DIR / "detector.json"
ARTIFACT = "bbam-detector-metrics"


def detector_table(metrics: dict) -> list[dict]:
    """The detector's box AP on val (percent) and what it was trained on, for the UI."""
    percent = {k: round(100 * metrics[k], 2) for k in ("box_ap", "box_ap50", "box_ap75")}
    labels = {
        "box_ap": "box AP (val, %)",
        "box_ap50": "box AP50 (val, %)",
        "box_ap75": "box AP75 (val, %)",
        "epochs": "epochs",
        "num_train_images": "train images",
        "num_val_images": "val images",
        "train_seconds": "train seconds",
        "device": "device",
    }
    return metric_rows({**metrics, **percent}, labels)


@flow(name="train-detector")
def train_detector_flow(params: dict) -> dict:
    metrics = train(params)
    atomic_write_json(METRICS, metrics)
    publish_table(ARTIFACT, detector_table(metrics), f"Detector box AP on val ({METRICS}).")
    print(f"[bbam] train_detector: {metrics}")
    return metrics


if __name__ == "__main__":
    stage_cli("train_detector", train_detector_flow)
