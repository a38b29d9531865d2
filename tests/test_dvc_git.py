"""`dvc repro` inside a git checkout, as a newcomer runs it (README): the repository's own
.gitignore must leave DVC able to write and track its lock file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.project_env import project_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _env(project: Path) -> dict:
    git_identity = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "t"), ("EMAIL", "t@example.com"))
    }
    return {**project_env(project), **git_identity}


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), cwd=project, env=_env(project), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_dvc_repro_in_a_git_checkout_writes_a_tracked_lock(tmp_path):
    project = tmp_path / "checkout"
    project.mkdir()
    for name in ("bbam", "flows", "tasks"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synthetic"].update(num_train=3, num_val=2, image_size=[48, 64])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(project, "git", "init", "-q")
    _run(project, "dvc", "init", "-q")
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-q", "-m", "checkout")

    _run(project, "dvc", "repro", "prepare_data")
    assert (project / "dvc.lock").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=project)
    assert ignored.returncode == 1, "dvc.lock must not be git-ignored (DVC refuses to use it)"
    status = _run(project, "dvc", "status", "prepare_data").stdout
    assert "changed" not in status and "modified" not in status, status
    assert (project / params["data"]["train_json"]).is_file()
