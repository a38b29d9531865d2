"""End to end through DVC on a tiny custom COCO dataset: a SIGKILL in the middle of
an attribution shard, ``dvc repro`` again, and nothing lost or recomputed.

The dataset is written here with its own categories (not the synthetic default's) and
non-contiguous category ids, through ``data.name: custom`` -- the bring-your-own-data
path of the README. The detector keeps its random initialisation (``lr: 0``) and the
IoU cascade is ``[0.0]`` so that positives exist without minutes of training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.project_env import CATEGORIES, CATEGORY_IDS, copy_code, project_env
from helpers.project_env import make_project as _make_project
from helpers.project_env import run_in as _run

from bbam.manifest import load_grid, read_shard

pytestmark = pytest.mark.slow


_env = project_env


def _shard_dirs(project: Path) -> list[Path]:
    return sorted((project / "runs/attribution/shards").glob("shard-*"))


def _rows(project: Path) -> dict[str, dict]:
    rows = {}
    for shard_dir in _shard_dirs(project):
        for row in read_shard(shard_dir).to_pylist():
            rows[row["key"]] = {**row, "dir": shard_dir}
    return rows


def _kill_attribution_mid_shard(project: Path) -> dict[str, dict]:
    """Start ``dvc repro attribute``, SIGKILL it once some rows are on disk but not all."""
    proc = subprocess.Popen(
        ["dvc", "repro", "attribute"],
        cwd=project,
        env=_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            parts = [p for d in _shard_dirs(project) for p in d.glob("part-*.parquet")]
            if len(parts) >= 3:
                break
            if proc.poll() is not None:
                raise AssertionError("the attribution stage ended before it could be killed")
            time.sleep(0.2)
        else:
            raise AssertionError("no attribution progress within the deadline")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _rows(project)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    project = _make_project(tmp_path_factory.mktemp("bbam") / "project")
    _run(project, "dvc", "repro", "train_detector")
    before = _kill_attribution_mid_shard(project)
    train = json.loads((project / "mydata/annotations/instances_train.json").read_text())
    total = sum(not a.get("iscrowd") for a in train["annotations"])
    assert 0 < len(before) < total, "the kill should land in the middle of the stage"
    _run(project, "dvc", "repro")
    return project, before, total


def test_killed_attribution_resumes_without_loss_or_recompute(pipeline_run):
    project, before, total = pipeline_run
    merged = pq.read_table(project / "runs/attribution/manifest.parquet").to_pylist()
    keys = [row["key"] for row in merged]
    assert len(keys) == len(set(keys)) == total, "every instance exactly once"
    after = {row["key"]: row for row in merged}
    recomputed = [k for k, row in before.items() if after[k]["run_id"] != row["run_id"]]
    assert recomputed == [], f"{len(recomputed)} finished instances were recomputed"
    resumed_run_ids = {after[k]["run_id"] for k in after if k not in before}
    assert resumed_run_ids and not resumed_run_ids & {r["run_id"] for r in before.values()}
    summary = json.loads((project / "metrics/attribution.json").read_text())
    assert summary["instances"] == total
    assert summary["skipped_done"] == len(before)


def test_resumed_maps_equal_an_uninterrupted_run(pipeline_run, tmp_path):
    project, _, _ = pipeline_run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    copy_code(fresh)
    shutil.copytree(project / "mydata", fresh / "mydata")
    shutil.copytree(project / "runs/detector", fresh / "runs/detector")
    shutil.copy(project / "params.yaml", fresh / "params.yaml")
    _run(fresh, sys.executable, "-m", "flows.attribute", "--params", "params.yaml")
    resumed, uninterrupted = _rows(project), _rows(fresh)
    assert resumed.keys() == uninterrupted.keys()
    for key, row in resumed.items():
        assert row["status"] == uninterrupted[key]["status"]
        if row["status"] == "ok":
            a = load_grid(row["dir"], row)
            b = load_grid(uninterrupted[key]["dir"], uninterrupted[key])
            np.testing.assert_array_equal(a, b)  # CPU runs are deterministic given the seed


def test_whole_pipeline_outputs_for_custom_categories(pipeline_run):
    project, _, total = pipeline_run
    pseudo = json.loads((project / "runs/pseudo_labels/instances_train.json").read_text())
    assert [c["name"] for c in pseudo["categories"]] == CATEGORIES
    assert {a["category_id"] for a in pseudo["annotations"]} <= set(CATEGORY_IDS)
    assert len(pseudo["annotations"]) == total
    assert all("ignore" in a for a in pseudo["annotations"])
    evaluation = json.loads((project / "metrics/evaluation.json").read_text())
    assert set(evaluation) >= {"full", "bbam", "table"}
    assert (project / "reports/index.html").is_file()
    shown = _run(project, sys.executable, "-m", "flows.show_metrics").stdout
    assert "semantic mIoU bbam" in shown and "report:" in shown


def test_changing_one_param_reruns_only_dependent_stages(pipeline_run):
    project, _, _ = pipeline_run
    status = _run(project, "dvc", "status", "--json").stdout
    assert json.loads(status) == {}, "everything is up to date after the run"
    params = yaml.safe_load((project / "params.yaml").read_text())
    original = yaml.safe_dump(params, sort_keys=False)
    params["refine"]["th_fg"] = 0.8
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(_run(project, "dvc", "status", "--json").stdout))
    finally:
        (project / "params.yaml").write_text(original)
    assert "pseudo_labels" in changed
    assert not changed & {"prepare_data", "train_detector", "attribute"}


def test_failed_instances_are_recorded_and_fail_the_stage_past_the_limit(pipeline_run, tmp_path):
    project, _, _ = pipeline_run
    broken = tmp_path / "broken"
    broken.mkdir()
    copy_code(broken)
    shutil.copytree(project / "mydata", broken / "mydata")
    shutil.copytree(project / "runs/detector", broken / "runs/detector")
    images = sorted((broken / "mydata/images/train").iterdir())
    images[0].write_bytes(b"\xff\xd8 truncated")  # one unreadable image
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["attribution"]["overrides"]["iterations"] = 2
    for limit, expect_ok in ((0.9, True), (0.0, False)):
        params["attribution"]["max_failure_fraction"] = limit
        (broken / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = _run(
            broken, sys.executable, "-m", "flows.attribute", "--params", "params.yaml", check=False
        )
        assert (result.returncode == 0) is expect_ok, result.stderr[-2000:]
    rows = _rows(broken)
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert failed and all(images[0].name in r["error"] for r in failed)
    assert all(r["status"] != "failed" for r in rows.values() if r["image_id"] != images[0].stem)


def test_sigterm_stops_attribution_after_the_chunk_in_hand(pipeline_run, tmp_path):
    """A scheduler's SIGTERM (preemption) ends the stage promptly: the shard thread puts down
    the chunk it holds (one image here) instead of finishing its shard; a re-run completes."""
    project, _, total = pipeline_run
    work = tmp_path / "sigterm"
    work.mkdir()
    copy_code(work)
    for name in ("mydata", "runs/detector", ".prefect"):
        shutil.copytree(project / name, work / name)
    shutil.copy(project / "params.yaml", work / "params.yaml")
    train = json.loads((work / "mydata/annotations/instances_train.json").read_text())
    per_image: dict[int, int] = {}
    for ann in train["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    cmd = [sys.executable, "-m", "flows.attribute", "--params", "params.yaml"]
    proc = subprocess.Popen(
        cmd, cwd=work, env=_env(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 600
        while not [p for d in _shard_dirs(work) for p in d.glob("part-*.parquet")]:
            assert proc.poll() is None, "the stage ended before the signal"
            assert time.monotonic() < deadline, "no attribution progress within the deadline"
            time.sleep(0.05)
        at_signal = len(_rows(work))
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert returncode == 128 + signal.SIGTERM, "DVC must see the stage fail"
    assert time.monotonic() - sent < 60
    after = _rows(work)
    assert len(after) - at_signal <= max(per_image.values()), "more than the chunk in hand ran"
    assert len(after) < total
    assert not (work / "runs/attribution/manifest.parquet").exists()

    _run(work, *cmd)
    merged = pq.read_table(work / "runs/attribution/manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in merged) == sorted(_rows(project))
    assert all(after[k]["run_id"] == r["run_id"] for r in merged if (k := r["key"]) in after)
