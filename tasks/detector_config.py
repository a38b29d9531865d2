"""The ``detector`` section as the library's DetectorTrainConfig, and what a trained detector
depends on.

No Prefect here: the pretraining flow, the benches and the GPU check (whose machine has no
Prefect) build the detector as the train_detector stage does.
"""

from __future__ import annotations

from bbam import training as T
from bbam.train_detector import DetectorTrainConfig
from tasks.params import file_sha256, params_digest, split_paths, top_level


def detector_config(params: dict) -> DetectorTrainConfig:
    """``detector`` plus the top-level ``seed``/``device`` (the section's own value wins)."""
    return DetectorTrainConfig(**{**top_level(params), **params["detector"]})


def detector_params_hash(params: dict, config: DetectorTrainConfig) -> str:
    """What a trained detector depends on: its resolved config, the bytes of the weights it
    starts from and the train annotations (a replaced weights file at the same path is a new
    run, not a resume)."""
    start = [file_sha256(w) for w in (config.weights, config.weights_backbone) if w]
    # as the segmenters' `params_hash`: another device or worker count, or more epochs,
    # continues the checkpoint
    fields = {k: v for k, v in T.hashed_config(config).items() if k not in T.RESUMABLE}
    return params_digest(fields, *start, file_sha256(split_paths(params, "train")[0]))
