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
    # values of the right type that train or label silently wrong, or crash naming no key
    (_set("refine.th_bg", 0.9), "refine: RefineConfig needs th_bg <= th_fg"),
    (_set("refine.abs_bg", 0.9), "refine: RefineConfig needs abs_bg <= abs_fg"),
    (_set("refine.blur_base", float("nan")), "RefineConfig.blur_base must be a finite number"),
    (_set("detector.lr", -0.01), "detector: DetectorTrainConfig.lr must be a finite number >= 0"),
    (_set("detector.lr", float("nan")), "DetectorTrainConfig.lr must be a finite number >= 0"),
    (_set("detector.weight_decay", -1.0), "DetectorTrainConfig.weight_decay must be a finite"),
    (_set("detector.warmup_factor", 0.0), "DetectorTrainConfig.warmup_factor must be in (0, 1]"),
    (_set("detector.device", "gpu"), "DetectorTrainConfig.device 'gpu' is not one of auto"),
    (_set("segmenters.semantic.epochs", 0), "segmenters.semantic: SemanticTrainConfig.epochs"),
    (_set("segmenters.semantic.batch_size", 0), "SemanticTrainConfig.batch_size must be >= 1"),
    (_set("segmenters.semantic.crop_size", 0), "SemanticTrainConfig.crop_size must be >= 1"),
    (_set("segmenters.semantic.clip_grad_norm", -1.0), "SemanticTrainConfig.clip_grad_norm"),
    (_set("segmenters.instance.epochs", -1), "InstanceTrainConfig.epochs must be >= 1, got -1"),
    (_set("segmenters.instance.lr", float("inf")), "InstanceTrainConfig.lr must be a finite"),
    (_set("segmenters.instance.seed_lo", 0.95), "needs 0 <= seed_lo <= seed_hi <= 1"),
    (_set("attribution.overrides.lr", float("nan")), "AttributionConfig.lr must be finite"),
    (_set("attribution.overrides.lr", float("inf")), "AttributionConfig.lr must be finite"),
    (_set("attribution.overrides.lr", 0.0), "attribution.overrides.lr: must be > 0"),
    (_set("attribution.overrides.lr", -0.1), "AttributionConfig.lr must be >= 0"),
    (_set("attribution.overrides.iou_thresholds", [1.5]), "iou_thresholds must be in [0, 1)"),
    (_set("attribution.overrides.l1_weight", -0.1), "AttributionConfig.l1_weight must be >= 0"),
    (_set("attribution.overrides.tv_beta", 0.5), "AttributionConfig.tv_beta must be >= 1"),
    (_set("device", "gpu"), "device: 'gpu' is not one of auto, cpu, cuda or cuda:N"),
    (_set("torch_threads", -3), "torch_threads: must be >= 0"),
    (_set("evaluate.report_samples", -2), "evaluate.report_samples: must be >= 0"),
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


def test_a_segmenter_range_error_is_listed_once_not_per_supervision():
    params = copy.deepcopy(load("params.yaml"))
    params["segmenters"]["supervisions"] = ["full", "bbam", "box"]
    params["segmenters"]["instance"]["epochs"] = 0
    with pytest.raises(ParamsError, match=r"1 problem\(s\)"):
        check_params(params, "params.yaml")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_devices_resolve_device_takes_pass(device):
    params = copy.deepcopy(load("params.yaml"))
    params["device"] = params["detector"]["device"] = device
    check_params(params, "params.yaml")


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
