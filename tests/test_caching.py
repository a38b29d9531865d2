"""Prefect caching keyed on each stage's dvc.yaml inputs (``tasks.caching``): a second
``python -m flows.pipeline`` with nothing changed ends with every task Cached, and a changed
knob reruns the stages DVC would rerun."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.project_env import REPO, make_project, project_env, run_in

from tasks.caching import stage_digest

# Not cached on purpose. summarise-splits re-verifies the images each run (its own
# size/mtime cache keeps that quick), so a file damaged after a cached run is still caught.
# The attribution tasks resume from their manifests, which cost a read when nothing is left
# to do, where a cache keyed on inputs would trust a deleted shard folder or merged manifest
# (tests/test_attribution_faults.py); below, a second run attributes nothing.
UNCACHED = {"summarise-splits", "attribute-shard", "merge-manifests"}
STAGE_OF_TASK = {
    "prepare-dataset": "prepare_data",
    "voc-to-coco": "prepare_data",
    "train-detector": "train_detector",
    "make-pseudo-labels": "pseudo_labels",
    "train-segmenter": "train_segmenters",
    "evaluate-instance-segmenter": "evaluate",
    "evaluate-semantic-segmenter": "evaluate",
    "pseudo-label-quality": "evaluate",
}
FINISHED = re.compile(r"Task run '([\w-]+)-[0-9a-f]+' - Finished in state (\w+)")


def _project_with_dvc_yaml(tmp_path: Path) -> tuple[Path, dict]:
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    for dep in ("tasks/params.py", "bbam/refine.py"):
        (tmp_path / dep).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dep).write_text("# code\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return tmp_path, params


def _switch_refine_mode(params: dict) -> None:
    """A knob that changes the pseudo labels whatever the mode: a knob of the other mode would
    leave them as they are (and the later stages rightly cached)."""
    params["refine"]["mode"] = "object" if params["refine"]["mode"] == "reference" else "reference"


def test_stage_digest_follows_the_stage_params_and_deps(tmp_path):
    root, params = _project_with_dvc_yaml(tmp_path)
    base = stage_digest(params, "pseudo_labels", root)
    assert base is not None and base == stage_digest(params, "pseudo_labels", root)
    params["evaluate"]["report_samples"] += 1  # not a pseudo_labels param
    assert stage_digest(params, "pseudo_labels", root) == base
    _switch_refine_mode(params)
    changed = stage_digest(params, "pseudo_labels", root)
    assert changed != base
    (root / "bbam/refine.py").write_text("# edited\n")  # a listed code dep
    assert stage_digest(params, "pseudo_labels", root) not in (base, changed)
    results = root / "runs/attribution/.prefect-results"  # Prefect's own files never count
    results.mkdir(parents=True)
    before = stage_digest(params, "pseudo_labels", root)
    (results / "x").write_text("result")
    assert stage_digest(params, "pseudo_labels", root) == before


def test_nothing_is_cached_without_a_dvc_yaml(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert stage_digest(params, "pseudo_labels", tmp_path) is None
    _, params = _project_with_dvc_yaml(tmp_path)
    assert stage_digest(params, "no_such_stage", tmp_path) is None


def _pipeline(project: Path) -> dict[str, set[str]]:
    """Run ``python -m flows.pipeline``; stage -> the final states of its task runs."""
    env = {**project_env(project), "PREFECT_LOGGING_LEVEL": "INFO"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    states: dict[str, set[str]] = {}
    for task, state in FINISHED.findall(log):
        if task in UNCACHED:
            continue
        states.setdefault(STAGE_OF_TASK[task], set()).add(state)
    assert set(states) == set(STAGE_OF_TASK.values()), log[-4000:]
    return states


@pytest.mark.slow
def test_second_pipeline_run_is_cached_and_a_knob_reruns_what_dvc_would(tmp_path):
    project = make_project(tmp_path / "project")
    _pipeline(project)
    again = _pipeline(project)
    assert all(states == {"Cached"} for states in again.values()), again
    assert _attributed_now(project) == 0  # the attribute stage ran, from its manifests
    run_in(project, "dvc", "commit", "-f", "-q")  # DVC records this state as up to date

    params = yaml.safe_load((project / "params.yaml").read_text())
    _switch_refine_mode(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(yaml.safe_load(run_in(project, "dvc", "status", "--json").stdout or "{}"))
    after = _pipeline(project)
    reran = {stage for stage, states in after.items() if states != {"Cached"}}
    # dvc status names the stage whose params changed; the stages after it rerun because
    # their inputs (the new pseudo labels) change, as `dvc repro` reruns them
    assert changed == {"pseudo_labels"}
    assert reran == {"pseudo_labels", "train_segmenters", "evaluate"}, after
    assert not reran & {"prepare_data", "train_detector"}
    assert _attributed_now(project) == 0


def _attributed_now(project: Path) -> int:
    """Instances the last attribute stage computed (the rest it reused from the manifests)."""
    return json.loads((project / "metrics/attribution.json").read_text())["ran_now"]
