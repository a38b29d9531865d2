"""The resume key of finished maps: equal for equal engine settings, changed by anything
that changes a map, including a default changed in the code."""

from __future__ import annotations

import pytest

import bbam.attribution as attribution
from flows.attribute import attribution_hash


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/detector").mkdir(parents=True)
    (tmp_path / "runs/detector/model.pt").write_bytes(b"weights v1")
    (tmp_path / "train.json").write_text('{"images": []}')
    return tmp_path


def _params(**overrides) -> dict:
    return {
        "seed": 0,
        "data": {"train_json": "train.json", "train_images": "images"},
        "attribution": {"split": "train", "profile": "fast", "overrides": overrides},
    }


def test_same_settings_same_hash_however_spelled(project):
    default_iterations = attribution.profile_config("fast").iterations
    assert attribution_hash(_params()) == attribution_hash(_params(iterations=default_iterations))


def test_anything_that_changes_a_map_changes_the_hash(project, monkeypatch):
    base = attribution_hash(_params())
    assert attribution_hash(_params(iterations=7)) != base
    assert attribution_hash({**_params(), "seed": 1}) != base
    (project / "runs/detector/model.pt").write_bytes(b"weights v2")
    assert attribution_hash(_params()) != base
    (project / "runs/detector/model.pt").write_bytes(b"weights v1")
    (project / "train.json").write_text('{"images": [], "annotations": []}')
    assert attribution_hash(_params()) != base
    (project / "train.json").write_text('{"images": []}')
    assert attribution_hash(_params()) == base
    # a default changed in the code, not in params.yaml
    monkeypatch.setitem(attribution._PROFILES, "fast", {"crop_context": 0.25})
    assert attribution_hash(_params()) != base
