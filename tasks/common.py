"""Cache keys for Prefect tasks.

Prefect's default cache key contains the flow-run id, so it never helps across
``dvc repro`` runs, and ``TASK_SOURCE`` does not see edits in ``bbam/``. Our keys
are built from what the result really depends on: a params hash, digests of the
input files, and the package version. Results are stored inside the stage's own
output folder, so when DVC deletes the folder the cache goes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bbam import __version__


def key_from(*names: str) -> Callable[[Any, dict[str, Any]], str]:
    """A ``cache_key_fn`` over the named task parameters plus the package version."""

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        parts = [str(parameters[name]) for name in names]
        return "-".join([*parts, __version__]).replace("/", "_")

    return cache_key


def result_storage(out_dir: str | Path) -> Path:
    """A Path, not a str: a str would be read as a block slug."""
    path = Path(out_dir).resolve() / ".prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path
