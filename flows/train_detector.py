"""Stage 2: train the two-stage detector BBAM explains (resumes from its checkpoint).

``python -m flows.train_detector --params params.yaml``
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import (
    DETECTOR_DIR,
    detector_config,
    detector_params_hash,
    load_params,
    load_split,
    stage_cli,
    write_json,
)

METRICS = Path("metrics/detector.json")


@task(name="train-detector", retries=1, retry_delay_seconds=5, tags=["gpu"])
def train(params_path: str) -> dict:
    from bbam.train_detector import train_detector

    params = load_params(params_path)
    config = detector_config(params)
    # Boxes only: decoding every GT mask would cost memory at COCO scale for nothing.
    train_split = load_split(params, "train", with_masks=False)
    val_split = load_split(params, "val", with_masks=False)
    digest = detector_params_hash(params, config)
    return train_detector(train_split, val_split, DETECTOR_DIR, config, digest)


@flow(name="train-detector")
def train_detector_flow(params_path: str = "params.yaml") -> dict:
    metrics = train(params_path)
    write_json(METRICS, metrics)
    print(f"[bbam] train_detector: {metrics}")
    return metrics


if __name__ == "__main__":
    stage_cli("train_detector", train_detector_flow)
