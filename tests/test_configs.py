"""Every params file (params.yaml, configs/*.yaml) builds every stage's config as the flows do."""

import re
from pathlib import Path

import pytest
import yaml

from bbam.attribution import profile_config
from bbam.device import resolve_device
from bbam.refine import RefineConfig
from tasks.deployments import DispatchConfig
from tasks.detector_config import detector_config
from tasks.pseudo_label_config import proposal_config, refine_config
from tasks.segmenters import instance_config, semantic_config

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILES = ["params.yaml", "configs/voc.yaml", "configs/coco.yaml"]


def load(name: str) -> dict:
    params = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(params, dict), name
    return params


def dvc_templated_keys() -> set[str]:
    return set(re.findall(r"\$\{([\w.]+)\}", (ROOT / "dvc.yaml").read_text()))


def lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"missing key {dotted}"
        node = node[part]
    return node


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_file_builds_every_stage_config(name):
    params = load(name)
    assert set(params) == set(load("params.yaml"))
    for key in dvc_templated_keys():
        assert isinstance(lookup(params, key), str) and lookup(params, key)
    detector = detector_config(params)
    # the top-level seed and device reach every trainer the same way
    assert (detector.seed, detector.device) == (params["seed"], params["device"])
    section = params["attribution"]
    attribution = profile_config(section["profile"], **(section.get("overrides") or {}))
    assert attribution.iterations >= 1
    DispatchConfig.from_section(section)
    assert int(section["num_shards"]) >= 1
    assert lookup(params, f"data.{section['split']}_json")  # the attributed split exists
    RefineConfig(**params["refine"])
    mcg, mcg_dir = proposal_config(params)
    if mcg.enabled and mcg.source == "mcg":
        assert mcg_dir, f"{name}: proposals.source mcg needs proposals.mcg_dir"
    supervisions = params["segmenters"]["supervisions"]
    assert set(supervisions) <= {"full", "bbam", "box"} and supervisions
    for supervision in supervisions:
        for config in (instance_config(params, supervision), semantic_config(params, supervision)):
            assert config.supervision == supervision
            assert (config.seed, config.device) == (params["seed"], params["device"])
    assert int(params["evaluate"]["report_samples"]) >= 0


def test_real_data_configs_follow_the_paper():
    voc, coco = load("configs/voc.yaml"), load("configs/coco.yaml")
    for params, dataset in ((voc, "voc"), (coco, "coco")):
        assert params["data"]["name"] == dataset and params["device"] == "auto"
        det = detector_config(params)
        test_size = det.min_size if isinstance(det.min_size, int) else det.min_size[-1]
        assert (det.norm, test_size, det.max_size) == ("frozen", 800, 1333)
        assert det.clip_grad_norm is None  # maskrcnn-benchmark clips no gradients
        assert refine_config(params).crf_on_crop is False  # the reference's whole-image CRF
        for supervision in params["segmenters"]["supervisions"]:
            assert instance_config(params, supervision).clip_grad_norm is None
            assert semantic_config(params, supervision).clip_grad_norm is None
        assert det.anchor_sizes == (32, 64, 128, 256, 512)
        assert det.weights_backbone and det.weights_backbone.startswith("weights/")
        assert params["proposals"]["source"] == "mcg"
        assert Path(params["proposals"]["mcg_dir"]) == Path(params["data"]["root"]) / "MCG"
        assert set(params["segmenters"]["supervisions"]) == {"bbam", "full", "box"}
    assert detector_config(voc).arch == "resnet101_fpn"
    assert detector_config(coco).arch == "resnet50_fpn"
    assert voc["data"]["train_voc_split"] == "train_aug"
    assert voc["attribution"]["profile"] == "reference"
    assert profile_config("reference") == profile_config(voc["attribution"]["profile"])
    assert voc["attribution"]["num_shards"] == 24
    assert coco["attribution"]["profile"] == "fast"
    # the reference configs' multi-scale training: detector 480-800, Mask R-CNN 416-512
    assert detector_config(voc).min_size == tuple(range(480, 801, 32))
    voc_instance = instance_config(voc, "bbam")
    assert voc_instance.min_size == (416, 440, 464, 488, 512) and voc_instance.max_size == 800
    assert tuple(voc_instance.lr_steps) == (12,)  # iteration 16k of 20k at batch 8
    assert instance_config(voc, "bbam").arch == "resnet101_fpn"
    assert semantic_config(voc, "bbam").arch == "resnet101"


def test_unknown_key_in_a_config_section_raises():
    params = load("configs/voc.yaml")
    params["detector"]["min_szie"] = 800
    with pytest.raises(TypeError, match="min_szie"):
        detector_config(params)


def test_device_cpu_keeps_the_detector_off_a_gpu():
    params = {**load("params.yaml"), "device": "cpu"}
    assert detector_config(params).device == "cpu"
    assert resolve_device(detector_config(params).device).type == "cpu"
