"""`dvc repro` inside a git checkout, as a newcomer runs it (README): the repository's own
.gitignore must leave DVC able to write and track its lock file."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from helpers.project_env import REPO, git_checkout, run_git_project

pytestmark = pytest.mark.slow


def test_dvc_repro_in_a_git_checkout_writes_a_tracked_lock(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synthetic"].update(num_train=3, num_val=2, image_size=[48, 64])
    project = git_checkout(tmp_path / "checkout", params)

    run_git_project(project, "dvc", "repro", "prepare_data")
    assert (project / "dvc.lock").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=project)
    assert ignored.returncode == 1, "dvc.lock must not be git-ignored (DVC refuses to use it)"
    status = run_git_project(project, "dvc", "status", "prepare_data").stdout
    assert "changed" not in status and "modified" not in status, status
    assert (project / params["data"]["train_json"]).is_file()
