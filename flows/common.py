"""What every stage's CLI shares: params, hashes, dataset paths, Prefect's home."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_params(path: str | Path) -> dict:
    """The params mapping, or SystemExit naming the file and what is wrong with it."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SystemExit(f"{path}: params file not found") from exc
    except IsADirectoryError as exc:
        raise SystemExit(f"{path}: is a directory, not a params file") from exc
    except UnicodeDecodeError as exc:
        raise SystemExit(f"{path}: not UTF-8 text ({exc}); save the params file as UTF-8") from exc
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read the params file ({exc})") from exc
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise SystemExit(f"{path}: expected a mapping at the top level")
    return params


def params_hash(*sections: Any) -> str:
    """A stable digest of the params (and digests) a result depends on."""
    blob = json.dumps(sections, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_paths(params: dict, split: str) -> tuple[Path, Path]:
    """(COCO instances JSON, image folder) of a split. Every stage reads data this way:
    the prepare stage writes COCO JSON for VOC too, so a custom COCO dataset is a
    first-class input."""
    data = params["data"]
    return Path(data[f"{split}_json"]), Path(data[f"{split}_images"])


def load_split(params: dict, split: str, with_masks: bool = True):
    """A split without the images prepare_data found unreadable (counted in `skipped`)."""
    from bbam.data.coco import read_coco
    from bbam.data.verify import drop_unreadable

    annotation_json, image_root = split_paths(params, split)
    return drop_unreadable(read_coco(annotation_json, image_root, with_masks=with_masks))


def configure_runtime(params: dict) -> None:
    """Torch threads from params (0 keeps torch's default)."""
    import torch

    threads = int(params.get("torch_threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def write_json(path: str | Path, obj: Any) -> None:
    from bbam.atomic import atomic_write_json

    atomic_write_json(path, obj)


def stage_cli(description: str, flow_fn: Callable[..., Any], extra: Callable | None = None) -> None:
    """Parse ``--params``, check them, run the flow, exit non-zero on any failure."""
    from flows.params_schema import check_params

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    params = load_params(args.params)
    check_params(params, args.params)
    configure_runtime(params)
    kwargs = {k: v for k, v in vars(args).items() if k != "params"}
    try:
        flow_fn(params_path=str(args.params), **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the flow already logged the traceback
        print(f"[bbam] {description}: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


def detector_config(params: dict):
    from bbam.train_detector import DetectorTrainConfig

    section = {k: v for k, v in params["detector"].items()}
    return DetectorTrainConfig(**section, seed=int(params.get("seed", 0)))


def refine_config(params: dict):
    """The pseudo-label stage's refinement settings (also what the benches measure)."""
    from bbam.refine import RefineConfig

    return RefineConfig(**(params.get("refine") or {}))


def proposal_config(params: dict):
    """(MCGConfig, directory of MCG .mat files or None) of the ``proposals`` section."""
    from bbam.mcg import MCGConfig

    section = dict(params.get("proposals") or {})
    mcg_dir = section.pop("mcg_dir", None)
    return MCGConfig(**section), mcg_dir


DETECTOR_DIR = Path("runs/detector")


def detector_params_hash(params: dict, config) -> str:
    """What a trained detector depends on: its resolved config and the train annotations."""
    import dataclasses

    return params_hash(dataclasses.asdict(config), file_sha256(split_paths(params, "train")[0]))


def load_detector_from_params(params: dict, num_classes: int, device):
    """The trained detector of the train_detector stage, frozen, on ``device``."""
    from bbam.detector import freeze
    from bbam.train_detector import detector_from_config

    model_path = DETECTOR_DIR / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no trained detector; run the train_detector stage")
    model = detector_from_config(detector_config(params), num_classes, weights=model_path)
    return freeze(model.to(device))
