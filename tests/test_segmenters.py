import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.builders import make_segmenter_data, pseudo_json, pseudo_pngs, small_semantic_config
from PIL import Image
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from bbam import training as T
from bbam.data.palette import save_palette_png
from bbam.data.records import ImageRecord, Instance
from bbam.segmenters.instance import (
    InstanceTrainConfig,
    build_instance_model,
    predict_instances,
    train_instance,
)
from bbam.segmenters.mask_loss import (
    MASK_IGNORE,
    grow_seeds,
    ignore_aware_mask_loss,
    project_targets,
)
from bbam.segmenters.semantic import (
    SemanticTrainConfig,
    build_semantic_model,
    predict_semantic,
    train_semantic,
)
from bbam.segmenters.targets import (
    instance_targets,
    load_pseudo_gt,
    render_label_map,
    semantic_target,
)

torch.set_num_threads(1)


def _seed_grid():
    fg = torch.zeros(1, 7, 7, dtype=torch.bool)
    fg[0, 0, 0] = True
    ignore = torch.zeros(1, 7, 7, dtype=torch.bool)
    ignore[0, 1:6, 1:6] = True
    p = torch.full((1, 7, 7), 0.5)
    p[0, 0, 0] = 0.01  # fg seed with low sigma: must stay fg
    p[0, 6, 6] = 0.99  # bg seed with high sigma: must stay bg
    p[0, 1, 1] = 0.95  # touches the fg seed -> grows into fg
    p[0, 1, 2] = 0.9  # exactly at the threshold -> not a candidate
    p[0, 5, 5] = 0.95  # no fg neighbour -> ignored
    p[0, 3, 3] = 0.05  # surrounded by undecided ignore pixels -> ignored
    p[0, 5, 1] = 0.05  # touches bg seeds -> grows into bg
    p[0, 1, 5] = p[0, 2, 5] = 0.95  # two fg candidates touching each other -> both grow
    return p, fg, ignore


def test_seed_growing_hand_grid():
    p, fg, ignore = _seed_grid()
    use_fg, use_bg = grow_seeds(p, fg, ignore, 0.9, 0.1)
    expect_fg = {(0, 0), (1, 1), (1, 5), (2, 5)}
    assert {tuple(x) for x in torch.nonzero(use_fg[0]).tolist()} == expect_fg
    expect_bg = {(y, x) for y in range(7) for x in range(7) if not ignore[0, y, x]} - {(0, 0)}
    assert {tuple(x) for x in torch.nonzero(use_bg[0]).tolist()} == expect_bg | {(5, 1)}
    assert not (use_fg & use_bg).any()
    # the neighbour rule applies to seeds too: an isolated fg seed drops out (reference)
    lone = torch.zeros(1, 5, 5, dtype=torch.bool)
    lone[0, 2, 2] = True
    no_ign = torch.zeros_like(lone)
    lone_fg, lone_bg = grow_seeds(torch.full((1, 5, 5), 0.5), lone, no_ign)
    assert not lone_fg.any() and torch.equal(lone_bg, ~lone)
    logits = torch.zeros(1, 5, 5, requires_grad=True)
    loss = ignore_aware_mask_loss(logits, lone, no_ign)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()  # no counted fg -> zero (reference)
    # without seed growing (full / box masks) every pixel counts
    plain = ignore_aware_mask_loss(torch.zeros(1, 5, 5), lone, no_ign, seed_growing=False)
    assert plain.item() == pytest.approx(float(np.log(2)))


def test_mask_loss_gradient_zero_at_ignored_pixels():
    p, fg, ignore = _seed_grid()
    logits = torch.logit(p).clone().requires_grad_(True)
    loss = ignore_aware_mask_loss(logits, fg, ignore)
    loss.backward()
    use_fg, use_bg = grow_seeds(p, fg, ignore)
    counted = use_fg | use_bg
    assert (logits.grad[~counted] == 0).all()
    assert (logits.grad[counted] != 0).all()
    assert (logits.grad[use_fg] < 0).all() and (logits.grad[use_bg] > 0).all()
    # class balance: fg and bg each weigh one half, whatever their pixel counts
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.detach(), use_fg.float(), reduction="none"
    )
    assert loss.item() == pytest.approx(
        0.5 * (bce[use_fg].mean() + bce[use_bg].mean()).item(), rel=1e-5
    )


def test_roi_heads_loss_ignores_projected_ignore_band():
    cfg = InstanceTrainConfig(min_size=64, max_size=64, device="cpu")
    heads = build_instance_model(cfg, 2).roi_heads
    masks = torch.zeros(1, 28, 28, dtype=torch.uint8)
    masks[0, 6:20, 6:20] = 1
    masks[0, 4:22, 4:22][masks[0, 4:22, 4:22] == 0] = MASK_IGNORE
    box = torch.tensor([[-0.5, -0.5, 27.5, 27.5]])  # roi_align samples exactly at pixel centres
    idx = torch.tensor([0])
    fg, ign = project_targets(masks, box, idx, 28)
    assert torch.equal(fg[0], masks[0] == 1) and torch.equal(ign[0], masks[0] == MASK_IGNORE)
    ref = project_masks_on_boxes((masks == 1).to(torch.uint8), box, idx, 28) >= 0.5
    assert torch.equal(fg, ref)
    logits = torch.zeros(1, 2, 28, 28, requires_grad=True)  # sigma .5: nothing grows
    target = {"masks": masks, "labels": torch.tensor([1])}
    heads.mask_loss(logits, [box], [target], [idx]).backward()
    assert (logits.grad[0, 1][masks[0] == MASK_IGNORE] == 0).all()
    assert (logits.grad[0, 1][masks[0] != MASK_IGNORE] != 0).all()
    assert (logits.grad[0, 0] == 0).all()  # other classes' channels get no gradient


def test_transform_keeps_ignore_value():
    model = build_instance_model(InstanceTrainConfig(min_size=96, max_size=96), 2)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 10:30] = MASK_IGNORE
    masks[0, 15:25, 15:25] = 1
    _, targets = model.transform(
        [torch.rand(3, 64, 64)],
        [
            {
                "boxes": torch.tensor([[10.0, 10, 30, 30]]),
                "labels": torch.tensor([1]),
                "masks": masks,
            }
        ],
    )
    assert set(targets[0]["masks"].unique().tolist()) == {0, 1, MASK_IGNORE}


def test_pseudo_targets_encode_ignore(tmp_path):
    records = make_segmenter_data(tmp_path, n=1)
    pseudo = load_pseudo_gt(pseudo_json(tmp_path, records), ["thing"])
    boxes, labels, masks = instance_targets(records[0], "bbam", pseudo)
    inst = records[0].instances[0]
    assert labels.tolist() == [1] and np.allclose(boxes[0], inst.box)
    assert (masks[0] == MASK_IGNORE).sum() > 0 and ((masks[0] > 0) == inst.mask).all()
    _, _, box_masks = instance_targets(records[0], "box", None)
    assert box_masks[0].sum() == 24 * 28 and set(np.unique(box_masks)) == {0, 1}


def test_instance_training_loss_decreases_and_predicts(tmp_path):
    records = make_segmenter_data(tmp_path)
    cfg = InstanceTrainConfig(
        supervision="bbam",
        epochs=6,
        batch_size=2,
        min_size=64,
        max_size=64,
        warmup_iters=2,
        lr=0.01,
        device="cpu",
        hflip=False,
    )
    res = train_instance(
        records, ["thing"], tmp_path / "ins", cfg, pseudo_json(tmp_path, records), progress=False
    )
    assert len(res.losses) == 12
    assert np.mean(res.losses[-3:]) < 0.7 * np.mean(res.losses[:3])
    assert (tmp_path / "ins" / "model.pt").is_file() and (
        tmp_path / "ins" / "train_log.jsonl"
    ).is_file()
    preds = predict_instances(res.model, records[:1], device="cpu")
    assert all(p["image_id"] == "img0" and 0 <= p["score"] <= 1 for p in preds)


def test_semantic_targets_and_box_order(tmp_path):
    big = Instance(1, 1, np.array([0, 0, 10, 10], float))
    small = Instance(2, 2, np.array([2, 2, 5, 5], float))
    rec = ImageRecord("r", tmp_path / "r.png", 12, 12, [small, big])  # small listed first
    label = render_label_map(rec, "box")
    assert label[3, 3] == 2 and label[8, 8] == 1 and label[11, 11] == 0
    save_palette_png(tmp_path / "p" / "r.png", np.full((12, 12), 255, np.uint8))
    assert (semantic_target(rec, "bbam", tmp_path / "p", None) == 255).all()
    assert semantic_target(rec, "bbam", tmp_path / "missing", None) == "no pseudo label PNG"
    assert semantic_target(rec, "full", None, None) == "instance without GT mask (full supervision)"


def test_semantic_gradient_zero_at_ignore():
    model = build_semantic_model(SemanticTrainConfig(), 3).eval()
    logits = model(torch.rand(1, 3, 32, 32)).detach().requires_grad_(True)
    target = torch.randint(0, 3, (1, 32, 32))
    target[0, :10] = 255
    torch.nn.functional.cross_entropy(logits, target, ignore_index=255).backward()
    assert (logits.grad[0][:, :10] == 0).all() and (logits.grad[0][:, 10:] != 0).any()


def test_semantic_training_loss_decreases(tmp_path):
    records = make_segmenter_data(tmp_path)
    res = train_semantic(
        records,
        ["thing"],
        tmp_path / "s",
        small_semantic_config(),
        pseudo_pngs(tmp_path, records),
        progress=False,
    )
    assert len(res.losses) == 10
    assert np.mean(res.losses[-3:]) < 0.7 * np.mean(res.losses[:3])
    ((rec, label),) = list(predict_semantic(res.model, records[:1], device="cpu"))
    assert label.shape == (64, 64) and label.dtype == np.uint8
    ((_, half),) = list(predict_semantic(res.model, records[:1], device="cpu", scale=0.5))
    assert half.shape == (64, 64)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    records = make_segmenter_data(tmp_path)
    sem = pseudo_pngs(tmp_path, records)
    cfg = small_semantic_config(epochs=2)
    full = train_semantic(records, ["thing"], tmp_path / "a", cfg, sem, progress=False)

    real_save = T.save_checkpoint

    def save_then_die(out_dir, phash, epoch, *args, **numbers):
        real_save(out_dir, phash, epoch, *args, **numbers)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_semantic(records, ["thing"], tmp_path / "b", cfg, sem, progress=False)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    resumed = train_semantic(records, ["thing"], tmp_path / "b", cfg, sem, progress=False)
    assert resumed.start_epoch == 1 and len(resumed.losses) == 1
    assert resumed.losses[0] == pytest.approx(full.losses[1], rel=1e-4)
    for (k, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    other = train_semantic(
        records,
        ["thing"],
        tmp_path / "b",
        small_semantic_config(epochs=2, lr=0.01),
        sem,
        progress=False,
    )
    assert other.start_epoch == 0  # params_hash differs -> fresh start
    assert T.params_hash(cfg) == T.params_hash(
        small_semantic_config(epochs=2, device="cuda", num_workers=3)
    )


def test_new_labels_restart_a_finished_training(tmp_path):
    """Same config, same paths, other label content (a re-run pseudo-label stage): the
    finished checkpoint must not be reused."""
    records = make_segmenter_data(tmp_path)
    sem = pseudo_pngs(tmp_path, records)
    cfg = small_semantic_config(epochs=1)
    train_semantic(records, ["thing"], tmp_path / "s", cfg, sem, progress=False)
    again = train_semantic(records, ["thing"], tmp_path / "s", cfg, sem, progress=False)
    assert again.start_epoch == 1  # unchanged data: resumes (nothing left to do)
    png = Path(sem) / f"{records[0].image_id}.png"
    label = np.array(Image.open(png))
    label[:8, :8] = 255
    save_palette_png(png, label)
    changed = train_semantic(records, ["thing"], tmp_path / "s", cfg, sem, progress=False)
    assert changed.start_epoch == 0 and len(changed.losses) > 0

    ins_cfg = InstanceTrainConfig(
        supervision="full", epochs=1, batch_size=2, min_size=64, max_size=64, device="cpu"
    )
    train_instance(records[:2], ["thing"], tmp_path / "i", ins_cfg, progress=False)
    records[0].instances[0].box = records[0].instances[0].box + 1.0
    moved = train_instance(records[:2], ["thing"], tmp_path / "i", ins_cfg, progress=False)
    assert moved.start_epoch == 0, "changed GT boxes must not resume the finished model"


def test_data_digest_covers_annotations_and_file_bytes(tmp_path):
    records = make_segmenter_data(tmp_path, n=2)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a")
    base = T.data_digest(records, [weights, None])
    assert base == T.data_digest(records, [weights])
    weights.write_bytes(b"b")
    assert T.data_digest(records, [weights]) != base
    weights.write_bytes(b"a")
    records[1].instances[0].label = 2
    assert T.data_digest(records, [weights]) != base


def test_config_and_weights_errors(tmp_path):
    with pytest.raises(ValueError):
        InstanceTrainConfig(supervision="scribble")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_instance_model(InstanceTrainConfig(weights=str(tmp_path / "nope.pt")), 2)
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no parameter"):
        build_instance_model(InstanceTrainConfig(weights=str(tmp_path / "bad.pt")), 2)


def test_semantic_training_refuses_more_classes_than_a_label_map_holds(tmp_path):
    classes = [f"c{k}" for k in range(255)]  # label 255 is the ignore label
    with pytest.raises(ValueError, match="254 classes"):
        train_semantic([], classes, tmp_path / "out", small_semantic_config())


def test_datasets_count_skips(tmp_path):
    from bbam.data.records import SkipReport
    from bbam.segmenters.instance import InstanceTrainDataset
    from bbam.segmenters.semantic import SemanticTrainDataset

    records = make_segmenter_data(tmp_path, n=3)
    records[2].instances[0].mask = None
    skipped = SkipReport()
    ds = SemanticTrainDataset(records, "full", None, None, 64, False, skipped)
    assert len(ds) == 2 and skipped.counts == {"instance without GT mask (full supervision)": 1}
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and set(target.unique().tolist()) == {0, 1}
    pseudo = load_pseudo_gt(pseudo_json(tmp_path, records[:2]), ["thing"])
    skipped = SkipReport()
    ids = InstanceTrainDataset(records, "bbam", pseudo, True, skipped)
    assert len(ids) == 2 and skipped.counts == {"no pseudo labels for image": 1}
    _, target = ids[1]
    assert target["masks"].shape == (1, 64, 64) and (target["masks"] == MASK_IGNORE).any()


def test_an_image_the_pseudo_label_stage_failed_on_is_skipped_not_trained_as_background(
    tmp_path,
):
    """A pseudo GT (not this project's stage, which leaves such images out) lists an image
    with no annotation for its boxes: they must not become background for the Mask R-CNN.
    An image with crowd regions only has no box to label, and stays."""
    import json

    from bbam.data.records import SkipReport
    from bbam.segmenters.instance import InstanceTrainDataset

    records = make_segmenter_data(tmp_path, n=4)
    records[3].instances[0].iscrowd = True
    path = pseudo_json(tmp_path, records)
    data = json.loads(path.read_text())
    unlabelled = {data["images"][1]["id"], data["images"][3]["id"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in unlabelled]
    path.write_text(json.dumps(data))
    skipped = SkipReport()
    dataset = InstanceTrainDataset(records, "bbam", load_pseudo_gt(path, ["thing"]), False, skipped)
    assert [record.image_id for record, _ in dataset.items] == ["img0", "img2", "img3"]
    assert skipped.examples == {"pseudo GT has none of the image's boxes": ["img1"]}
    assert len(dataset.items[2][1][0]) == 0  # the crowd-only image: no box, no object lost


def test_a_pseudo_label_of_the_wrong_size_is_named_not_its_image(tmp_path):
    from bbam.data.records import DataError, SkipReport
    from bbam.segmenters.semantic import SemanticTrainDataset

    records = make_segmenter_data(tmp_path, n=2)
    sem = pseudo_pngs(tmp_path, records)
    save_palette_png(sem / "img1.png", np.zeros((32, 32), np.uint8))  # a 64x64 image
    dataset = SemanticTrainDataset(records, "bbam", sem, None, 64, False, SkipReport())
    with pytest.raises(DataError, match=f"^{sem / 'img1.png'}: label map size differs"):
        dataset[1]


def test_instance_checkpoint_resume(tmp_path):
    records = make_segmenter_data(tmp_path, n=2)
    cfg = InstanceTrainConfig(
        supervision="full",
        epochs=1,
        batch_size=2,
        min_size=64,
        max_size=64,
        device="cpu",
        hflip=False,
    )
    first = train_instance(records, ["thing"], tmp_path / "ins", cfg, progress=False)
    again = train_instance(records, ["thing"], tmp_path / "ins", cfg, progress=False)
    assert len(first.losses) == 1 and again.start_epoch == 1 and again.losses == []
    for a, b in zip(
        first.model.state_dict().values(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_segmenters_start_from_a_trained_detector(tmp_path):
    """The CPU default initialises both networks from the pipeline's own box detector
    (no ImageNet weights offline): its keys carry `backbone.body.` for the bare ResNet."""
    from bbam.segmenters.instance import InstanceTrainConfig, build_instance_model
    from bbam.segmenters.semantic import SemanticTrainConfig, build_semantic_model
    from bbam.train_detector import DetectorTrainConfig, detector_from_config

    detector = detector_from_config(DetectorTrainConfig(min_size=64, max_size=96), 3)
    path = tmp_path / "detector.pt"
    torch.save(detector.state_dict(), path)
    conv1 = detector.state_dict()["backbone.body.conv1.weight"]

    semantic = build_semantic_model(SemanticTrainConfig(weights_backbone=str(path)), 3)
    found = [
        v
        for k, v in semantic.state_dict().items()
        if k.endswith("conv1.weight") and v.shape == conv1.shape
    ]
    assert any(torch.equal(v, conv1) for v in found)

    instance = build_instance_model(
        InstanceTrainConfig(weights=str(path), norm="batch", min_size=64, max_size=96), 3
    )
    state = instance.state_dict()
    assert torch.equal(state["backbone.body.conv1.weight"], conv1)
    box_head = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(state[box_head], detector.state_dict()[box_head])


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet18_deeplab_output_stride_keeps_the_detector_weights(tmp_path, output_stride):
    """Dilation changes the feature grid (image / output_stride), not the weights, so a
    detector's ResNet-18 body loads into either; other archs refuse a stride they lack."""
    from bbam.train_detector import DetectorTrainConfig, detector_from_config

    detector = detector_from_config(DetectorTrainConfig(min_size=64, max_size=96), 3)
    path = tmp_path / "detector.pt"
    torch.save(detector.state_dict(), path)
    config = SemanticTrainConfig(output_stride=output_stride, weights_backbone=str(path))
    model = build_semantic_model(config, 3).eval()
    features = model.net.backbone(torch.rand(1, 3, 64, 96))["out"]
    assert features.shape[-2:] == (64 // output_stride, 96 // output_stride)
    body = model.net.backbone.state_dict()
    for key, value in detector.state_dict().items():
        if key.startswith("backbone.body.layer4"):
            assert torch.equal(body[key.removeprefix("backbone.body.")], value)
    assert model(torch.rand(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="output_stride"):
        SemanticTrainConfig(arch="resnet50", output_stride=16)


def test_semantic_fpn_head_takes_the_whole_detector_backbone(tmp_path):
    """The semantic FPN reads the detector's FPN, so a detector file fills its backbone
    (body and FPN, every key); it predicts at input size, trains, and refuses what it lacks."""
    from bbam.train_detector import DetectorTrainConfig, detector_from_config

    det_config = DetectorTrainConfig(min_size=64, max_size=96, fpn_channels=64)
    detector = detector_from_config(det_config, 3)
    path = tmp_path / "detector.pt"
    torch.save(detector.state_dict(), path)
    config = SemanticTrainConfig(head="fpn", fpn_channels=64, weights_backbone=str(path))
    model = build_semantic_model(config, 3).eval()
    backbone = model.net.backbone.state_dict()
    detector_backbone = {
        k.removeprefix("backbone."): v
        for k, v in detector.state_dict().items()
        if k.startswith("backbone.")
    }
    assert detector_backbone.keys() == backbone.keys()
    assert all(torch.equal(backbone[k], v) for k, v in detector_backbone.items())
    assert model(torch.rand(2, 3, 64, 96)).shape == (2, 3, 64, 96)
    # a classification ResNet (ImageNet-style keys, its fc ignored) fills the body alone
    from torchvision.models import resnet18

    classifier = resnet18(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    config = SemanticTrainConfig(head="fpn", weights_backbone=str(tmp_path / "resnet18.pth"))
    body = build_semantic_model(config, 3).net.backbone.body.state_dict()
    assert torch.equal(
        body["layer4.1.conv2.weight"], classifier.state_dict()["layer4.1.conv2.weight"]
    )

    records = make_segmenter_data(tmp_path)
    res = train_semantic(
        records,
        ["thing"],
        tmp_path / "s",
        small_semantic_config(head="fpn", fpn_channels=64),
        pseudo_pngs(tmp_path, records),
        progress=False,
    )
    assert np.mean(res.losses[-3:]) < 0.7 * np.mean(res.losses[:3])
    ((_, label),) = list(predict_semantic(res.model, records[:1], device="cpu"))
    assert label.shape == (64, 64)
    narrower = SemanticTrainConfig(head="fpn", fpn_channels=32, weights_backbone=str(path))
    with pytest.raises(ValueError, match="FPN has 64 channels.*fpn_channels is 32"):
        build_semantic_model(narrower, 3)
    with pytest.raises(ValueError, match="head fpn"):
        SemanticTrainConfig(head="fpn", arch="mobilenet_v3_large")
    with pytest.raises(ValueError, match="output_stride"):
        SemanticTrainConfig(head="fpn", output_stride=8)
    with pytest.raises(ValueError, match="head"):
        SemanticTrainConfig(head="unet")


@pytest.mark.parametrize(("head", "arch"), [("fpn", "resnet18"), ("deeplab", "resnet18")])
def test_semantic_trainable_backbone_layers_freeze_the_lower_stages(tmp_path, head, arch):
    """3 trainable stages: the stem and layer1 get no gradient and keep their weights through
    training, the stages above and the head learn; 5 trains everything (the stem's norm too)."""
    records = make_segmenter_data(tmp_path)
    frozen = small_semantic_config(head=head, arch=arch, trainable_backbone_layers=3)
    res = train_semantic(
        records, ["thing"], tmp_path / "s", frozen, pseudo_pngs(tmp_path, records), progress=False
    )
    torch.manual_seed(frozen.seed)  # train_semantic's initialisation
    start = build_semantic_model(frozen, 2).state_dict()
    trained = res.model.state_dict()
    body = "net.backbone.body." if head == "fpn" else "net.backbone."
    for name, param in res.model.named_parameters():
        low = name.startswith(tuple(body + s for s in ("conv1", "bn1", "layer1.")))
        assert param.requires_grad != low, name
        if low:
            assert torch.equal(trained[name], start[name]), name
    assert not torch.equal(
        trained[body + "layer4.0.conv1.weight"], start[body + "layer4.0.conv1.weight"]
    )
    everything = build_semantic_model(small_semantic_config(head=head, arch=arch), 2)
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        SemanticTrainConfig(trainable_backbone_layers=6)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        SemanticTrainConfig(arch="mobilenet_v3_large", trainable_backbone_layers=3)


def test_pseudo_gt_finds_an_image_by_its_file_before_another_images_numeric_id(tmp_path):
    """A record's image_id is its file stem: "1.jpg" (id 2) must not get the masks of the
    image whose id is 1 ("2.jpg"), whatever the order of the entries."""
    from bbam.data.records import ImageRecord

    images = [
        {"id": 2, "file_name": "1.jpg", "width": 8, "height": 8},
        {"id": 1, "file_name": "2.jpg", "width": 8, "height": 8},
        {"id": 5, "file_name": "sub/x.png", "width": 8, "height": 8},
    ]
    anns = [
        {"id": 10, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [4, 4, 2, 2]},
    ]
    for order in (images, images[::-1]):
        path = tmp_path / "pseudo.json"
        path.write_text(json.dumps({"images": order, "annotations": anns, "categories": []}))
        pseudo = load_pseudo_gt(path, ["thing"])
        for name, want in (("1.jpg", 10), ("2.jpg", 11)):
            record = ImageRecord(Path(name).stem, tmp_path / name, 8, 8, [])
            image, found = pseudo.lookup(record)
            assert image["file_name"] == name and [a["id"] for a in found] == [want]
        assert pseudo.lookup(ImageRecord("x", tmp_path / "x.png", 8, 8, []))[0]["id"] == 5
        assert pseudo.lookup(ImageRecord("7", tmp_path / "7.jpg", 8, 8, [])) is None
