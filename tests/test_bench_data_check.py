"""bench/data_check.py runs end to end on a few images and reports a rate."""

import importlib


def test_data_check_bench_reports_images_per_second(capsys):
    bench = importlib.import_module("bench.data_check")
    assert bench.main(["--synthetic-images", "12", "--workers", "1", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert '"images_per_s"' in out and '"synthetic_images": 12' in out
