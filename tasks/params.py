"""params.yaml -> values: loading, split paths, digests and the run-folder layout.

Stage-neutral and Prefect-free. Each section's ``<section>_config(params)`` builder lives
beside the stage that owns it (``tasks.detector``, ``tasks.attribution``,
``tasks.pseudo_labels``, ``tasks.segmenters``); ``flows.common.stage_cli`` loads and checks
the file once per process and the flows pass the dict (or values) down.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from bbam.atomic import file_sha256  # noqa: F401  (re-exported: the stages hash their inputs)

# The run-folder layout (dvc.yaml names the same folders as stage outs).
DETECTOR_DIR = Path("runs/detector")
ATTRIBUTION_DIR = Path("runs/attribution")
PSEUDO_DIR = Path("runs/pseudo_labels")
SEGMENTERS_DIR = Path("runs/segmenters")
REPORTS_DIR = Path("reports")
METRICS_DIR = Path("metrics")
# In PSEUDO_DIR: BBAM beside the filled-box and GrabCut baselines, as the pseudo_labels stage
# scored them (``bbam.labeling.baseline_quality``); the evaluate report reads it.
BASELINES_NAME = "baselines.json"


def load_params(path: str | Path) -> dict:
    """The params file as a mapping; a SystemExit naming the file when it cannot be read."""
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


def params_digest(*sections: Any) -> str:
    """A stable digest of the params (and file digests) a result depends on."""
    blob = json.dumps(sections, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def split_paths(params: dict, split: str) -> tuple[Path, Path]:
    """(COCO instances JSON, image folder) of a split. Every stage reads data this way:
    the prepare stage writes COCO JSON for VOC too, so a custom COCO dataset is a
    first-class input."""
    data = params["data"]
    return Path(data[f"{split}_json"]), Path(data[f"{split}_images"])


def load_split(params: dict, split: str, with_masks: bool = True, drop_unreadable: bool = True):
    """A split, by default without the images prepare_data found unreadable or that are gone
    (counted in `skipped`); attribution keeps them (``drop_unreadable=False``) so each of
    their instances gets a skipped manifest row naming the file."""
    from bbam.data.coco import read_coco
    from bbam.data.verify import drop_unreadable as drop

    annotation_json, image_root = split_paths(params, split)
    dataset = read_coco(annotation_json, image_root, with_masks=with_masks)
    return drop(dataset) if drop_unreadable else dataset


def top_level(params: dict) -> dict:
    """``seed`` and ``device``: the top-level knobs every stage's config takes the same way
    (a section's own value wins; see each ``<section>_config``)."""
    return {"seed": int(params.get("seed", 0)), "device": str(params.get("device", "auto"))}
