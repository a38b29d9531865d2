"""bench/data_check.py runs end to end on a few images and reports a rate for the demo set
and the synthetic set; ``make bench`` (bench/run_all.py) calls it."""

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_data_check_bench_reports_images_per_second(capsys):
    bench = importlib.import_module("bench.data_check")
    assert bench.main(["--synthetic-images", "12", "--workers", "1", "--no-write"]) == 0
    out = capsys.readouterr().out
    values = json.loads(out[out.index("{") :])
    assert values["synthetic_images"] == 12 and values["images_per_s"] > 0
    assert values["demo_images"] > 0 and values["demo_images_per_s"] > 0


def test_make_bench_runs_the_data_check(tmp_path, monkeypatch):
    """bench.run_all's main runs ``python -m bench.data_check`` with its params (every other
    object skipped, nothing actually run)."""
    run_all = importlib.import_module("bench.run_all")
    calls: list[tuple[str, ...]] = []
    results = tmp_path / "results.json"
    results.write_text("{}")
    monkeypatch.setattr(run_all, "run", lambda *args: calls.append(args))
    monkeypatch.setattr(run_all, "merge_results", lambda *args: None)
    monkeypatch.setattr(run_all, "demo_quality_object", lambda: {})
    monkeypatch.setattr(run_all, "RESULTS", results)
    monkeypatch.chdir(ROOT)  # main chdirs there; restored afterwards
    skip = ["detector", "attribution", "attribution_baseline", "pseudo_labels", "refine_modes"]
    skip += ["segmenters", "scale"]
    monkeypatch.setattr(sys, "argv", ["run_all", "--skip", *skip])
    assert run_all.main() == 0
    assert calls[0] == ("dvc", "repro")
    assert calls[1:] == [(sys.executable, "-m", "bench.data_check", "--params", "params.yaml")]


def test_make_bench_times_a_10k_image_set_by_default():
    assert importlib.import_module("bench.data_check").SYNTHETIC_IMAGES == 10_000
