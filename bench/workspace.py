"""A tiny attribution workspace: synthetic data, an untrained detector and params.yaml.

bench/scale.py times the attribution shards on it and tests/test_scale_out.py runs them
through a real Prefect server; both need the same toy setup and differ only in the
``attribution`` settings, so the setup lives here once (tests load this file by path).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def make_attribution_workspace(
    root: Path,
    *,
    num_images: int,
    iterations: int,
    num_shards: int,
    chunk_size: int,
    attribution: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a workspace under ``root`` (the working directory of whoever runs the shards).

    ``num_images`` synthetic train images (plus 2 val), a seeded untrained resnet18 FPN
    detector at ``runs/detector/model.pt`` and ``params.yaml`` for the ``fast`` profile
    with ``iterations`` optimisation steps; ``attribution`` adds or overrides keys of the
    ``attribution`` section (e.g. dispatch settings). Returns the params written.
    """
    import torch

    from bbam.data.synthetic import SyntheticConfig, generate_synthetic
    from bbam.train_detector import DetectorTrainConfig, detector_from_config

    data = root / "data" / "synthetic"
    summary = generate_synthetic(
        data, SyntheticConfig(num_train=num_images, num_val=2, image_size=(64, 96), max_objects=2)
    )
    detector = {"arch": "resnet18_fpn", "min_size": 64, "max_size": 96}
    torch.manual_seed(0)
    model = detector_from_config(DetectorTrainConfig(**detector), len(summary["classes"]) + 1)
    (root / "runs" / "detector").mkdir(parents=True)
    torch.save(model.state_dict(), root / "runs" / "detector" / "model.pt")
    params = {
        "seed": 0,
        "device": "cpu",
        "torch_threads": 1,
        "data": {
            "train_json": str(data / "annotations" / "instances_train.json"),
            "train_images": str(data / "VOC2012" / "JPEGImages"),
            "val_json": str(data / "annotations" / "instances_val.json"),
            "val_images": str(data / "VOC2012" / "JPEGImages"),
        },
        "detector": detector,
        "attribution": {
            "split": "train",
            "profile": "fast",
            "overrides": {
                "iou_thresholds": [0.0],
                "positives_per_iter": 4,
                "num_jitters": 16,
                "iterations": iterations,
                "early_stop": False,
            },
            "num_shards": num_shards,
            "chunk_size": chunk_size,
            **(attribution or {}),
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return params
