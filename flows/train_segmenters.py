"""Stage 5: Mask R-CNN and the semantic segmenter (DeepLabV3 or semantic FPN) under each
supervision in ``segmenters.supervisions`` (``full`` = GT masks, the upper bound; ``bbam`` =
our pseudo labels; ``box`` = filled boxes).

``python -m flows.train_segmenters --params params.yaml``
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import flow

from bbam.segmenters.semantic import HEADS, SemanticTrainConfig
from bbam.training import LOG_NAME
from flows.common import publish_table, stage_cli
from tasks.segmenters import SEGMENTERS, train_segmenter

ARTIFACT = "bbam-segmenter-training"
logger = logging.getLogger(__name__)


def network_names(params: dict) -> dict[str, str]:
    """Table names of the two networks; the semantic one follows ``segmenters.semantic.head``."""
    head = (params["segmenters"].get("semantic") or {}).get("head", SemanticTrainConfig.head)
    return {"instance": "Mask R-CNN", "semantic": HEADS.get(head, head)}


def _log_records(log: Path) -> list[dict]:
    """The records of a training log, without its torn lines (a run that died mid-write),
    each left out with a warning naming the file: they cannot fail the stage after every
    model is trained, as they would on every re-run (the trained models are cached)."""
    if not log.is_file():
        return []
    records = []
    text = log.read_text(encoding="utf-8", errors="replace")  # a torn write may cut a byte
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            logger.warning("%s line %d: not a JSON record (torn write?); left out", log, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def training_table(models: dict[str, str], networks: dict[str, str]) -> list[dict]:
    """Per trained model (``<kind>_<supervision>`` -> model.pt), the last logged step of its
    ``train_log.jsonl``: a diverged or untrained model shows in the UI before evaluate runs."""
    rows = []
    for name, model in models.items():
        kind, _, supervision = name.partition("_")
        log = Path(model).parent / LOG_NAME
        steps = [r for r in _log_records(log) if "loss" in r]
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
