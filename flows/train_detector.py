"""Stage 2: train the two-stage detector BBAM explains (resumes from its checkpoint).

``python -m flows.train_detector --params params.yaml``
"""

from __future__ import annotations

from prefect import flow

from bbam.atomic import atomic_write_json
from flows.common import stage_cli
from tasks.detector import train
from tasks.params import METRICS_DIR

METRICS = METRICS_DIR / "detector.json"


@flow(name="train-detector")
def train_detector_flow(params: dict) -> dict:
    metrics = train(params)
    atomic_write_json(METRICS, metrics)
    print(f"[bbam] train_detector: {metrics}")
    return metrics


if __name__ == "__main__":
    stage_cli("train_detector", train_detector_flow)
