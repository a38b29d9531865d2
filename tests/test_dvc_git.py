"""`dvc repro` inside a git checkout, as a newcomer runs it (README): the repository's own
.gitignore must leave DVC able to write and track its lock file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _env(project: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"),
        BBAM_PREFECT_HOME=str(project / ".prefect"),
        PYTHONPATH=str(project),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    return env


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
