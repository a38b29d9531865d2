"""Stage 5: Mask R-CNN and the semantic segmenter (DeepLabV3 or semantic FPN) under each
supervision in ``segmenters.supervisions`` (``full`` = GT masks, the upper bound; ``bbam`` =
our pseudo labels; ``box`` = filled boxes).

``python -m flows.train_segmenters --params params.yaml``
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from bbam.segmenters.semantic import HEADS, SemanticTrainConfig
from bbam.training import LOG_NAME
from flows.common import publish_table, stage_cli
from tasks.segmenters import SEGMENTERS, train_segmenter

ARTIFACT = "bbam-segmenter-training"


def network_names(params: dict) -> dict[str, str]:
    """Table names of the two networks; the semantic one follows ``segmenters.semantic.head``."""
    head = (params["segmenters"].get("semantic") or {}).get("head", SemanticTrainConfig.head)
    return {"instance": "Mask R-CNN", "semantic": HEADS.get(head, head)}


def training_table(models: dict[str, str], networks: dict[str, str]) -> list[dict]:
    """Per trained model (``<kind>_<supervision>`` -> model.pt), the last logged step of its
    ``train_log.jsonl``: a diverged or untrained model shows in the UI before evaluate runs."""
    rows = []
    for name, model in models.items():
        kind, _, supervision = name.partition("_")
        log = Path(model).parent / LOG_NAME
        lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
        steps = [r for r in map(json.loads, filter(None, lines)) if "loss" in r]
        last = steps[-1] if steps else {}
        rows.append(
            {
                "model": networks.get(kind, kind),
                "supervision": supervision,
                "epochs": last["epoch"] + 1 if last else None,
                "last logged loss": last.get("loss"),
                "weights": str(model),
            }
        )
    return rows


@flow(name="train-segmenters")
def train_segmenters_flow(params: dict) -> dict:
    models = {}
    for supervision in params["segmenters"]["supervisions"]:
        for kind in SEGMENTERS:  # instance, then semantic
            models[f"{kind}_{supervision}"] = train_segmenter(params, kind, supervision)
    print(f"[bbam] train_segmenters: {len(models)} models: {', '.join(models)}")
    publish_table(
        ARTIFACT,
        training_table(models, network_names(params)),
        "Segmenters trained (last logged training step; scores come with the evaluate stage).",
    )
    return models


if __name__ == "__main__":
    stage_cli("train_segmenters", train_segmenters_flow)
