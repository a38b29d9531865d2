"""The evaluate stage's report on a real (tiny) pipeline run, checked as a person would
look at it: rendered in headless Chromium, every sample with its BBAM map, pseudo label,
GT and both models' predictions, the PR curves drawn, the baselines table filled."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers.project_env import custom_data_params, project_env
from test_pipeline import _make_project

from bbam import report

pytestmark = pytest.mark.slow


def test_evaluate_stage_writes_a_report_a_person_can_read(tmp_path) -> None:
    project = _make_project(
        tmp_path / "project", custom_data_params(num_shards=1, chunk_size=4, iterations=4)
    )
    env = project_env(project)
    run = subprocess.run(
        ["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=1500
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = project / "reports" / "index.html"
    text = page.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text)
    per_sample = [
        "image",
        "BBAM map",
        "pseudo label (fg, ignore band)",
        "GT",
        "prediction (full)",
        "prediction (bbam)",
    ]
    assert captions.count("BBAM map") == 2, captions  # report_samples: 2 in these params
    for caption in per_sample:
        assert captions.count(caption) == 2, (caption, captions)
    assert {"instance AP50 PR curves: full", "instance AP50 PR curves: bbam"} & set(captions)
    assert "not computed" not in text and "GrabCut" in text
    assert (project / "plots" / "pr_curves_bbam.csv").is_file()  # dvc plots data too
    if report.find_chromium() is None:
        pytest.skip("chromium not installed (apt-get install -y chromium): page not rendered")
    check = subprocess.run(
        [sys.executable, "-m", "bbam.report", "check", str(page)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr
    assert "images loaded" in check.stdout
