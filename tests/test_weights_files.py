"""Bad, foreign and unsafe weights files: every loader names the file, says what the file is
and never advises loading it unsafely (issue #18, items 3 and 4).

Loaders: the detector's weights / weights_backbone, each segmenter's weights /
weights_backbone (segmenters.*), and the evaluate stage's model loading
(load_semantic_model / load_instance_model). Files: garbage, truncated, a pickle of a
class outside torch's allow-list, a malicious pickle whose payload would run a command
(torch.save'd and plain pickle.dumps'd), and a foreign state_dict of another network."""

from __future__ import annotations

import ast
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bbam.detector import build_detector
from bbam.segmenters.instance import (
    InstanceTrainConfig,
    build_instance_model,
    load_instance_model,
)
from bbam.segmenters.semantic import (
    SemanticTrainConfig,
    build_semantic_model,
    load_semantic_model,
)


class Payload:
    """Any class outside torch's allow-list: what a whole-model file holds."""


class Exploit:
    """A pickle payload: unpickling it runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _unsafe(path: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(1), "payload": Payload()}, path)
    return path


def _malicious(path: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(1), "x": Exploit(path.with_suffix(".pwned"))}, path)
    return path


def _malicious_plain_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"x": Exploit(path.with_suffix(".pwned"))}))
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00not a torch file\xff" * 64)
    return path


def _truncated(path: Path) -> Path:
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _foreign(path: Path) -> Path:
    """A clean state_dict of some other network: no key fits any of ours."""
    torch.save({"other_net.layer.weight": torch.zeros(3, 2)}, path)
    return path


BAD_FILES = {
    "unsafe": _unsafe,
    "malicious": _malicious,
    "malicious_plain_pickle": _malicious_plain_pickle,
    "garbage": _garbage,
    "truncated": _truncated,
    "foreign": _foreign,
}
# What each message must say the file is.
SAYS = {
    "unsafe": ("refused", "Payload", "state_dict", "could run code"),
    "malicious": ("refused", "system", "state_dict", "could run code"),
    "malicious_plain_pickle": ("not a torch weights file",),
    "garbage": ("damaged", "not a torch"),
    "truncated": ("damaged",),
    "foreign": (),
}
SEMANTIC = {"output_stride": 16}
INSTANCE = {"min_size": 64, "max_size": 96}


def _semantic(**kw) -> SemanticTrainConfig:
    return SemanticTrainConfig(**SEMANTIC, **kw)


def _instance(**kw) -> InstanceTrainConfig:
    return InstanceTrainConfig(**INSTANCE, **kw)


LOADERS: dict[str, Callable[[Path], object]] = {
    "detector weights": lambda p: build_detector("resnet18_fpn", 3, 64, 96, weights=p),
    "detector weights_backbone": lambda p: build_detector(
        "resnet18_fpn", 3, 64, 96, weights_backbone=p
    ),
    "segmenters.semantic.weights": lambda p: build_semantic_model(_semantic(weights=str(p)), 3),
    "segmenters.semantic.weights_backbone": lambda p: build_semantic_model(
        _semantic(weights_backbone=str(p)), 3
    ),
    "segmenters.instance.weights": lambda p: build_instance_model(_instance(weights=str(p)), 3),
    "segmenters.instance.weights_backbone": lambda p: build_instance_model(
        _instance(weights_backbone=str(p)), 3
    ),
    "evaluate: semantic model.pt": lambda p: load_semantic_model(p, _semantic(), 3),
    "evaluate: instance model.pt": lambda p: load_instance_model(p, _instance(), 3),
}


def _check_message(message: str, path: Path, kind: str) -> None:
    assert str(path) in message, message
    assert "weights_only" not in message, "torch's advice to load unsafely is not ours"
    for words in SAYS[kind]:
        assert words in message, f"{kind}: {words!r} not in {message!r}"
    if kind in ("garbage", "truncated", "malicious_plain_pickle", "foreign"):
        assert "could run code" not in message, "a damaged file is not called unsafe"


# Every loader gets an exploit and garbage; every kind of file goes through a segmenter's
# weights and weights_backbone (one message function serves them all: bbam.checkpoint).
CASES = [(loader, kind) for loader in LOADERS for kind in ("malicious", "garbage")] + [
    (loader, kind)
    for loader in ("segmenters.semantic.weights_backbone", "segmenters.instance.weights")
    for kind in BAD_FILES
    if kind not in ("malicious", "garbage")
]


@pytest.mark.parametrize(("loader", "kind"), CASES)
def test_bad_weights_file_is_named_and_never_loaded_unsafely(tmp_path, loader, kind):
    path = BAD_FILES[kind](tmp_path / "weights.pt")
    with pytest.raises(ValueError) as info:
        LOADERS[loader](path)
    _check_message(str(info.value), path, kind)
    assert not path.with_suffix(".pwned").exists(), "the payload ran"


def test_evaluate_refuses_a_model_file_of_another_network_naming_it(tmp_path):
    """A model.pt of another network (keys that do not fit) names the file, not just keys."""
    path = tmp_path / "model.pt"
    torch.save({"model": {"other.weight": torch.zeros(2)}, "meta": {}}, path)
    with pytest.raises(ValueError, match="model.pt: not a DeepLabV3 model"):
        load_semantic_model(path, _semantic(), 3)
    with pytest.raises(ValueError, match="model.pt: not a Mask R-CNN model"):
        load_instance_model(path, _instance(), 3)


def _string_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal but docstrings (which may explain the advice)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_message_in_the_code_advises_weights_only_false():
    """Item 4 by grep: no string the code can print tells a user to load unsafely."""
    root = Path(__file__).resolve().parent.parent
    offenders = [
        f"{path.relative_to(root)}:{line}"
        for folder in ("bbam", "tasks", "flows", "bench")
        for path in sorted((root / folder).rglob("*.py"))
        for line, text in _string_literals(path.read_text(encoding="utf-8"))
        if "weights_only=False" in text.replace(" ", "")
    ]
    assert not offenders, offenders
