"""The embedded default's pretraining recipe: a competent detector from boxes only.

``python -m flows.pretrain_detector --params configs/pretrain_synthetic.yaml [--out PATH]``

Generates the recipe's synthetic set (its own seed, so no image is shared with the demo's
train or val), trains the detector on its boxes (resumable: kill it and run it again) and
writes the whole-detector state_dict in fp16 with a JSON record (sha256, params hash, data
seed and size, box AP) to ``pretrained/detector_synthetic.pt``, which ``params.yaml`` points
``detector.weights`` at. Plain Python, no Prefect: it runs once, by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from bbam.data.prepare import prepare_dataset
from bbam.pretrained import export_fp16
from bbam.train_detector import train_detector
from bbam.training import MODEL_NAME
from flows.common import configure_runtime, load_checked
from tasks.detector_config import detector_config, detector_params_hash
from tasks.params import load_split, params_digest

DEFAULT_OUT = Path("pretrained/detector_synthetic.pt")
RUN_DIR = Path("runs/pretrain_detector")


def pretrain(params: dict, out: Path = DEFAULT_OUT, run_dir: Path = RUN_DIR) -> dict:
    """Generate, train (or resume), export. Returns the weights' JSON record."""
    data = params["data"]
    if data["name"] != "synthetic":
        raise SystemExit("the pretraining recipe generates its data: data.name must be synthetic")
    prepare_dataset(
        "synthetic", Path(data["root"]), None, Path("data/downloads"), synthetic=params["synthetic"]
    )
    config = detector_config(params)
    if config.weights is not None:
        raise SystemExit(
            "the pretraining recipe trains from scratch: detector.weights must be null"
        )
    train = load_split(params, "train", with_masks=False)
    val = load_split(params, "val", with_masks=False)
    digest = detector_params_hash(params, config)
    metrics = train_detector(train, val, run_dir, config, digest)
    saved = torch.load(run_dir / MODEL_NAME, map_location="cpu", weights_only=True)
    state = saved["model"] if "model" in saved else saved  # {"model", "meta"} or a state_dict
    record = {
        "recipe": "configs/pretrain_synthetic.yaml",
        "recipe_params_hash": params_digest(params["synthetic"], dataclasses.asdict(config)),
        "detector": {k: v for k, v in dataclasses.asdict(config).items() if k != "seed"},
        "classes": list(train.classes),
        "data_seed": int(params["synthetic"]["seed"]),
        "num_train_images": len(train.records),
        "num_val_images": len(val.records),
        "box_ap": metrics["box_ap"],
        "box_ap50": metrics["box_ap50"],
        "box_ap75": metrics["box_ap75"],
        "train_seconds": metrics["train_seconds"],
        "device": metrics["device"],
        "dtype": "float16",
    }
    return export_fp16(state, out, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="configs/pretrain_synthetic.yaml")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    args = parser.parse_args(argv)
    params = load_checked(args.params)
    configure_runtime(params)
    record = pretrain(params, args.out, args.run_dir)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
