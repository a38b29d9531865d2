import importlib.util
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # as when run as `python bench/attribution.py` (imports results)
_spec = importlib.util.spec_from_file_location("bench_attribution", BENCH / "attribution.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


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
