import json

import numpy as np
import pytest
import torch

from bench import attribution as bench

torch.set_num_threads(1)


def _toy_bench(tmp_path, monkeypatch, *extra: str) -> dict:
    """bench.attribution on the toy detector (2 instances, 1 for the reference): its object."""
    results = tmp_path / "results.json"
    monkeypatch.setattr(
        bench,
        "merge_results",
        lambda key, value, *_: results.write_text(json.dumps({key: value}, default=float)),
    )
    assert bench.main(["--instances", "2", "--reference-instances", "1", *extra]) == 0
    return json.loads(results.read_text())["attribution"]


def test_toy_bench_writes_the_attribution_object(tmp_path, monkeypatch):
    entry = _toy_bench(tmp_path, monkeypatch)
    for key in (
        "reference_instances_per_s",
        "fast_instances_per_s",
        "speedup",
        "agreement_iou",
        "flops_utilization",
        "reference_self_agreement_iou",
    ):
        assert key in entry
    assert entry["speedup"] == entry["fast_instances_per_s"] / entry["reference_instances_per_s"]
    assert 0.0 <= entry["agreement_iou"] <= 1.0
    # the toy detector explains a disk the same way whatever the jitter seed
    assert entry["reference_self_agreement_iou"] > 0.8
    assert (
        entry["agreement_relative"]
        == entry["agreement_iou"] / entry["reference_self_agreement_iou"]
    )
    for key in ("refined_agreement_iou", "reference_self_refined_agreement_iou"):
        assert 0.0 < entry[key] <= 1.0  # the refined disks overlap
    # the toy heads are elementwise only (no matmul or conv FLOPs to count)
    assert 0.0 <= entry["flops_utilization"] <= 1.0


def test_refined_mask_agreement_compares_the_pseudo_masks():
    from bbam.attribution import attribute_instances, profile_config
    from bbam.refine import RefineConfig

    heads, items, overrides = bench.toy_setup(2, seed=0)
    cfg = profile_config("fast", iterations=30, **overrides)
    results = attribute_instances(heads, items, cfg, "cpu")
    inputs = bench.toy_refine_inputs(items)
    masks = bench.refined_masks(results, inputs, RefineConfig(), cfg.align_corners)
    assert set(masks) == {r.key for r in results if r.status == "ok"}
    assert bench.mask_agreement(masks, masks) == 1.0
    shifted = {k: np.roll(m, m.shape[1] // 3, axis=1) for k, m in masks.items()}
    assert bench.mask_agreement(masks, shifted) < 0.9


def test_variants_run_on_the_reference_instances(tmp_path, monkeypatch):
    entry = _toy_bench(tmp_path, monkeypatch, "--variant", "iterations=5,lr=0.05")
    variant = entry["fast_variants"]["iterations=5,lr=0.05"]
    assert variant["iterations_per_instance"] == 5
    assert variant["overrides"]["lr"] == 0.05
    assert 0.0 <= variant["refined_agreement_iou"] <= 1.0
    assert 0.0 <= variant["refined_agreement_iou_next_seed"] <= 1.0


def test_parse_variant_reads_yaml_scalars_and_refuses_unknown_fields():
    assert bench.parse_variant("iterations=100,lr=0.05,early_stop=false") == {
        "iterations": 100,
        "lr": 0.05,
        "early_stop": False,
    }
    with pytest.raises(SystemExit, match="no_such_knob"):
        bench.parse_variant("no_such_knob=1")
