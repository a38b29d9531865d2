"""Prefect task: train one segmenter (``instance`` Mask R-CNN or ``semantic`` DeepLabV3)
under one supervision; each resumes on its own. Also the ``segmenters`` section's builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import task

from bbam.segmenters.instance import InstanceTrainConfig, train_instance
from bbam.segmenters.semantic import SemanticTrainConfig, train_semantic
from tasks.caching import stage_cache
from tasks.params import PSEUDO_DIR, SEGMENTERS_DIR, load_split, top_level

Kind = Literal["instance", "semantic"]


@dataclass(frozen=True)
class _Segmenter:
    """What differs between the two kinds: the config class, the trainer, and where the
    pseudo labels of ``supervision: bbam`` are (the trainer's fifth argument)."""

    config: type
    train: Callable[..., Any]
    pseudo: Callable[[str], Path]


SEGMENTERS: dict[str, _Segmenter] = {
    "instance": _Segmenter(
        InstanceTrainConfig, train_instance, lambda split: PSEUDO_DIR / f"instances_{split}.json"
    ),
    "semantic": _Segmenter(
        SemanticTrainConfig, train_semantic, lambda split: PSEUDO_DIR / "semantic"
    ),
}


def segmenter_config(
    params: dict, kind: Kind, supervision: str
) -> InstanceTrainConfig | SemanticTrainConfig:
    """``segmenters.<kind>`` plus the top-level ``seed``/``device`` (the section's own wins)."""
    section = {**top_level(params), **(params["segmenters"].get(kind) or {})}
    return SEGMENTERS[kind].config(**section, supervision=supervision)


def instance_config(params: dict, supervision: str) -> InstanceTrainConfig:
    """`segmenter_config` of the Mask R-CNN (typed for the callers that need its fields)."""
    return segmenter_config(params, "instance", supervision)


def semantic_config(params: dict, supervision: str) -> SemanticTrainConfig:
    """`segmenter_config` of the DeepLabV3 (typed for the callers that need its fields)."""
    return segmenter_config(params, "semantic", supervision)


def segmenter_dir(kind: Kind, supervision: str) -> Path:
    """The run folder of one trained segmenter (model.pt, checkpoint.pt, train_log.jsonl)."""
    return SEGMENTERS_DIR / f"{kind}_{supervision}"


@task(
    name="train-segmenter",
    retries=1,
    retry_delay_seconds=5,
    tags=["gpu"],
    **stage_cache("train_segmenters", SEGMENTERS_DIR),
)
def train_segmenter(params: dict, kind: Kind, supervision: str) -> str:
    """Train (or resume) the ``kind`` segmenter on the labelled split under ``supervision``;
    returns its model.pt. Cached per (kind, supervision) on the stage's dvc.yaml inputs."""
    split = params["attribution"]["split"]
    dataset = load_split(params, split, with_masks=supervision == "full")
    out_dir = segmenter_dir(kind, supervision)
    pseudo = SEGMENTERS[kind].pseudo(split) if supervision == "bbam" else None
    config = segmenter_config(params, kind, supervision)
    SEGMENTERS[kind].train(dataset.records, dataset.classes, out_dir, config, pseudo)
    return str(out_dir / "model.pt")
