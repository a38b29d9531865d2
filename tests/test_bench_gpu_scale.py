import json
from pathlib import Path

import pytest
import torch
import yaml

from bbam.attribution import attribute_instances, profile_config
from bbam.data.prepare import prepare_dataset
from bench import gpu_scale
from tasks.params import load_params

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "arch": "resnet18_fpn",
    "min_size": 96,
    "max_size": 132,
    "anchor_sizes": [16, 32, 64, 128, 256],
    "fpn_channels": 32,
    "representation_size": 64,
}


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    """params.yaml on a 4-image synthetic set of its own."""
    tmp = tmp_path_factory.mktemp("gpu_scale")
    params = load_params(ROOT / "params.yaml")
    root = tmp / "synthetic"
    params["synthetic"].update(num_train=4, num_val=1)
    for split in ("train", "val"):
        params["data"][f"{split}_json"] = str(root / f"annotations/instances_{split}.json")
        params["data"][f"{split}_images"] = str(root / "VOC2012/JPEGImages")
    params["data"]["root"] = str(root)
    prepare_dataset("synthetic", root, None, tmp / "downloads", synthetic=params["synthetic"])
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_random_detector_made_self_confirming_gives_every_instance_positives(tiny_params):
    """After self_confirming, an instance's positives are exactly its jitters whose own IoU
    with the box passes the threshold (each is classified as the label and decoded onto
    itself), up to the cap; a random detector's are not."""
    from bbam.jitter import box_iou_to_one, instance_generator, jitter_boxes

    params = load_params(tiny_params)
    params["detector"].update({**gpu_scale.PAPER_DETECTOR, **TINY})
    torch.manual_seed(0)  # the random detector's weights, the same in any test order
    model, items, _ = gpu_scale.detector_items(params, None, "train", 4)
    items = [gpu_scale.dataclasses.replace(it, label=1) for it in items]
    cfg = profile_config("reference", iterations=1)

    def expected(item, threshold: float) -> int:
        generator = instance_generator(cfg.seed, item.key)
        jitters = jitter_boxes(
            item.box, cfg.num_jitters, cfg.jitter_fraction, item.valid_hw, generator
        )
        iou = box_iou_to_one(jitters, item.box.float(), truncate=cfg.iou_truncate)
        return min(int((iou > threshold).sum()), cfg.max_positives)

    def matches(results) -> list[bool]:
        return [
            r.status == "ok" and r.stats["positives"] == expected(it, r.stats["threshold_used"])
            for it, r in zip(items, results, strict=True)
        ]

    assert not all(matches(attribute_instances(gpu_scale.make_heads_fn(model), items, cfg, "cpu")))
    gpu_scale.self_confirming(model, label=1)
    assert all(matches(attribute_instances(gpu_scale.make_heads_fn(model), items, cfg, "cpu")))


def test_gpu_scale_times_steps_and_projects_voc(tiny_params, tmp_path):
    results = tmp_path / "results.json"
    argv = [
        "--params", str(tiny_params), "--detector", json.dumps(TINY),
        "--batch-sizes", "1", "2", "--reference-instances", "2", "--steps", "1", "3",
        "--peak-size", "64", "--fast-iterations", "50", "--results", str(results),
        "--ablation-steps", "1", "2", "--profile", str(tmp_path / "profile.txt"),
    ]  # fmt: skip
    assert gpu_scale.main(argv) == 0
    entry = json.loads(results.read_text())["gpu_scale"]
    rows = entry["rows"]
    assert set(rows) == {"reference", "fast_bs1", "fast_bs2", "fast_small"}
    assert entry["best_fast"] != "fast_small" and rows["fast_small"]["batch_size"] == 2
    assert rows["reference"]["iterations_per_instance"] == 300
    assert rows["fast_bs2"]["iterations_per_instance"] == 50
    for name, row in rows.items():
        # 80-px boxes do not all fit the tiny images (at 800 px they do)
        assert row["ok"] == row["instances"] > 0 or (name == "fast_small" and row["ok"] > 0)
        assert row["ms_per_instance_step"] > 0
        per_instance = gpu_scale.seconds_per_instance(row, row["iterations_per_instance"])
        assert row["instances_per_s"] == pytest.approx(1 / per_instance)
    best = rows[entry["best_fast"]]
    assert entry["speedup"] == pytest.approx(
        best["instances_per_s"] / rows["reference"]["instances_per_s"]
    )
    hours = entry["voc_train_aug_gpu_hours"]
    assert hours["fast"] == pytest.approx(
        entry["voc_train_aug_instances"] / best["instances_per_s"] / 3600
    )
    assert hours["fast_small_objects"] == pytest.approx(
        entry["voc_train_aug_instances"] / rows["fast_small"]["instances_per_s"] / 3600
    )
    assert 0 < best["fraction_of_bf16_peak"] and best["tflops_achieved"] > 0
    variants = entry["speedups_at_largest_batch"]
    assert len(variants) == 6 and all(v["batch_size"] == 2 for v in variants.values())
    assert "folded, every pyramid level built" in variants
    assert all(v["ok"] == v["instances"] == 2 for v in variants.values())
    assert "aten::" in (tmp_path / "profile.txt").read_text()


def test_gpu_check_shows_a_kept_run(capsys):
    from bench import gpu_check

    kept = sorted((ROOT / "bench" / "gpu_runs").glob("*_h200_run3.json"))
    assert kept, "the H200 run of issue #16 is kept under bench/gpu_runs/"
    assert gpu_check.main(["--show", str(kept[0])]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "fast_bs32" in out and "VOC train_aug" in out
    assert out.index("reference") < out.index("fast_bs1") < out.index("fast_bs64")
