"""Environment for a pipeline subprocess in a throwaway project: this venv's tools first, the
project's own code on the path, and DVC and Prefect state kept inside the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"),
        BBAM_PREFECT_HOME=str(project / ".prefect"),
        PYTHONPATH=str(project),
        OMP_NUM_THREADS="1",
    )
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    return env


def custom_data_params(num_shards: int, chunk_size: int, iterations: int) -> dict:
    """The repo's params.yaml for a tiny custom COCO dataset under mydata/, set so that every
    stage runs in seconds: the detector keeps its random initialisation (lr 0) and the IoU
    cascade [0.0] still finds positives; the segmenters run 2 iterations."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["torch_threads"] = 1
    params["data"] = {
        "name": "custom",
        "root": "mydata",
        "archives_dir": None,
        "train_json": "mydata/annotations/instances_train.json",
        "train_images": "mydata/images/train",
        "val_json": "mydata/annotations/instances_val.json",
        "val_images": "mydata/images/val",
    }
    params["detector"].update(
        epochs=1, min_size=64, max_size=96, lr=0.0, warmup_iters=1, lr_steps=[1], batch_size=4
    )
    params["attribution"].update(
        num_shards=num_shards,
        chunk_size=chunk_size,
        overrides={
            "iou_thresholds": [0.0],
            "iterations": iterations,
            "early_stop": False,
            "num_jitters": 32,
            "positives_per_iter": 4,
        },
    )
    params["segmenters"] = {
        "supervisions": ["full", "bbam"],
        "instance": {"epochs": 1, "min_size": 64, "max_size": 96, "max_iters_per_epoch": 2},
        "semantic": {"epochs": 1, "max_iters_per_epoch": 2},
    }
    params["evaluate"] = {"report_samples": 2}
    return params
