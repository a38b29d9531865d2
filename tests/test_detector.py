"""Detector build, the no-RPN heads function, training, resume and weights errors (tiny sizes)."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers.builders import CLASSES, shapes_records, tiny_detector, tiny_detector_config
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

import bbam.train_detector as td
from bbam import training as T
from bbam.data.records import Dataset
from bbam.detector import (
    ARCHS,
    build_detector,
    fold_batchnorm,
    freeze,
    make_heads_fn,
    prepare_images,
    roi_head_forward,
)
from bbam.train_detector import DetectorTrainConfig, evaluate_box_ap, train_detector

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return shapes_records(tmp_path_factory.mktemp("shapes"), 4, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_each_arch(arch):
    model = build_detector(arch, 4, 64, 96, trainable_backbone_layers=2)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    flags = [p.requires_grad for p in model.backbone.body.parameters()]
    trainable, frozen = any(flags), not all(flags)
    assert trainable and frozen  # trainable_backbone_layers=2 freezes the early stages


@pytest.mark.parametrize("arch", ["resnet18_fpn", "mobilenet_v3_large_fpn"])
def test_narrow_fpn_and_box_head_run(arch):
    torch.manual_seed(0)
    model = build_detector(arch, 3, 64, 96, fpn_channels=64, representation_size=128).eval()
    assert model.backbone.out_channels == 64
    assert model.roi_heads.box_head.fc7.out_features == 128
    batch, _, _ = prepare_images(model, [np.zeros((64, 80, 3), np.uint8)])
    out = roi_head_forward(model, batch, [torch.tensor([[4.0, 4.0, 40.0, 30.0]])])
    assert out.logits.shape == (1, 3) and out.boxes.shape == (1, 3, 4)
    with torch.no_grad():
        assert set(model([torch.rand(3, 64, 80)])[0]) == {"boxes", "labels", "scores"}


def test_anchor_sizes_per_level():
    model = tiny_detector()
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    with pytest.raises(ValueError, match="5 anchor sizes"):
        build_detector("resnet18_fpn", 3, 64, 96, anchor_sizes=(8, 16))
    with pytest.raises(ValueError, match="unknown detector arch"):
        build_detector("vgg16", 3, 64, 96)


def test_prepare_images_matches_model_transform(records):
    model = tiny_detector().eval()
    rgb = np.asarray(Image.open(records[0].path))
    batch, scales, sizes = prepare_images(model, [rgb, rgb[:40, :50]])
    image_list, _ = model.transform([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255])
    assert sizes[0] == tuple(image_list.image_sizes[0]) == (64, 80)
    assert torch.allclose(batch[0, :, :64, :80], image_list.tensors[0, :, :64, :80], atol=1e-5)
    assert scales == pytest.approx([1.0, 64 / 40])
    assert sizes[1] == (64, 80)
    assert batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    model.train()
    prepare_images(model, [rgb])
    assert model.transform.training  # mode restored


def test_roi_head_forward_agrees_with_model(records):
    model = tiny_detector().eval()
    captured = {}
    heads = model.roi_heads
    hooks = [
        heads.box_roi_pool.register_forward_hook(
            lambda m, args, out: captured.update(proposals=args[1], image_shapes=args[2])
        ),
        heads.box_predictor.register_forward_hook(lambda m, args, out: captured.update(pred=out)),
        heads.register_forward_hook(lambda m, args, out: captured.update(dets=out[0])),
    ]
    rgb = np.asarray(Image.open(records[0].path))
    with torch.no_grad():
        model([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255])
    for hook in hooks:
        hook.remove()
    proposals = captured["proposals"]
    assert proposals[0].shape[0] > 10

    batch, _, sizes = prepare_images(model, [rgb])
    with torch.no_grad():
        out = roi_head_forward(model, batch, proposals, sizes)
        padded = make_heads_fn(model)(batch, proposals)
    logits, regression = captured["pred"]
    n = proposals[0].shape[0]
    assert out.logits.shape == (n, 3) and out.deltas.shape == (n, 3, 4)
    assert torch.allclose(out.logits, logits, atol=1e-4)
    assert torch.allclose(out.deltas, regression.reshape(n, 3, 4), atol=1e-4)
    assert torch.allclose(padded.logits, logits, atol=1e-4)

    # decoded boxes, by the Faster R-CNN formula with weights (10, 10, 5, 5)
    p = proposals[0]
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    px, py = p[:, 0] + pw / 2, p[:, 1] + ph / 2
    d = out.deltas[:, 2]
    cx, cy = px + d[:, 0] / 10 * pw, py + d[:, 1] / 10 * ph
    w, h = pw * torch.exp(d[:, 2] / 5), ph * torch.exp(d[:, 3] / 5)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    assert torch.allclose(out.boxes[:, 2], expected, atol=1e-3)

    # every detection of the model is a clipped decoded box of ours with our softmax score
    dets = captured["dets"][0]
    assert len(dets["boxes"]) > 0
    probs = out.logits.softmax(1)
    hh, ww = sizes[0]
    clipped = out.boxes.clone()
    clipped[..., 0::2] = clipped[..., 0::2].clamp(0, ww)
    clipped[..., 1::2] = clipped[..., 1::2].clamp(0, hh)
    for box, score, label in zip(dets["boxes"], dets["scores"], dets["labels"], strict=True):
        close = (clipped[:, label] - box).abs().max(1).values < 1e-3
        close &= (probs[:, label] - score).abs() < 1e-5
        assert close.any()


@pytest.mark.parametrize("arch", ["resnet18_fpn", "mobilenet_v3_large_fpn"])
def test_roi_head_forward_builds_only_the_pyramid_levels_it_pools(arch):
    """Same outputs and image gradients as torchvision's backbone + MultiScaleRoIAlign, and
    the finest level's output convolution runs only when a proposal is pooled from it (for
    ResNet-FPN, not for large proposals)."""
    sizes = (16, 32, 64, 128, 256) if arch != "mobilenet_v3_large_fpn" else (32, 64)
    model = freeze(build_detector(arch, 3, 224, 288, sizes, fpn_channels=32,
                                  representation_size=64))  # fmt: skip
    calls = []
    model.backbone.fpn.layer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 288, generator=generator, requires_grad=True)
    small_and_large = [torch.tensor([[8.0, 8, 30, 40], [0, 0, 220, 280]]),
                       torch.tensor([[50.0, 40, 120, 150]])]  # fmt: skip
    large = [torch.tensor([[0.0, 0, 200, 260]]), torch.tensor([[30.0, 20, 224, 288]])]
    for proposals in (small_and_large, large):
        calls.clear()
        out = roi_head_forward(model, images, proposals)
        (grad,) = torch.autograd.grad(out.logits.sum() + out.deltas.sum(), images)
        finest_used = 0 in model.roi_heads.box_roi_pool.map_levels(proposals).tolist()
        assert calls == ([1] if finest_used else [])
        heads = model.roi_heads
        pooled = heads.box_roi_pool(model.backbone(images), proposals, [(224, 288)] * 2)
        logits, regression = heads.box_predictor(heads.box_head(pooled))
        (expected,) = torch.autograd.grad(logits.sum() + regression.sum(), images)
        torch.testing.assert_close(out.logits, logits)
        torch.testing.assert_close(out.deltas.flatten(1), regression)
        torch.testing.assert_close(grad, expected)
        assert float(grad.abs().sum()) > 0
        if arch == "resnet18_fpn":
            assert finest_used == (proposals is small_and_large)


def _heads_and_image_grad(model, records):
    """The heads' outputs for 3 copies of a GT box, and the gradient of a loss on them with
    respect to the raw image."""
    rgb = np.asarray(Image.open(records[1].path))
    raw = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255).requires_grad_()
    batch, _, _ = prepare_images(model, [raw])
    box = torch.from_numpy(records[1].instances[0].box)[None]
    out = roi_head_forward(model, batch, [box.repeat(3, 1)])
    (out.logits[:, 1].sum() + out.deltas[:, 1].abs().sum()).backward()
    return out, raw.grad


def test_gradient_wrt_images(records):
    model = freeze(tiny_detector())
    _, grad = _heads_and_image_grad(model, records)
    assert grad is not None and torch.isfinite(grad).all()
    assert float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["batch", "frozen"])
def test_folding_batch_norms_keeps_the_detector_function(records, norm):
    model = tiny_detector(norm=norm)
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms
    for m in norms:  # statistics far from the identity, so folding has work to do
        for buffer in (m.running_mean, m.weight, m.bias):
            buffer.data.copy_(torch.randn(buffer.shape, generator=generator) * 0.3)
        m.running_var.data.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    plain = freeze(copy.deepcopy(model), fold_norms=False)
    folded = freeze(model)
    assert not any(
        isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules()
    )
    out_plain, grad_plain = _heads_and_image_grad(plain, records)
    out_folded, grad_folded = _heads_and_image_grad(folded, records)
    for name in ("logits", "deltas"):
        torch.testing.assert_close(
            getattr(out_folded, name), getattr(out_plain, name), rtol=1e-4, atol=1e-4
        )
    torch.testing.assert_close(grad_folded, grad_plain, rtol=1e-3, atol=1e-5)


def test_folding_leaves_training_norms_alone():
    model = tiny_detector().train()
    fold_batchnorm(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_training_lowers_loss(records, tmp_path):
    train, val = _datasets(records)
    config = tiny_detector_config(
        epochs=6,
        box_batch_size_per_image=32,
        rpn_post_nms_top_n_train=100,
        warmup_iters=0,
        lr_steps=(10,),
        hflip=False,
    )
    train_detector(train, val, tmp_path, config, params_hash="h", progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    history = [entry["loss"] for entry in log if entry.get("event") == "epoch_end"]
    assert len(history) == 6 and all(np.isfinite(history))
    assert np.mean(history[-2:]) < 0.7 * history[0]


def _datasets(records):
    return Dataset(CLASSES, records), Dataset(CLASSES, records[:2])


def test_kill_and_resume(records, tmp_path, monkeypatch):
    train, val = _datasets(records)
    config = tiny_detector_config(epochs=2)
    real = T.train_one_epoch

    def killed_in_epoch_1(model, loader, setup, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies during the second epoch
        return real(model, loader, setup, epoch, *args)

    monkeypatch.setattr(T, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_detector(train, val, tmp_path, config, params_hash="h1", progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["params_hash"] == "h1"  # the last finished epoch
    assert not (tmp_path / "model.pt").exists()
    saved_momentum = [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
    assert saved_momentum

    seen = []

    def recording(model, loader, setup, epoch, *args):
        state = setup.optimizer.state_dict()["state"]
        seen.append((epoch, [s["momentum_buffer"].clone() for s in state.values()]))
        return real(model, loader, setup, epoch, *args)

    monkeypatch.setattr(T, "train_one_epoch", recording)
    metrics = train_detector(train, val, tmp_path, config, params_hash="h1", progress=False)
    assert [epoch for epoch, _ in seen] == [1]
    restored = seen[0][1]
    assert len(restored) == len(saved_momentum)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(restored, saved_momentum, strict=True))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics and set(metrics) >= {
        "box_ap",
        "box_ap50",
        "box_ap75",
        "train_seconds",
    }
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "epoch": 1} in log
    assert any(entry.get("iter") == 0 and "loss_classifier" in entry for entry in log)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["meta"]["classes"] == CLASSES and saved["meta"]["config"]["epochs"] == 2
    state = saved["model"]
    model = freeze(td.detector_from_config(config, 3, weights=tmp_path / "model.pt"), False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key].cpu(), value.cpu()), key

    # a different params hash starts over from epoch 0
    seen.clear()
    train_detector(train, val, tmp_path, config, params_hash="h2", progress=False)
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert seen[0][1] == []  # a fresh optimizer: no momentum restored
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log.count({"event": "restart", "reason": "params_hash changed"}) == 1


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(TypeError):
        DetectorTrainConfig(**{"arch": "resnet18_fpn", "epochz": 3})
    with pytest.raises(ValueError, match="arch"):
        DetectorTrainConfig(arch="resnet7")
    assert DetectorTrainConfig(anchor_sizes=[1, 2, 3, 4, 5]).anchor_sizes == (1, 2, 3, 4, 5)


class _Oracle(torch.nn.Module):
    """Returns given detections per image, to check the AP computation itself."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, images):
        out = self.outputs[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


def test_evaluate_box_ap(records):
    def dets(shift: float):
        return [
            {
                "boxes": torch.tensor(np.stack([i.box for i in r.instances]) + shift),
                "scores": torch.ones(len(r.instances)),
                "labels": torch.tensor([i.label for i in r.instances]),
            }
            for r in records
        ]

    perfect = evaluate_box_ap(_Oracle(dets(0.0)), records, CLASSES, "cpu")
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ap50"] == pytest.approx(1.0)
    shifted = evaluate_box_ap(_Oracle(dets(3.0)), records, CLASSES, "cpu")
    assert shifted["ap50"] > shifted["ap75"] and shifted["ap"] < 1.0
    wrong = dets(0.0)
    for d in wrong:
        d["labels"] = 3 - d["labels"]
    assert evaluate_box_ap(_Oracle(wrong), records, CLASSES, "cpu")["ap50"] == 0.0


def test_missing_weights_file_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tiny_detector(weights=missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tiny_detector(weights_backbone=missing)


def test_weights_roundtrip_and_incompatible_shapes(tmp_path):
    source = tiny_detector(num_classes=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    loaded = tiny_detector(num_classes=3, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="cls_score.weight") as info:
        tiny_detector(num_classes=5, weights=path)
    assert str(path) in str(info.value) and "bbox_pred.weight" in str(info.value)

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in source.state_dict().items() if "rpn" not in k}, partial)
    with pytest.raises(ValueError, match="missing keys"):
        tiny_detector(weights=partial)


def test_backbone_weights_from_classifier(tmp_path):
    from torchvision.models import resnet18

    classifier = resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(classifier.state_dict(), path)
    model = tiny_detector(weights_backbone=path, norm="frozen")
    assert torch.equal(model.backbone.body.conv1.weight, classifier.conv1.weight)
    assert torch.equal(
        model.backbone.body.layer1[0].bn1.running_var, classifier.layer1[0].bn1.running_var
    )


def test_a_list_of_min_sizes_trains_multi_scale_and_tests_at_the_last():
    """The reference trains its detector at short sides 480-800 and Mask R-CNN at 416-512."""
    from bbam.segmenters.instance import InstanceTrainConfig, build_instance_model

    config = DetectorTrainConfig(min_size=[48, 64, 80], max_size=200)
    assert config.min_size == (48, 64, 80)
    assert DetectorTrainConfig(min_size=64).min_size == 64
    model = td.detector_from_config(config, 3)
    instance = build_instance_model(InstanceTrainConfig(min_size=[48, 64, 80], max_size=200), 3)
    torch.manual_seed(0)
    image = torch.rand(3, 40, 60)
    for transform in (model.transform, instance.transform):
        transform.train()
        seen = {transform([image])[0].image_sizes[0][0] for _ in range(40)}
        assert seen == {48, 64, 80}
        transform.eval()
        assert transform([image])[0].image_sizes[0][0] == 80
    for bad in ([], [64, 0], "800", [64.5]):
        with pytest.raises(ValueError, match="min_size"):
            DetectorTrainConfig(min_size=bad)
        with pytest.raises(ValueError, match="min_size"):
            InstanceTrainConfig(min_size=bad)
