"""Trainer and attribution configs refuse values that train silently wrong or crash naming no
field; a checkpoint resumes across a raised ``epochs``, starts over (naming the changed fields)
on any other change, and never yields a model trained longer than asked."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers.builders import make_segmenter_data, pseudo_pngs, small_semantic_config

from bbam import training as T
from bbam.attribution import AttributionConfig
from bbam.device import check_device, resolve_device
from bbam.segmenters.instance import InstanceTrainConfig
from bbam.segmenters.semantic import SemanticTrainConfig, train_semantic
from bbam.train_detector import DetectorTrainConfig
from flows.train_segmenters import training_table

torch.set_num_threads(1)

TRAINER_CONFIGS = [DetectorTrainConfig, SemanticTrainConfig, InstanceTrainConfig]
SCHEDULE_CASES = [
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr": math.nan}, "lr must be a finite number >= 0"),
    ({"lr": -0.01}, "lr must be a finite number >= 0"),
    ({"momentum": -0.5}, "momentum must be a finite number >= 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"warmup_iters": -1}, "warmup_iters must be >= 0"),
    ({"warmup_factor": 0.0}, r"warmup_factor must be in \(0, 1\]"),
    ({"lr_steps": (0,)}, "lr_steps must be epoch numbers >= 1"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm must be null, 0"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"device": "gpu"}, "device 'gpu' is not one of auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("cls", TRAINER_CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("bad", "message"), SCHEDULE_CASES)
def test_trainer_configs_refuse_bad_schedules_naming_the_field(cls, bad, message):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{message}"):
        cls(**bad)


@pytest.mark.parametrize(
    ("cls", "bad", "message"),
    [
        (SemanticTrainConfig, {"crop_size": 0}, "crop_size must be >= 1"),
        (SemanticTrainConfig, {"scale": 0.0}, "scale must be a finite number > 0"),
        (SemanticTrainConfig, {"max_iters_per_epoch": -1}, "max_iters_per_epoch must be"),
        (InstanceTrainConfig, {"seed_lo": 0.95}, "0 <= seed_lo <= seed_hi <= 1"),
        (InstanceTrainConfig, {"box_score_thresh": 1.5}, r"box_score_thresh must be in \[0, 1\]"),
    ],
)
def test_segmenter_specific_ranges(cls, bad, message):
    with pytest.raises(ValueError, match=message):
        cls(**bad)


def test_defaults_and_off_switches_still_pass():
    for cls in TRAINER_CONFIGS:
        cls()
        cls(clip_grad_norm=None, warmup_iters=0, device="cuda:1", lr=0.0)  # lr 0: a freeze
    SemanticTrainConfig(max_iters_per_epoch=0, clip_grad_norm=0.0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"lr": math.nan}, "lr must be finite"),
        ({"lr": math.inf}, "lr must be finite"),
        ({"lr": -0.1}, "lr must be >= 0"),
        ({"iou_thresholds": (1.5,)}, r"iou_thresholds must be in \[0, 1\)"),
        ({"iou_thresholds": (0.9, 1.0)}, r"iou_thresholds must be in \[0, 1\)"),
        ({"l1_weight": -0.1}, "l1_weight must be >= 0"),
        ({"box_weight": -1.0}, "box_weight must be >= 0"),
        ({"tv_beta": 0.5}, "tv_beta must be >= 1"),
        ({"stride_coefs": (16.0, math.nan)}, "stride_coefs must be finite"),
        ({"stride_coefs": (-16.0, 48.0)}, "stride_coefs and stride_reference_size must be >= 0"),
        ({"init_value": 2.0}, r"init_value must be in \[0, 1\]"),
        ({"crop_context": math.nan}, "crop_context must be finite"),
    ],
)
def test_attribution_config_refuses_values_that_give_nan_or_empty_maps(bad, message):
    with pytest.raises(ValueError, match=f"AttributionConfig.{message}"):
        AttributionConfig(**bad)


def test_attribution_config_keeps_what_is_meaningful():
    AttributionConfig(iou_thresholds=(0.0,), tv_weight=0.0, tv_beta=0.5, l1_weight=0.0, lr=0.0)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "mps", "CPU", "cpu:0", ""])
def test_resolve_device_refuses_what_the_params_check_refuses(name):
    with pytest.raises(ValueError, match="is not one of auto, cpu, cuda or cuda:N"):
        check_device(name)
    with pytest.raises(ValueError, match="is not one of"):
        resolve_device(name)


def test_resolve_device_takes_the_names_it_allows():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


# ----------------------------------------------------------------------------- resume


def _parts(cfg) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = T.make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = T.make_scheduler(optimizer, 2, cfg.lr_steps, 0.1, 1, 0.1)
    return model, optimizer, scheduler


def _checkpoint(out, cfg, phash: str, epoch: int) -> None:
    model, optimizer, scheduler = _parts(cfg)
    config = T.hashed_config(cfg)
    T.save_checkpoint(out, phash, epoch, model, optimizer, scheduler, None, config=config)


def _setup(out, cfg, phash: str, schedule: str = "iteration") -> T.TrainingSetup:
    model = _parts(cfg)[0]
    return T.setup_training(model, cfg, 4, out, torch.device("cpu"), phash, schedule=schedule)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / T.LOG_NAME).read_text().splitlines()]


def test_epochs_is_not_in_the_params_hash_but_every_other_field_is():
    cfg = small_semantic_config(epochs=2)
    assert T.params_hash(cfg) == T.params_hash(small_semantic_config(epochs=9))
    assert T.params_hash(cfg) != T.params_hash(small_semantic_config(epochs=2, lr=0.03))
    assert T.hashed_config(cfg)["epochs"] == 2  # stored with the checkpoint all the same


def test_a_refused_checkpoint_names_the_fields_that_changed(tmp_path, caplog):
    old = small_semantic_config(epochs=2, lr=0.02)
    _checkpoint(tmp_path, old, T.params_hash(old), 0)
    new = small_semantic_config(epochs=3, lr=0.03, crop_size=48)
    with caplog.at_level(logging.WARNING, logger="bbam.training"):
        setup = _setup(tmp_path, new, T.params_hash(new))
    assert setup.start_epoch == 0
    changed = {"crop_size": [64, 48], "epochs": [2, 3], "lr": [0.02, 0.03]}
    assert _log(tmp_path)[-1] == {
        "event": "restart",
        "reason": "params_hash changed",
        "changed": changed,
    }
    assert str(tmp_path / T.CHECKPOINT_NAME) in caplog.text
    assert "crop_size 64 -> 48, epochs 2 -> 3, lr 0.02 -> 0.03" in caplog.text


def test_a_hash_change_outside_the_config_says_so(tmp_path, caplog):
    """The detector's hash (tasks.detector_config) covers its weights and annotations too."""
    cfg = small_semantic_config()
    _checkpoint(tmp_path, cfg, "h1", 0)
    with caplog.at_level(logging.WARNING, logger="bbam.training"):
        assert _setup(tmp_path, cfg, "h2", schedule="epoch").start_epoch == 0
    assert _log(tmp_path)[-1] == {"event": "restart", "reason": "params_hash changed"}
    assert "no config field; the data, classes or weights" in caplog.text


def test_a_checkpoint_with_more_epochs_than_asked_starts_over(tmp_path, caplog):
    done = small_semantic_config(epochs=3)
    _checkpoint(tmp_path, done, T.params_hash(done), 2)  # 3 epochs finished
    fewer = small_semantic_config(epochs=2)
    with caplog.at_level(logging.WARNING, logger="bbam.training"):
        setup = _setup(tmp_path, fewer, T.params_hash(fewer))
    assert setup.start_epoch == 0
    assert _log(tmp_path)[-1] == {
        "event": "restart",
        "reason": "checkpoint has more epochs than asked",
        "changed": {"epochs": [3, 2]},
    }
    assert "has 3 finished epochs, more than epochs=2" in caplog.text
    same = small_semantic_config(epochs=3)  # all done: resumes with nothing left to run
    assert _setup(tmp_path, same, T.params_hash(same)).start_epoch == 3


def test_raising_epochs_continues_the_checkpoint_as_one_longer_run(tmp_path):
    """1 epoch, then epochs 2 in the same folder, trains epoch 1 only and ends where an
    uninterrupted 2-epoch run does; asking for 1 again retrains 1 epoch from scratch."""
    records = make_segmenter_data(tmp_path, n=4)
    sem = pseudo_pngs(tmp_path, records)

    def train(name: str, epochs: int) -> T.TrainResult:
        cfg = small_semantic_config(epochs=epochs, max_iters_per_epoch=1)
        return train_semantic(records, ["thing"], tmp_path / name, cfg, sem, progress=False)

    full = train("full", 2)
    one = train("grown", 1)
    grown = train("grown", 2)
    assert grown.start_epoch == 1 and len(grown.losses) == 1
    assert grown.losses[0] == pytest.approx(full.losses[1], rel=1e-4)
    for (key, a), b in zip(
        full.model.state_dict().items(), grown.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), key
    assert {"event": "resume", "epoch": 1} in _log(tmp_path / "grown")

    shrunk = train("grown", 1)
    assert shrunk.start_epoch == 0 and shrunk.losses == pytest.approx(one.losses, rel=1e-4)
    saved = torch.load(tmp_path / "grown" / T.MODEL_NAME, weights_only=True)
    assert saved["meta"]["config"]["epochs"] == 1
    for key, value in one.model.state_dict().items():
        assert torch.allclose(saved["model"][key].float(), value.float(), atol=1e-5), key


def test_the_detectors_resume_hash_ignores_epochs_and_device_as_the_segmenters_do(tmp_path):
    """train_detector's checkpoint key: more epochs or another device continue the run; any
    knob that changes the weights, or other train annotations, does not."""
    from tasks.detector_config import detector_config, detector_params_hash

    train_json = tmp_path / "train.json"
    train_json.write_text('{"images": []}')
    params = {
        "seed": 0,
        "device": "cpu",
        "data": {"train_json": str(train_json), "train_images": str(tmp_path)},
        "detector": {"epochs": 1},
    }

    def digest(**detector) -> str:
        p = {**params, "detector": {**params["detector"], **detector}}
        return detector_params_hash(p, detector_config(p))

    base = digest()
    assert digest(epochs=2) == base
    assert digest(device="auto", num_workers=2) == base
    assert digest(lr=0.01) != base
    train_json.write_text('{"images": [], "annotations": []}')
    assert digest() != base


def test_a_killed_checkpoint_write_leaves_the_checkpoint_whole_and_its_temp_is_cleared(tmp_path):
    """A SIGKILL during torch.save skips atomic_write's clean-up: the old checkpoint stays
    and resumes, and the checkpoint-sized temp file goes at the next start, not for good."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = small_semantic_config(epochs=3)
    phash = T.params_hash(cfg)
    _checkpoint(tmp_path, cfg, phash, 0)
    child = (
        "import sys, time\n"
        "from bbam.atomic import atomic_write\n"
        "def stall(f):\n"
        "    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "atomic_write(sys.argv[1], stall)\n"
    )
    path = tmp_path / T.CHECKPOINT_NAME
    proc = subprocess.Popen([sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"writing\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(f".{T.CHECKPOINT_NAME}.")
    (tmp_path / ".other.pt.0123456789ab.tmp").write_bytes(b"not ours")
    assert _setup(tmp_path, cfg, phash).start_epoch == 1  # the whole old checkpoint
    assert stale[0] in os.listdir(tmp_path)  # written to just now: maybe a write in flight
    old = time.time() - 3600
    os.utime(tmp_path / stale[0], (old, old))  # idle for an hour: its writer is gone
    assert _setup(tmp_path, cfg, phash).start_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.pt.0123456789ab.tmp",
        T.CHECKPOINT_NAME,
        T.LOG_NAME,
    ]


def test_a_torn_log_line_is_ended_and_left_out_of_the_stage_table(tmp_path, caplog):
    """A run that died mid-line (disk full, a lost node) must not glue the next run's first
    record onto the torn one, nor fail the train_segmenters table on every re-run."""
    path = tmp_path / T.LOG_NAME
    T.JsonlLog(path).write({"epoch": 0, "iter": 0, "loss": 2.0})
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"epoch": 0, "iter": 5, "lo')
    log = T.JsonlLog(path)  # the next run
    log.write({"event": "resume", "epoch": 1})
    log.write({"epoch": 1, "iter": 0, "loss": 1.5})
    lines = path.read_text().splitlines()
    assert json.loads(lines[2]) == {"event": "resume", "epoch": 1}
    with caplog.at_level(logging.WARNING, logger="flows.train_segmenters"):
        (row,) = training_table({"instance_bbam": str(tmp_path / T.MODEL_NAME)}, {})
    assert row["epochs"] == 2 and row["last logged loss"] == 1.5
    assert f"{path} line 2: not a JSON record" in caplog.text
