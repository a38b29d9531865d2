"""A params file that cannot be read gives the clear one-line error, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import load_params

REPO = Path(__file__).resolve().parent.parent


def _latin1(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes("data:\n  root: donn\xe9es\n".encode("latin-1"))
    return path


def _folder(tmp_path: Path) -> Path:
    path = tmp_path / "params_dir"
    path.mkdir()
    return path


@pytest.mark.parametrize(("make", "problem"), [(_latin1, "not UTF-8"), (_folder, "is a directory")])
def test_unreadable_params_file_is_a_clear_error(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: {problem}")


@pytest.mark.parametrize(("make", "problem"), [(_latin1, "not UTF-8"), (_folder, "is a directory")])
def test_stage_cli_with_unreadable_params_exits_without_traceback(tmp_path, make, problem):
    """``--params`` naming a latin-1 file or a folder: one line naming it, exit status 1."""
    path = make(tmp_path)
    cmd = [sys.executable, "-m", "flows.prepare_data", "--params", str(path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{path}: {problem}" in result.stderr
