"""Check a params file before a stage runs.

Why: most sections are read with ``dict.get`` and defaults, so a misspelt key (``num_shard``)
or a value YAML reads as text (``1e-4`` is a string in YAML 1.1) would silently run with the
default or fail deep inside a stage. Every stage CLI calls `check_params` once; each error
names the file and the dotted key. Sections are checked only when present (a partial params
file is fine for a stage that needs part of it); the config sections are validated by the same
builders the stages call, so their own range checks apply too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bbam.attribution import AttributionConfig
from bbam.data.synthetic import SyntheticConfig
from bbam.device import DEVICE_NAMES, check_device
from bbam.mcg import MCGConfig
from bbam.refine import RefineConfig
from bbam.segmenters.instance import InstanceTrainConfig
from bbam.segmenters.semantic import SemanticTrainConfig
from bbam.segmenters.targets import SUPERVISIONS
from bbam.train_detector import DetectorTrainConfig
from tasks.attribution_config import engine_config
from tasks.deployments import DispatchConfig
from tasks.detector_config import detector_config
from tasks.pseudo_label_config import proposal_config, refine_config
from tasks.segmenters import instance_config, semantic_config

DATA_NAMES = ("synthetic", "voc", "coco", "custom")
EXECUTORS = ("local", "deployments")

TOP_LEVEL: dict[str, type] = {  # each mapping is checked by its own section check
    "seed": int,
    "device": str,
    "torch_threads": int,
    "data": dict,
    "synthetic": dict,
    "detector": dict,
    "attribution": dict,
    "refine": dict,
    "proposals": dict,
    "pseudo_labels": dict,
    "segmenters": dict,
    "evaluate": dict,
}
DATA_KEYS: dict[str, Any] = {
    "name": str,
    "root": str,
    "archives_dir": str | None,
    "download_dir": str | None,
    "train_json": str,
    "train_images": str,
    "val_json": str,
    "val_images": str,
    "train_voc_split": str,
    "val_voc_split": str,
    "max_unreadable_train": float,
    "max_unreadable_val": float,
    "verify_workers": int,
}
ATTRIBUTION_KEYS: dict[str, Any] = {
    "split": str,
    "profile": str,
    "overrides": dict | None,
    "num_shards": int,
    "concurrent_shards": int,
    "chunk_size": int,
    "max_attempts": int,
    "max_failure_fraction": float,
    "executor": str,
    "deployment": str,
    "max_dispatch_attempts": int,
    "lost_after_s": float,
    "heartbeat_s": float,
    "dispatch_poll_s": float,
    "dispatch_timeout_s": float,
    "gpu_concurrency_limit": str | None,
}
SEGMENTER_KEYS: dict[str, Any] = {"supervisions": list, "instance": dict, "semantic": dict}
EVALUATE_KEYS: dict[str, Any] = {"report_samples": int}
PSEUDO_LABEL_KEYS: dict[str, Any] = {"workers": int, "baselines": bool}


class ParamsError(SystemExit):
    """Invalid params; a SystemExit so a stage CLI prints it and exits non-zero."""


def _matches(value: Any, hint: Any) -> bool:
    """Does a YAML value fit a type hint? Unknown hints pass (the config checks them)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(value) == len(args) and all(map(_matches, value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    name = getattr(hint, "__name__", None)
    return name if name and typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` hint (possibly inside a union) allows."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(hint) for c in _literal_choices(arg))
    return ()


def _value_problem(value: Any, hint: Any) -> str | None:
    if _matches(value, hint):
        return None
    problem = f"expected {_describe(hint)}, got {type(value).__name__} {value!r}"
    choices = [c for c in _literal_choices(hint) if isinstance(c, str)]
    if isinstance(value, str) and (close := difflib.get_close_matches(value, choices, n=1)):
        return f"{problem}; did you mean {close[0]!r}?"
    if isinstance(value, str) and _matches(1.0, hint):
        try:
            float(value)
        except ValueError:
            return problem
        problem += " (YAML reads a number like 1e-4 as text: write 1.0e-4)"
    return problem


def _closest(key: str, known: list[str]) -> str | None:
    """The known key a misspelt one most likely means: one with the same words in another
    order or with words added (``backbone_weights`` -> ``weights_backbone``,
    ``trainable_layers`` -> ``trainable_backbone_layers``), else the closest spelling."""
    words = set(key.split("_"))
    same_words = [k for k in known if words <= set(k.split("_"))]
    if same_words:
        return min(same_words, key=lambda k: len(k.split("_")))
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def _check_keys(section: Any, where: str, hints: dict[str, Any]) -> list[str]:
    """Unknown keys (with the closest known one) and values of the wrong type; `where` is the
    dotted path of `section` ("" for the top level)."""
    if not isinstance(section, dict):
        return [f"{where}: expected a mapping, got {type(section).__name__} {section!r}"]
    errors = []
    for key, value in section.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = _closest(str(key), list(hints))
            hint = f"; did you mean {close!r}?" if close else f"; known: {', '.join(hints)}"
            errors.append(f"{name}: unknown key{hint}")
        elif (problem := _value_problem(value, hints[key])) is not None:
            errors.append(f"{name}: {problem}")
    return errors


def _dataclass_hints(cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def _build(where: str, builder: Callable[[], Any]) -> list[str]:
    """Run a stage's own config builder; its range checks become errors for `where`."""
    try:
        builder()
    except (TypeError, ValueError, KeyError) as exc:
        return [f"{where}: {exc}"]
    return []


def _check_data(data: dict) -> list[str]:
    """The dataset name, and the root prepare_data lays it out under (stages that only read
    the split files need neither)."""
    errors = [
        f"data.{key}: must be in [0, 1], got {data[key]}"
        for key in ("max_unreadable_train", "max_unreadable_val")
        if key in data and not 0.0 <= data[key] <= 1.0
    ]
    if data.get("verify_workers", 0) < 0:
        errors.append(
            f"data.verify_workers: must be >= 0 (0 = every core), got {data['verify_workers']}"
        )
    if errors or "name" not in data:
        return errors
    if data["name"] not in DATA_NAMES:
        return [f"data.name: {data['name']!r} is not one of {DATA_NAMES}"]
    if data["name"] != "custom" and not data.get("root"):
        return [f"data.root: missing (data.name {data['name']!r} is prepared under it)"]
    return []


def _check_attribution(params: dict) -> list[str]:
    section = params["attribution"]
    errors = _check_keys(section, "attribution", ATTRIBUTION_KEYS)
    if errors:
        return errors
    overrides = section.get("overrides") or {}
    errors = _check_keys(overrides, "attribution.overrides", _dataclass_hints(AttributionConfig))
    if section.get("executor", "local") not in EXECUTORS:
        errors.append(f"attribution.executor: {section['executor']!r} is not one of {EXECUTORS}")
    if isinstance(overrides, dict) and overrides.get("lr") == 0:  # the library takes it
        errors.append("attribution.overrides.lr: must be > 0 (0 leaves every map at its init)")
    for key in ("num_shards", "concurrent_shards", "chunk_size", "max_attempts"):
        if key in section and section[key] < 1:
            errors.append(f"attribution.{key}: must be >= 1, got {section[key]}")
    fraction = section.get("max_failure_fraction", 0.0)
    if not 0.0 <= fraction <= 1.0:
        errors.append(f"attribution.max_failure_fraction: must be in [0, 1], got {fraction}")
    split = section.get("split")
    data = params.get("data")
    if split is not None and isinstance(data, dict) and f"{split}_json" not in data:
        errors.append(f"attribution.split: {split!r} has no data.{split}_json")
    if errors:
        return errors
    return _build("attribution", lambda: engine_config(params)) + _build(
        "attribution", lambda: DispatchConfig.from_section(section)
    )


def _check_segmenters(params: dict) -> list[str]:
    section = params["segmenters"]
    errors = _check_keys(section, "segmenters", SEGMENTER_KEYS)
    if errors:
        return errors
    for name, cls in (("instance", InstanceTrainConfig), ("semantic", SemanticTrainConfig)):
        hints = _dataclass_hints(cls, exclude=("supervision",))
        errors += _check_keys(section.get(name) or {}, f"segmenters.{name}", hints)
    supervisions = section.get("supervisions", [])
    bad = [s for s in supervisions if s not in SUPERVISIONS]
    if bad or not supervisions:
        errors.append(f"segmenters.supervisions: {supervisions!r}: use some of {SUPERVISIONS}")
    if errors:
        return errors
    for supervision in supervisions:
        errors += _build("segmenters.instance", lambda s=supervision: instance_config(params, s))
        errors += _build("segmenters.semantic", lambda s=supervision: semantic_config(params, s))
    return list(dict.fromkeys(errors))  # a range error repeats for every supervision


def _check_simple_configs(params: dict) -> list[str]:
    """Sections that map one to one onto a dataclass."""
    checks = {
        "synthetic": (
            _dataclass_hints(SyntheticConfig),
            lambda: SyntheticConfig(**params["synthetic"]),
        ),
        "detector": (
            _dataclass_hints(DetectorTrainConfig),
            lambda: detector_config(params),
        ),
        "refine": (_dataclass_hints(RefineConfig), lambda: refine_config(params)),
        "proposals": (
            {**_dataclass_hints(MCGConfig), "mcg_dir": str | None},
            lambda: proposal_config(params),
        ),
    }
    errors: list[str] = []
    for name, (hints, builder) in checks.items():
        if name not in params:
            continue
        section_errors = _check_keys(params[name], name, hints)
        errors += section_errors or _build(name, builder)
    return errors


def _check_count(section: dict, where: str, hints: dict, key: str, note: str = "") -> list[str]:
    """Key names and types of a small section, then its ``key`` >= 0 (pseudo_labels.workers;
    evaluate.report_samples, which negative would slice the records from the end)."""
    errors = _check_keys(section, where, hints)
    value = section.get(key, 0)
    if not errors and value < 0:
        errors.append(f"{where}.{key}: must be >= 0{note}, got {value}")
    return errors


def _check_top_level(params: dict) -> list[str]:
    """``device`` by the rule `resolve_device` applies (a typo such as ``gpu`` would fail only
    when a stage first moves a tensor) and ``torch_threads``; section ``device`` keys are
    checked by their configs."""
    errors = []
    if "device" in params:
        try:
            check_device(params["device"])
        except ValueError:
            errors.append(f"device: {params['device']!r} is not one of {DEVICE_NAMES}")
    if params.get("torch_threads", 0) < 0:
        threads = params["torch_threads"]
        errors.append(f"torch_threads: must be >= 0 (0 = torch's default), got {threads}")
    return errors


def check_params(params: dict, path: str | Path) -> None:
    """Raise ParamsError listing every problem of a loaded params file (None: all good)."""
    errors = _check_keys(params, "", TOP_LEVEL)
    if not errors:
        errors += _check_top_level(params)
        if "data" in params:
            errors += _check_keys(params["data"], "data", DATA_KEYS)
            errors += _check_data(params["data"]) if not errors else []
        errors += _check_simple_configs(params)
        if "attribution" in params:
            errors += _check_attribution(params)
        if "segmenters" in params:
            errors += _check_segmenters(params)
        if "pseudo_labels" in params:
            section = params["pseudo_labels"]
            note = " (0 = every core)"
            errors += _check_count(section, "pseudo_labels", PSEUDO_LABEL_KEYS, "workers", note)
        if "evaluate" in params:
            errors += _check_count(params["evaluate"], "evaluate", EVALUATE_KEYS, "report_samples")
    if errors:
        lines = "\n  ".join(errors)
        raise ParamsError(f"{path}: invalid params ({len(errors)} problem(s)):\n  {lines}")
