"""The committed pretrained detector: its recipe, its record, and fine-tuning from it."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import bbam.train_detector as td
from bbam import training as T
from bbam.atomic import file_sha256
from bbam.detector import build_detector
from bbam.pretrained import export_fp16, record_path, verify_weights
from flows.pretrain_detector import pretrain
from tasks.detector_config import detector_config

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
RECIPE = yaml.safe_load((ROOT / "configs/pretrain_synthetic.yaml").read_text())
ARCH_KEYS = (
    "arch",
    "norm",
    "min_size",
    "max_size",
    "anchor_sizes",
    "fpn_channels",
    "representation_size",
)

torch.set_num_threads(1)


def _tiny_model(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector("resnet18_fpn", num_classes, 64, 96, anchor_sizes=(8, 16, 32, 64, 128))


def test_export_is_fp16_and_verified_by_its_record(tmp_path):
    model = _tiny_model()
    record = export_fp16(model.state_dict(), tmp_path / "w.pt", {"box_ap50": 0.5})
    assert record["sha256"] == file_sha256(tmp_path / "w.pt")
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved.values() if v.is_floating_point())
    assert verify_weights(tmp_path / "w.pt")["box_ap50"] == 0.5
    # loading casts back to fp32 and keeps the values to fp16 precision
    loaded = build_detector(
        "resnet18_fpn", 3, 64, 96, anchor_sizes=(8, 16, 32, 64, 128), weights=tmp_path / "w.pt"
    )
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype, key
        assert torch.allclose(got.float(), value.float(), rtol=1e-3, atol=1e-3), key


def test_a_damaged_committed_file_is_refused_naming_it(tmp_path):
    export_fp16(_tiny_model().state_dict(), tmp_path / "w.pt", {})
    data = bytearray((tmp_path / "w.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w\.pt: sha256 .* does not match"):
        build_detector(
            "resnet18_fpn", 3, 64, 96, anchor_sizes=(8, 16, 32, 64, 128), weights=tmp_path / "w.pt"
        )


def test_the_default_points_at_the_committed_weights_which_match_record_and_architecture():
    weights = ROOT / PARAMS["detector"]["weights"]
    record = verify_weights(weights)  # raises on a sha256 mismatch
    assert record is not None, f"{record_path(weights)} missing"
    assert weights.stat().st_size <= 32 * 2**20
    for key in ARCH_KEYS:  # the demo fine-tunes the architecture the recipe trained
        assert RECIPE["detector"][key] == PARAMS["detector"][key], key
        assert record["detector"][key] == PARAMS["detector"][key] or list(
            record["detector"][key]
        ) == list(PARAMS["detector"][key]), key
    # another seed: no image shared with the demo's train or val
    assert record["data_seed"] == RECIPE["synthetic"]["seed"] != PARAMS["synthetic"]["seed"]
    assert record["num_train_images"] == RECIPE["synthetic"]["num_train"]
    assert record["box_ap50"] > 0.5
    config = detector_config(PARAMS)
    model = td.detector_from_config(config, len(record["classes"]) + 1)  # loads, strict keys
    saved = torch.load(weights, weights_only=True)
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key].to(value.dtype), value), key


def test_the_recipe_generates_trains_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = json.loads(json.dumps(RECIPE))
    params["synthetic"].update(num_train=4, num_val=2, image_size=[64, 96])
    params["detector"].update(
        min_size=64, max_size=96, epochs=1, batch_size=2, warmup_iters=1, lr_steps=[5]
    )
    record = pretrain(params, tmp_path / "out.pt", tmp_path / "run")
    assert verify_weights(tmp_path / "out.pt") == record
    assert record["num_train_images"] == 4 and record["data_seed"] == RECIPE["synthetic"]["seed"]
    assert {"box_ap", "box_ap50", "recipe_params_hash", "sha256"} <= set(record)
    params["detector"]["weights"] = "somewhere.pt"
    with pytest.raises(SystemExit, match="from scratch"):
        pretrain(params, tmp_path / "out.pt", tmp_path / "run")


def test_fine_tuning_from_pretrained_weights_resumes_after_a_kill(tmp_path, monkeypatch):
    from helpers.builders import CLASSES, shapes_records, tiny_detector_config

    from bbam.data.records import Dataset

    records = shapes_records(tmp_path / "img", 4, seed=1)
    train, val = Dataset(CLASSES, records), Dataset(CLASSES, records[:2])
    config = tiny_detector_config(epochs=2)
    torch.manual_seed(7)
    pretrained = td.detector_from_config(config, len(CLASSES) + 1)
    export_fp16(pretrained.state_dict(), tmp_path / "pre.pt", {})
    config = tiny_detector_config(epochs=2, weights=str(tmp_path / "pre.pt"))
    real = T.train_one_epoch
    starts, killed = [], []

    def killed_in_epoch_1(model, loader, setup, epoch, *args):
        starts.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        if epoch == 1 and not killed:
            killed.append(epoch)
            raise KeyboardInterrupt  # the process dies during the second epoch
        return real(model, loader, setup, epoch, *args)

    monkeypatch.setattr(T, "train_one_epoch", killed_in_epoch_1)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        td.train_detector(train, val, out, config, params_hash="h", progress=False)
    # epoch 0 started from the pretrained weights (fp16-rounded), not from a random init
    first = starts[0][1]
    for key, value in pretrained.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(first[key], value.half().float()), key
    after_epoch_0 = starts[1][1]
    starts.clear()
    td.train_detector(train, val, out, config, params_hash="h", progress=False)
    assert [epoch for epoch, _ in starts] == [1]  # resumed: epoch 0 is not redone
    for key, value in after_epoch_0.items():  # from the checkpoint, not the pretrained file
        assert torch.equal(starts[0][1][key], value), key
    assert (out / "model.pt").is_file()
