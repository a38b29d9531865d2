"""The whole pipeline as one Prefect flow: the same stages ``dvc repro`` runs, in order.

``python -m flows.pipeline --params params.yaml``

Running this again after a crash keeps what finished: a stage that completed is cached
(``tasks/caching.py``), attribution resumes per instance from its shard manifests, the
trainings per epoch from their checkpoints and downloads from their partial files; the
rest of data preparation, pseudo labels and evaluation run again from their start. Use
``dvc repro`` to also skip stages whose inputs did not change.
"""

from __future__ import annotations

from prefect import flow

from flows.attribute import attribute
from flows.common import stage_cli
from flows.evaluate import evaluate_flow
from flows.prepare_data import prepare_data
from flows.pseudo_labels import pseudo_labels_flow
from flows.show_metrics import show_metrics
from flows.train_detector import train_detector_flow
from flows.train_segmenters import train_segmenters_flow


@flow(name="bbam-pipeline")
def pipeline(params: dict, params_path: str = "params.yaml") -> dict:
    prepare_data(params)
    train_detector_flow(params)
    attribute(params, params_path)
    pseudo_labels_flow(params)
    train_segmenters_flow(params)
    metrics = evaluate_flow(params)
    show_metrics()
    return metrics


if __name__ == "__main__":
    stage_cli("pipeline", pipeline)
