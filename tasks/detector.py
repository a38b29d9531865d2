"""Prefect task of the train_detector stage, and the ``detector`` section's builder."""

from __future__ import annotations

import torch
from prefect import task

from bbam.detector import freeze
from bbam.train_detector import detector_from_config, train_detector
from tasks.caching import stage_cache
from tasks.detector_config import detector_config, detector_params_hash
from tasks.params import (
    DETECTOR_DIR,
    load_split,
)


def load_detector_from_params(params: dict, num_classes: int, device: torch.device):
    """The trained detector of the train_detector stage, frozen, on ``device``."""
    model_path = DETECTOR_DIR / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no trained detector; run the train_detector stage")
    model = detector_from_config(detector_config(params), num_classes, weights=model_path)
    return freeze(model.to(device))


@task(
    name="train-detector",
    retries=1,
    retry_delay_seconds=5,
    tags=["gpu"],
    **stage_cache("train_detector", DETECTOR_DIR),
)
def train(params: dict) -> dict:
    config = detector_config(params)
    # Boxes only: decoding every GT mask would cost memory at COCO scale for nothing.
    train_split = load_split(params, "train", with_masks=False)
    val_split = load_split(params, "val", with_masks=False)
    digest = detector_params_hash(params, config)
    return train_detector(train_split, val_split, DETECTOR_DIR, config, digest)
