"""bench/results.json: each benchmark merges its own object, keeping the others' entries."""

from __future__ import annotations

import json
from pathlib import Path

from bbam.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results.json"


def merge_results(key: str, value: dict, path: Path = RESULTS, *, update: bool = False) -> None:
    """Read-modify-write ``path`` atomically: ``data[key] = value``, other keys kept.

    ``update=True`` merges ``value`` into an existing ``data[key]`` dict instead of replacing it
    (benchmarks that may fill their object in several runs).
    """
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    if update:
        entry = data.get(key) if isinstance(data.get(key), dict) else {}
        value = {**entry, **value}
    data[key] = value
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
