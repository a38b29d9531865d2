"""Prefect tasks of the attribution stage: one task per shard, then a merge.

Neither is cached (``tasks.caching``): a cache key covers only a stage's inputs, so it would
report a deleted shard folder or merged manifest as done. A rerun costs little anyway: each
shard's manifest says what is finished, and the shard reads it and runs nothing more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from bbam.atomic import atomic_write
from bbam.data.records import Dataset
from bbam.data.verify import found_unreadable, unreadable_limit_error, unreadable_limits
from bbam.device import resolve_device
from bbam.manifest import merge_manifests, status_counts
from bbam.shard_lock import LockLost, ShardBusy, ShardLock
from bbam.shards import (
    detector_chunk_fn,
    image_of,
    instance_key,
    plan_shard,
    run_shard,
    shard_of,
)
from tasks.attribution_config import attribution_split, engine_config, shard_dir
from tasks.deployments import DispatchConfig
from tasks.detector import load_detector_from_params
from tasks.params import top_level

SHOWN = 5  # keys / files named in a summary or an error

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


class ShardInterrupted(RuntimeError):
    """A shard stopped on request (SIGTERM): its finished chunks are on disk."""


def lock_timing(section: dict) -> tuple[float, float]:
    """(stale_s, heartbeat_s) of the shard lock: the dispatcher reads the same keys."""
    config = DispatchConfig.from_section(section)
    return float(config.lost_after_s), float(config.heartbeat_s)


def run_locked_shard(
    params: dict, shard: int, out_dir: str, params_hash: str, lock: ShardLock
) -> dict:
    """Attribute the pending instances of one shard while ``lock`` (held by the caller) is
    ours: once it is taken over, the shard stops at its next chunk and writes nothing more
    (``LockLost``), so two runs never write one folder at once."""
    section = params["attribution"]
    dataset = attribution_split(params)  # boxes are the input
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
            should_stop=lambda: STOP.is_set() or lock.lost.is_set(),
            before_write=lock.check,
            skip_images={i: f"{p}: {r}" for i, (p, r) in found_unreadable(dataset).items()},
        )
    lock.check()  # stopped because the lock was taken over: LockLost, not a success
    get_run_logger().info("shard %d: %s", shard, summary)
    if summary.get("interrupted"):
        raise ShardInterrupted("attribution stopped on request; run it again to resume")
    return summary


def _worth_retrying(task, task_run, state) -> bool:
    """Not after a stop request, nor when another run holds (or took over) the shard."""
    error = state.result(raise_on_failure=False)
    return not STOP.is_set() and not isinstance(error, (ShardBusy, LockLost))


@task(
    name="attribute-shard",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
    tags=["gpu"],
    cache_policy=NO_CACHE,
)
def attribute_shard(params: dict, shard: int, out_dir: str, params_hash: str) -> dict:
    """One shard in this process (executor ``local``), holding the shard's lock as a worker's
    flow run does: a second run on the same shard (a requeued job while the first is alive)
    refuses to start with ShardBusy naming the lock file and its holder."""
    stale_s, heartbeat_s = lock_timing(params["attribution"])
    owner = f"flows.attribute (executor local) pid {os.getpid()} on {socket.gethostname()}"
    with ShardLock(shard_dir(out_dir, shard), owner, stale_s, heartbeat_s) as lock:
        return run_locked_shard(params, shard, out_dir, params_hash, lock)


@task(name="merge-manifests", cache_policy=NO_CACHE)
def merge_shards(
    params: dict,
    out_dir: str,
    num_shards: int,
    params_hash: str,
    shards: Collection[int] | None = None,
) -> dict:
    """One manifest of the planned instances (each key once), counts per status and what is
    missing. Only rows written with ``params_hash`` by this code count: the shard folders
    also keep rows of earlier settings, another split or another dataset.
    ``missing_in_run`` counts the missing instances of ``shards`` (those this run attributed;
    default all): the others are another run's to attribute (``--shards`` on other hosts)."""
    dataset = attribution_split(params)
    planned = [
        instance_key(r.image_id, i.instance_id) for r in dataset.records for i in r.instances
    ]
    dirs = [shard_dir(out_dir, s) for s in range(num_shards)]
    table = merge_manifests((d for d in dirs if d.exists()), set(planned), params_hash)
    path = Path(out_dir) / "manifest.parquet"
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    seconds = sum(v or 0.0 for v in table.column("seconds").to_pylist()) if table.num_rows else 0.0
    counts = status_counts(table)
    have = set(table.column("key").to_pylist())
    missing = [k for k in planned if k not in have]
    ran = set(range(num_shards) if shards is None else shards)
    return {
        "instances": len(planned),
        **counts,
        "missing": len(missing),
        "missing_in_run": sum(shard_of(image_of(k), num_shards) in ran for k in missing),
        "missing_keys": missing[:SHOWN],
        **_unreadable_images(dataset, table),
        "unreadable_error": _over_unreadable_limit(params, dataset),
        "engine_seconds": round(seconds, 2),
        "instances_per_engine_s": round(counts["ok"] / seconds, 4) if seconds else 0.0,
    }


def _over_unreadable_limit(params: dict, dataset: Dataset) -> str:
    """prepare_data's rule, applied again now: images gone since (a partial copy to node
    scratch) must not pass as a handful of skips. '' when within the limit."""
    split = params["attribution"].get("split", "train")
    limits = unreadable_limits(params.get("data") or {})
    if split not in limits:
        return ""
    found = found_unreadable(dataset).values()
    stats = {"unreadable_images": dict(found), "images_verified": len(dataset.records)}
    return unreadable_limit_error({split: stats}, {split: limits[split]})


def _unreadable_images(dataset: Dataset, table) -> dict:
    """Images whose instances failed or were skipped because the file could not be read
    (missing, truncated): ``load_rgb``'s error, and the skip reason, start with the path."""
    paths = {r.image_id: f"{r.path}: " for r in dataset.records}
    errors: dict[str, str] = {}
    bad = pc.is_in(table.column("status"), value_set=pa.array(["failed", "skipped"]))
    for row in table.filter(bad).to_pylist():
        prefix = paths.get(row["image_id"])
        if prefix and (row["error"] or "").startswith(prefix):
            errors.setdefault(row["image_id"], row["error"].splitlines()[0])
    return {
        "unreadable_images": len(errors),
        "unreadable_image_errors": list(errors.values())[:SHOWN],
    }
