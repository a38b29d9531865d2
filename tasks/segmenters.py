"""Prefect tasks: train one segmenter under one supervision (each resumes on its own)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from bbam.segmenters.instance import InstanceTrainConfig, train_instance
from bbam.segmenters.semantic import SemanticTrainConfig, train_semantic
from flows.common import load_params, load_split

PSEUDO_DIR = Path("runs/pseudo_labels")
SEGMENTERS_DIR = Path("runs/segmenters")


def instance_config(params: dict, supervision: str) -> InstanceTrainConfig:
    section = dict(params["segmenters"].get("instance") or {})
    section.setdefault("device", params.get("device", "auto"))
    section.setdefault("seed", int(params.get("seed", 0)))
    return InstanceTrainConfig(**section, supervision=supervision)


def semantic_config(params: dict, supervision: str) -> SemanticTrainConfig:
    section = dict(params["segmenters"].get("semantic") or {})
    section.setdefault("device", params.get("device", "auto"))
    section.setdefault("seed", int(params.get("seed", 0)))
    return SemanticTrainConfig(**section, supervision=supervision)


@task(name="train-instance-segmenter", retries=1, retry_delay_seconds=5, tags=["gpu"])
def train_instance_task(params_path: str, supervision: str) -> str:
    params = load_params(params_path)
    split = params["attribution"]["split"]
    dataset = load_split(params, split, with_masks=supervision == "full")
    out_dir = SEGMENTERS_DIR / f"instance_{supervision}"
    pseudo = PSEUDO_DIR / f"instances_{split}.json" if supervision == "bbam" else None
    train_instance(
        dataset.records, dataset.classes, out_dir, instance_config(params, supervision), pseudo
    )
    return str(out_dir / "model.pt")


@task(name="train-semantic-segmenter", retries=1, retry_delay_seconds=5, tags=["gpu"])
def train_semantic_task(params_path: str, supervision: str) -> str:
    params = load_params(params_path)
    split = params["attribution"]["split"]
    dataset = load_split(params, split, with_masks=supervision == "full")
    out_dir = SEGMENTERS_DIR / f"semantic_{supervision}"
    pseudo = PSEUDO_DIR / "semantic" if supervision == "bbam" else None
    train_semantic(
        dataset.records,
        dataset.classes,
        out_dir,
        semantic_config(params, supervision),
        pseudo_dir=pseudo,
    )
    return str(out_dir / "model.pt")
