"""Prefect tasks: train one segmenter under one supervision (each resumes on its own)."""

from __future__ import annotations

from prefect import task

from bbam.segmenters.instance import InstanceTrainConfig, train_instance
from bbam.segmenters.semantic import SemanticTrainConfig, train_semantic
from tasks.caching import stage_cache
from tasks.params import PSEUDO_DIR, SEGMENTERS_DIR, load_split, top_level


def _section(params: dict, name: str) -> dict:
    """``segmenters.<name>`` plus the top-level ``seed``/``device`` (the section's own wins)."""
    return {**top_level(params), **(params["segmenters"].get(name) or {})}


def instance_config(params: dict, supervision: str) -> InstanceTrainConfig:
    return InstanceTrainConfig(**_section(params, "instance"), supervision=supervision)


def semantic_config(params: dict, supervision: str) -> SemanticTrainConfig:
    return SemanticTrainConfig(**_section(params, "semantic"), supervision=supervision)


@task(
    name="train-instance-segmenter",
    retries=1,
    retry_delay_seconds=5,
    tags=["gpu"],
    **stage_cache("train_segmenters", SEGMENTERS_DIR),
)
def train_instance_task(params: dict, supervision: str) -> str:
    split = params["attribution"]["split"]
    dataset = load_split(params, split, with_masks=supervision == "full")
    out_dir = SEGMENTERS_DIR / f"instance_{supervision}"
    pseudo = PSEUDO_DIR / f"instances_{split}.json" if supervision == "bbam" else None
    train_instance(
        dataset.records, dataset.classes, out_dir, instance_config(params, supervision), pseudo
    )
    return str(out_dir / "model.pt")


@task(
    name="train-semantic-segmenter",
    retries=1,
    retry_delay_seconds=5,
    tags=["gpu"],
    **stage_cache("train_segmenters", SEGMENTERS_DIR),
)
def train_semantic_task(params: dict, supervision: str) -> str:
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
