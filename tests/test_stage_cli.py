"""A stage that fails on bad input says so in one line, without Prefect's traceback; any
other failure keeps its traceback (it is a bug to report)."""

import subprocess
import sys

import pytest
from helpers.project_env import REPO, project_env

PROBE = """
from prefect import flow

from bbam.data.records import DataError
from flows.common import stage_cli


@flow(name="stage-cli-probe")
def probe(params: dict) -> None:
    raise {error}("mydata/instances_train.json: annotation 3: unknown category_id 9")


stage_cli("probe", probe)
"""


@pytest.mark.parametrize(("error", "traceback"), [("DataError", False), ("RuntimeError", True)])
def test_bad_input_fails_without_traceback(tmp_path, error, traceback):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(error=error))
    env = project_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(script), "--params", str(REPO / "params.yaml")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "probe: FAILED: mydata/instances_train.json: annotation 3" in result.stderr
    assert ("Traceback" in result.stderr) is traceback, result.stderr[-2000:]
