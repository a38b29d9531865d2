"""Resuming a training from its checkpoint file, shared by the detector and both segmenters.

Why one place: a damaged or foreign checkpoint (truncated, garbage, another params hash,
states that do not fit) must restart the training with a warning naming the file, never
half-load a model or die with an unpickling error; an unreadable file (OSError) stops the
run instead, since the file itself may be fine.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from bbam.pretrained import verify_weights

logger = logging.getLogger(__name__)


def _short(exc: BaseException, last: bool = False) -> str:
    """First sentence of an exception (or its last line, `last`): torch's load errors run to
    paragraphs of advice (such as loading with weights_only=False) that is wrong for a
    damaged file, and name the actual problem only near the end."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if last:  # torch: "...Unsupported operand 0\n\nCheck the documentation of torch.load..."
        lines = [line for line in lines if not line.startswith("Check the documentation")][-1:]
    text = lines[0] if lines else ""
    text = text.split(". ")[0].rstrip(".:")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_weights(path: str | Path, what: str = "weights") -> Any:
    """``torch.load(path, weights_only=True)``, or ValueError naming the file and what it is.

    Why: torch's own message for a refused file ends by advising ``weights_only=False``,
    which runs whatever code the file holds; for a file refused as unsafe that is the wrong
    advice. A missing file raises FileNotFoundError, an unreadable one OSError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found (no downloads are attempted)")
    verify_weights(path)  # a file with a record beside it (committed weights) must match it
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        found = _refused_global(exc)
        if found is None:  # torch.save's pickle cut short or bytes that are no pickle at all
            raise ValueError(
                f"{path}: cannot read {what}: damaged (truncated?) or not a torch weights file "
                f"({_short(exc, last=True)}); replace it with an intact state_dict file saved "
                "with torch.save(model.state_dict(), path)"
            ) from exc
        raise ValueError(
            f"{path}: refused as {what}: the file holds the Python object {found} besides "
            "tensors (a whole model or optimizer object, or code); it was not loaded, since "
            "loading it could run code. Use a file saved with "
            "torch.save(model.state_dict(), path), or re-save a trusted one that way"
        ) from exc
    except Exception as exc:  # truncated, garbage, not a torch file at all
        raise ValueError(
            f"{path}: cannot read {what}: not a torch file or damaged (truncated?) "
            f"({_short(exc)}); replace it with an intact state_dict file"
        ) from exc


def _refused_global(exc: BaseException) -> str | None:
    """The class or function torch's weights-only unpickler refused (``posix.system``,
    ``torch.nn.Linear``), or None when it refused the bytes themselves (damage, garbage):
    only the former is a file that could run code, and the message says which it is."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def _backup(obj: Any) -> Any:
    """A copy of ``obj.state_dict()`` to roll back to (tensors copied to the CPU)."""
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach().to("cpu", copy=True) for k, v in obj.state_dict().items()}
    return copy.deepcopy(obj.state_dict())


def _load_states(ckpt: dict[str, Any], states: dict[str, Any]) -> None:
    """Load ``ckpt[key]`` into each object, all or none: a state that fails half-way
    (``load_state_dict`` copies what matches before it raises) rolls back the others."""
    loads = {key: obj for key, obj in states.items() if key in ckpt and ckpt[key]}
    backups = {key: _backup(obj) for key, obj in loads.items()}
    try:
        for key, obj in loads.items():
            obj.load_state_dict(ckpt[key])
    except Exception:
        for key, obj in loads.items():
            obj.load_state_dict(backups[key])
        raise


def resume_checkpoint(
    path: str | Path,
    phash: str,
    states: dict[str, Any],
    numbers: tuple[str, ...] = ("epoch",),
    optional: tuple[str, ...] = ("scaler",),
) -> tuple[dict[str, Any] | None, str]:
    """Load a training checkpoint into ``states`` (checkpoint key -> object with
    ``load_state_dict``) when it was made with ``phash``.

    Returns ``(checkpoint, "")`` when resumed, ``(None, "")`` when there is no file, and
    ``(None, reason)`` to start over, with a warning naming the file: made with another
    params hash, unreadable (truncated, garbage), not a checkpoint of ours (no params
    hash, missing keys), or states that do not fit the objects (left as they were). Such
    a file holds nothing to resume from; the first new checkpoint replaces it. A file
    that cannot be read at all (OSError: permissions, a lost mount) raises instead: it
    may be fine, and starting over would overwrite it. ``numbers`` must be numbers;
    ``optional`` states may be missing or empty (a scaler saved with AMP off).
    """
    path = Path(path)
    if not path.is_file():
        return None, ""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise OSError(
            f"{path}: cannot read the checkpoint ({_short(exc)}); "
            "fix it, or remove it to start this training over"
        ) from exc
    except Exception as exc:
        what = f"not a readable weights-only torch file ({_short(exc)})"
        return _start_over(path, what, "unreadable checkpoint")
    if not isinstance(ckpt, dict) or "params_hash" not in ckpt:
        return _start_over(path, "not a training checkpoint (no params_hash)", "not a checkpoint")
    if ckpt["params_hash"] != phash:
        logger.warning(
            "%s was made with params_hash %s, not %s: starting over",
            path,
            ckpt["params_hash"],
            phash,
        )
        return None, "params_hash changed"
    required = [key for key in states if key not in optional]
    missing = [key for key in required if not (isinstance(ckpt.get(key), dict) and ckpt[key])]
    missing += [key for key in numbers if not isinstance(ckpt.get(key), int | float)]
    if missing:
        return _start_over(path, f"a checkpoint without {missing}", "incomplete checkpoint")
    try:
        _load_states(ckpt, states)
    except Exception as exc:
        reason = f"states that do not fit the model ({_short(exc)})"
        return _start_over(path, reason, "checkpoint does not fit the model")
    return ckpt, ""


def _start_over(path: Path, what: str, reason: str) -> tuple[None, str]:
    logger.warning("%s: %s: starting over", path, what)
    return None, reason
