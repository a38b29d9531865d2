"""Committed pretrained detector weights: export (fp16, with a JSON record) and verification.

Why: users start from ImageNet or COCO weights; the embedded default cannot download any, so
the repository carries one detector trained on boxes of a larger synthetic set (the recipe is
``configs/pretrain_synthetic.yaml``). Stored in fp16 to stay small; `torch.nn.Module.
load_state_dict` casts it back to the model's dtype. The JSON beside it records the file's
sha256 so a damaged or swapped file is caught before it is fine-tuned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bbam.atomic import atomic_torch_save, atomic_write_text, file_sha256


def record_path(weights: str | Path) -> Path:
    """The JSON record that sits beside a weights file (``x.pt`` -> ``x.json``)."""
    return Path(weights).with_suffix(".json")


def export_fp16(
    state_dict: dict[str, torch.Tensor], path: str | Path, record: dict[str, Any]
) -> dict:
    """Write ``state_dict`` with floating tensors in fp16, then its JSON record (sha256 added)."""
    half = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
        for k, v in state_dict.items()
    }
    path = Path(path)
    atomic_torch_save(half, path)
    record = {
        **record,
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write_text(record_path(path), text)
    return json.loads(text)  # what a reader of the record gets (tuples become lists)


def verify_weights(path: str | Path) -> dict | None:
    """Check a weights file against its JSON record when one sits beside it.

    Returns the record (None when there is none: a user's own file); raises ValueError naming
    the file when the sha256 differs (a damaged, truncated or replaced file).
    """
    path = Path(path)
    rec_path = record_path(path)
    if not rec_path.is_file():
        return None
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{rec_path}: unreadable weights record ({exc})") from exc
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(expected, str):
        raise ValueError(f"{rec_path}: weights record has no sha256")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 {actual} does not match {expected} recorded in {rec_path} "
            "(damaged or replaced file; restore it from git or retrain with its recipe)"
        )
    return record
