"""The CUDA paths: AMP (bf16 autocast), channels_last, a CPU checkpoint resumed on the GPU.

Skipped without a CUDA device (CI and the 2-core dev machines have none). On a GPU machine
`bench/gpu_check.py` runs them with the attribution benches in one go.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers.builders import (
    CLASSES,
    SIZE,
    SMALL,
    four_items,
    make_segmenter_data,
    pseudo_json,
    pseudo_pngs,
    shapes_records,
    small_semantic_config,
    tiny_detector,
    tiny_detector_config,
)
from PIL import Image

import bbam.train_detector as td
from bbam.attribution import AttributionItem, attribute_instances, map_to_image, profile_config
from bbam.data.records import Dataset
from bbam.detector import freeze, prepare_images, roi_head_forward
from bbam.segmenters.instance import InstanceTrainConfig, predict_instances, train_instance
from bbam.segmenters.semantic import predict_semantic, train_semantic
from bbam.toy_detector import ToyDetector, toy_scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _mask(result) -> np.ndarray:
    return map_to_image(result.grid, result.resized_hw, result.resized_hw) > 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_attribution_on_cuda_with_amp_recovers_the_region_like_cpu():
    img, boxes, masks = toy_scene(SIZE, [(44, 50, 18, 1)])
    item = AttributionItem("a", img, boxes[0], 1)
    cfg = profile_config("fast", **SMALL)
    assert cfg.amp and cfg.channels_last  # what CUDA turns on
    search = torch.backends.cudnn.benchmark
    with_search = dataclasses.replace(cfg, cudnn_benchmark=True)
    (gpu,) = attribute_instances(ToyDetector().eval().cuda(), [item], with_search, "cuda")
    assert torch.backends.cudnn.benchmark == search  # the engine's cuDNN search is scoped
    (cpu,) = attribute_instances(ToyDetector().eval(), [item], cfg, "cpu")
    assert gpu.status == "ok" and gpu.stats["device"].startswith("cuda")
    assert np.isfinite(gpu.grid.astype(np.float32)).all()
    assert _iou(_mask(gpu), masks[0].numpy()) >= 0.8
    assert _iou(_mask(gpu), _mask(cpu)) >= 0.9


def test_batched_matches_one_at_a_time_on_cuda():
    items = four_items()
    det = ToyDetector().eval().cuda()
    base = profile_config("fast", **{**SMALL, "iterations": 60})
    batched = attribute_instances(det, items, dataclasses.replace(base, batch_size=4), "cuda")
    single = attribute_instances(det, items, dataclasses.replace(base, batch_size=1), "cuda")
    for b, s in zip(batched, single, strict=True):
        assert b.status == s.status == "ok"
        assert b.stats["positives"] == s.stats["positives"]
        assert _iou(_mask(b), _mask(s)) >= 0.95  # bf16 sums in another order


def test_detector_heads_give_image_gradients_under_autocast(tmp_path):
    records = shapes_records(tmp_path, 1, seed=1)
    model = freeze(tiny_detector()).cuda()
    rgb = torch.from_numpy(np.asarray(Image.open(records[0].path)).copy())
    raw = (rgb.permute(2, 0, 1).float() / 255).cuda().requires_grad_()
    batch, _, _ = prepare_images(model, [raw])
    box = torch.from_numpy(records[0].instances[0].box)[None].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = roi_head_forward(model, batch.contiguous(memory_format=torch.channels_last), [box])
    (out.logits[:, 1].float().sum() + out.deltas[:, 1].float().abs().sum()).backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    assert float(raw.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())


def test_cpu_checkpoint_resumes_on_cuda_with_amp(tmp_path, monkeypatch):
    """A job preempted on a CPU node (or written by `make demo` here) goes on on a GPU node."""
    records = shapes_records(tmp_path / "images", 4, seed=0)
    train, val = Dataset(CLASSES, records), Dataset(CLASSES, records[:2])
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        td.train_detector(train, val, out, tiny_detector_config(epochs=1), "h", progress=False)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    metrics = td.train_detector(
        train, val, out, tiny_detector_config(epochs=2), "h", progress=False
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "epoch": 1} in log
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert 0.0 <= metrics["box_ap50"] <= 1.0


def test_segmenters_train_with_amp_and_predict_on_cuda(tmp_path):
    records = make_segmenter_data(tmp_path)
    cfg = InstanceTrainConfig(
        supervision="bbam", epochs=6, batch_size=2, min_size=64, max_size=64, warmup_iters=2,
        lr=0.01, device="cuda", hflip=False,
    )  # fmt: skip
    assert cfg.amp
    ins = train_instance(
        records, ["thing"], tmp_path / "ins", cfg, pseudo_json(tmp_path, records), progress=False
    )
    assert np.isfinite(ins.losses).all()
    assert np.mean(ins.losses[-3:]) < 0.7 * np.mean(ins.losses[:3])
    preds = predict_instances(ins.model, records[:1], device="cuda")
    assert all(0 <= p["score"] <= 1 for p in preds)
    sem = train_semantic(
        records, ["thing"], tmp_path / "sem", small_semantic_config(device="cuda"),
        pseudo_pngs(tmp_path, records), progress=False,
    )  # fmt: skip
    assert np.isfinite(sem.losses).all()
    assert np.mean(sem.losses[-3:]) < 0.7 * np.mean(sem.losses[:3])
    ((_, label),) = list(predict_semantic(sem.model, records[:1], device="cuda"))
    assert label.shape == (64, 64) and label.dtype == np.uint8
