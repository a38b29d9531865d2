"""Prefect tasks of the attribution stage: one task per shard, then a merge."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from prefect import get_run_logger, task
from tqdm import tqdm

from bbam.atomic import atomic_write
from bbam.attribution import AttributionConfig, profile_config
from bbam.device import resolve_device
from bbam.manifest import merge_manifests, status_counts
from bbam.shards import detector_chunk_fn, plan_shard, run_shard
from tasks.caching import stage_cache
from tasks.detector import load_detector_from_params
from tasks.params import ATTRIBUTION_DIR, load_split, shard_dir, top_level

# Set on SIGTERM (flows.attribute): shard tasks stop at their next chunk boundary.
STOP = threading.Event()


@contextlib.contextmanager
def stop_shards_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM (preemption, ``scancel``, pod eviction) sets ``STOP`` at once,
    then goes to the handler it replaced (inside a flow run: Prefect's, which marks the run
    crashed); with no handler before it, the process exits with 128 + 15. Shard tasks run in
    pool threads, which would otherwise finish their whole shard before the process exits;
    with ``STOP`` they end after the chunk in hand, whose results are then on disk."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: object) -> None:
        STOP.set()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def engine_config(params: dict) -> AttributionConfig:
    """The engine settings every attribution step uses: the params' profile plus overrides
    (the top-level ``seed`` unless ``overrides.seed`` sets the engine's own)."""
    section = params["attribution"]
    overrides = {"seed": top_level(params)["seed"], **(section.get("overrides") or {})}
    return profile_config(section.get("profile", "fast"), **overrides)


class ShardInterrupted(RuntimeError):
    """A shard stopped on request (SIGTERM): its finished chunks are on disk; never cached."""


@task(
    name="attribute-shard",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=lambda *_: not STOP.is_set(),
    tags=["gpu"],
    **stage_cache("attribute", ATTRIBUTION_DIR),
)
def attribute_shard(params: dict, shard: int, out_dir: str, params_hash: str) -> dict:
    """Attribute the pending instances of one shard; the manifest makes it resumable."""
    section = params["attribution"]
    dataset = load_split(params, section["split"], with_masks=False)  # boxes are the input
    num_shards = int(section["num_shards"])
    device = resolve_device(top_level(params)["device"])
    config = engine_config(params)
    engine: dict = {}

    def chunk_fn(images, items):
        if not engine:  # load the detector only when there is work to do
            model = load_detector_from_params(params, len(dataset.classes) + 1, device)
            engine["run"] = detector_chunk_fn(model, config, device)
        return engine["run"](images, items)

    planned = len(plan_shard(dataset, shard, num_shards))
    with tqdm(total=planned, desc=f"shard {shard}", unit="inst", leave=False) as bar:
        summary = run_shard(
            dataset,
            shard,
            num_shards,
            shard_dir(out_dir, shard),
            chunk_fn,
            params_hash,
            chunk_size=int(section.get("chunk_size", 16)),
            max_attempts=int(section.get("max_attempts", 2)),
            progress=bar.update,
            should_stop=STOP.is_set,
        )
    get_run_logger().info("shard %d: %s", shard, summary)
    if summary.get("interrupted"):  # raised, not returned: a result would be cached
        raise ShardInterrupted("attribution stopped on request; run it again to resume")
    return summary


@task(name="merge-manifests", **stage_cache("attribute", ATTRIBUTION_DIR))
def merge_shards(params: dict, out_dir: str, num_shards: int, shard_summaries: list) -> dict:
    """One manifest over all shards (each key exactly once) plus counts per status.
    ``shard_summaries`` only joins the cache key: shards that ran again make a new merge."""
    dirs = [shard_dir(out_dir, s) for s in range(num_shards)]
    table = merge_manifests(d for d in dirs if d.exists())
    path = Path(out_dir) / "manifest.parquet"
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    seconds = sum(v or 0.0 for v in table.column("seconds").to_pylist()) if table.num_rows else 0.0
    counts = status_counts(table)
    return {
        "instances": table.num_rows,
        **counts,
        "engine_seconds": round(seconds, 2),
        "instances_per_engine_s": round(counts["ok"] / seconds, 4) if seconds else 0.0,
    }
