"""The ``attribution`` section as the engine's AttributionConfig, and where its shards live.

No Prefect here: the pseudo-label and evaluate stages read the engine settings (how maps
were upsampled) and the shard folders without importing the attribution stage's tasks,
locks and dispatcher.
"""

from __future__ import annotations

from pathlib import Path

from bbam.attribution import AttributionConfig, profile_config
from bbam.data.records import Dataset
from bbam.manifest import shard_folder
from tasks.params import load_split, top_level


def engine_config(params: dict) -> AttributionConfig:
    """The engine settings every attribution step uses: the params' profile plus overrides
    (the top-level ``seed`` unless ``overrides.seed`` sets the engine's own)."""
    section = params["attribution"]
    overrides = {"seed": top_level(params)["seed"], **(section.get("overrides") or {})}
    return profile_config(section.get("profile", "fast"), **overrides)


def attribution_split(params: dict) -> Dataset:
    """The split to attribute with every image kept, never a silent drop (``load_split``'s
    default): the instances of an image prepare_data found unreadable, or one missing now,
    get skipped rows naming the file and why (``data.max_unreadable_<split>`` bounds how many
    images that may be, as in prepare_data); one that breaks only in the engine fails."""
    split = params["attribution"]["split"]
    return load_split(params, split, with_masks=False, drop_unreadable=False)


def shards_root(out_dir: str | Path) -> Path:
    """The folder of the attribution stage's shard folders."""
    return Path(out_dir) / "shards"


def shard_dir(out_dir: str | Path, shard: int) -> Path:
    """The folder of one attribution shard (manifest parts, maps, lock)."""
    return shard_folder(shards_root(out_dir), shard)
