"""Bad, foreign and unsafe weights files: every loader names the file and never advises
loading it unsafely (issue #18, items 3 and 4)."""

from pathlib import Path

import pytest
import torch

from bbam.detector import build_detector
from bbam.segmenters.instance import InstanceTrainConfig, build_instance_model
from bbam.segmenters.semantic import (
    SemanticTrainConfig,
    build_semantic_model,
    load_semantic_model,
)


class Payload:
    """Any class outside torch's allow-list: what a malicious or whole-model file holds."""


def _unsafe(path: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(1), "payload": Payload()}, path)
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00not a torch file\xff" * 64)
    return path


def _truncated(path: Path) -> Path:
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


BAD_FILES = {"unsafe": _unsafe, "garbage": _garbage, "truncated": _truncated}


def _check_message(message: str, path: Path) -> None:
    assert str(path) in message
    assert "weights_only" not in message, "torch's advice to load unsafely is not ours"


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_detector_weights_error_names_file_without_unsafe_advice(tmp_path, kind):
    path = BAD_FILES[kind](tmp_path / "detector.pt")
    with pytest.raises(ValueError) as info:
        build_detector("resnet18_fpn", 3, 64, 96, weights=path)
    _check_message(str(info.value), path)
    if kind == "unsafe":
        assert "state_dict" in str(info.value) and "code" in str(info.value)


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_semantic_backbone_weights_error_names_file(tmp_path, kind):
    path = BAD_FILES[kind](tmp_path / "backbone.pt")
    with pytest.raises(ValueError) as info:
        build_semantic_model(SemanticTrainConfig(weights_backbone=str(path)), 3)
    _check_message(str(info.value), path)


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_instance_weights_error_names_file(tmp_path, kind):
    path = BAD_FILES[kind](tmp_path / "maskrcnn.pt")
    config = InstanceTrainConfig(weights=str(path), min_size=64, max_size=96)
    with pytest.raises(ValueError) as info:
        build_instance_model(config, 3)
    _check_message(str(info.value), path)


def test_evaluate_refuses_a_foreign_model_file_naming_it(tmp_path):
    """A model.pt of another network (keys that do not fit) names the file, not just keys."""
    path = tmp_path / "model.pt"
    torch.save({"model": {"other.weight": torch.zeros(2)}, "meta": {}}, path)
    with pytest.raises(ValueError, match="model.pt: not a DeepLabV3 model"):
        load_semantic_model(path, SemanticTrainConfig(), 3)
    _unsafe(path)
    with pytest.raises(ValueError) as info:
        load_semantic_model(path, SemanticTrainConfig(), 3)
    _check_message(str(info.value), path)
