import json

import torch
from bench_modules import load_bench

torch.set_num_threads(1)

bench = load_bench("attribution")


def test_toy_bench_writes_the_attribution_object(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    monkeypatch.setattr(
        bench,
        "merge_results",
        lambda key, value: results.write_text(json.dumps({key: value}, default=float)),
    )
    assert bench.main(["--instances", "2", "--reference-instances", "1"]) == 0
    entry = json.loads(results.read_text())["attribution"]
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
    # the toy heads are elementwise only (no matmul or conv FLOPs to count)
    assert 0.0 <= entry["flops_utilization"] <= 1.0
