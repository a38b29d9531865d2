"""A stage refuses a params file with a misspelt key or a mistyped value, naming file and key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.project_env import project_env

from flows.params_schema import ParamsError, check_params

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILES = ["params.yaml", "configs/voc.yaml", "configs/coco.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_shipped_params_files_pass(name):
    check_params(load(name), name)


def test_a_partial_params_file_passes():
    check_params({"refine": {"crf": False}, "proposals": {"enabled": False}}, "p.yaml")


def _set(path: str, value):
    def mutate(params: dict) -> None:
        *parents, key = path.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value

    return mutate


def _drop(path: str):
    def mutate(params: dict) -> None:
        *parents, key = path.split(".")
        node = params
        for part in parents:
            node = node[part]
        del node[key]

    return mutate


CASES = [
    (_set("seeds", 1), "seeds: unknown key; did you mean 'seed'?"),
    (_set("detector.epoch", 3), "detector.epoch: unknown key; did you mean 'epochs'?"),
    (_set("detector.epochs", "ten"), "detector.epochs: expected int, got str 'ten'"),
    (_set("attribution.num_shard", 8), "attribution.num_shard: unknown key; did you mean"),
    (_set("attribution.overrides.iteratons", 5), "attribution.overrides.iteratons: unknown"),
    (_set("attribution.profile", "fastest"), "unknown attribution profile 'fastest'"),
    (_set("attribution.executor", "slurm"), "attribution.executor: 'slurm' is not one of"),
    (_set("attribution.num_shards", 0), "attribution.num_shards: must be >= 1"),
    (_set("attribution.split", "test"), "attribution.split: 'test' has no data.test_json"),
    (_set("refine.crf_clip", "1e-5"), "refine.crf_clip: expected float, got str '1e-5' (YAML"),
    (_set("refine.th_fg", 1.5), "RefineConfig.th_fg must be in [0, 1]"),
    (_set("refine.crf", "yes"), "refine.crf: expected bool"),
    (_set("proposals.sourc", "mcg"), "proposals.sourc: unknown key; did you mean 'source'?"),
    (_set("segmenters.supervisions", ["bbam", "boxes"]), "segmenters.supervisions: ['bbam'"),
    (_set("segmenters.instance.epoch", 1), "segmenters.instance.epoch: unknown key"),
    (_set("segmenters.semantic.crop_size", [96]), "segmenters.semantic.crop_size: expected int"),
    (_set("synthetic.image_size", [128]), "synthetic.image_size: expected"),
    (_set("data.name", "pascal"), "data.name: 'pascal' is not one of"),
    (_drop("data.root"), "data.root: missing (data.name 'synthetic'"),
    (_set("evaluate.samples", 3), "evaluate.samples: unknown key"),
    (_set("pseudo_labels.workers", -1), "pseudo_labels.workers: must be >= 0"),
    (_set("pseudo_labels.worker", 2), "pseudo_labels.worker: unknown key; did you mean"),
    (_set("refine", True), "refine: expected dict, got bool True"),
    # knobs renamed to torchvision's spelling: an old params file says what to write now
    (_set("detector.backbone_weights", None), "did you mean 'weights_backbone'?"),
    (_set("detector.trainable_layers", 3), "did you mean 'trainable_backbone_layers'?"),
    (_set("detector.grad_clip_norm", 10.0), "did you mean 'clip_grad_norm'?"),
    (_set("detector.workers", 0), "detector.workers: unknown key; did you mean 'num_workers'?"),
    (
        _set("detector.norm", "batchnorm"),
        "detector.norm: expected Literal['batch', 'group', 'frozen'], got str 'batchnorm'; did you mean 'batch'?",
    ),
    (_set("detector.norm", "frozen_bn"), "did you mean 'frozen'?"),
]


@pytest.mark.parametrize(("mutate", "message"), CASES)
def test_bad_params_name_the_file_and_the_key(mutate, message):
    params = copy.deepcopy(load("params.yaml"))
    mutate(params)
    with pytest.raises(ParamsError) as info:
        check_params(params, "my/params.yaml")
    text = str(info.value)
    assert text.startswith("my/params.yaml: invalid params")
    assert message in text


def test_every_problem_is_listed_at_once():
    params = copy.deepcopy(load("params.yaml"))
    params["detector"]["epoch"] = 3
    params["refine"]["th_fgg"] = 0.5
    with pytest.raises(ParamsError, match=r"2 problem\(s\)") as info:
        check_params(params, "params.yaml")
    assert "detector.epoch" in str(info.value) and "refine.th_fgg" in str(info.value)


def test_stage_cli_refuses_bad_params_before_running(tmp_path):
    params = copy.deepcopy(load("params.yaml"))
    params["detector"]["epoch"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.train_detector", "--params", str(bad)],
        cwd=tmp_path,
        env=project_env(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"{bad}: invalid params" in proc.stderr
    assert "detector.epoch: unknown key" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
