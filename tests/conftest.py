"""Say up front when the temp dir is short of room, so a full disk reads as one line.

A full run peaks at about 4.6 GB under the temp dir (the end-to-end tests build whole
DVC projects with checkpoints); passing tests' directories are removed as they finish
(`tmp_path_retention_policy` in pyproject.toml).
"""

import shutil
import tempfile
from pathlib import Path

import pytest

NEEDED_GB = 6


def temp_room(config: pytest.Config) -> tuple[Path, float]:
    root = Path(config.option.basetemp or tempfile.gettempdir())
    while not root.exists():
        root = root.parent
    return root, shutil.disk_usage(root).free / 1e9


def pytest_report_header(config: pytest.Config) -> str:
    root, free_gb = temp_room(config)
    return f"temp dir {root}: {free_gb:.1f} GB free (a full run needs about {NEEDED_GB} GB)"


def pytest_sessionstart(session: pytest.Session) -> None:
    root, free_gb = temp_room(session.config)
    if free_gb < NEEDED_GB:
        session.config.get_terminal_writer().line(
            f"WARNING: temp dir {root} has {free_gb:.1f} GB free; a full run needs about "
            f"{NEEDED_GB} GB: expect 'No space left on device' (free space or set TMPDIR)",
            red=True,
        )
