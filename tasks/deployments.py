"""Executor ``deployments``: one flow run per shard on a work pool, lost runs re-dispatched.

Prefect does the distribution (work pool, workers, deployment ``attribute-shard``);
this module only fans out, watches and re-dispatches:

- ``run_deployment(timeout=0, idempotency_key="<hash>-shard<N>-attempt<A>")`` creates
  each run once even if the call itself is retried. Keys never expire: when the key
  returns an earlier invocation's *finished* run, the attempt number is bumped (a
  done shard then costs only its manifest read); an earlier invocation's run that
  is still scheduled or running is adopted, not duplicated.
- A run that ends Failed / Crashed / Cancelled is re-dispatched with attempt + 1,
  up to ``max_dispatch_attempts`` dispatches per shard.
- A run that is Pending or Running but whose shard lock (``bbam.shard_lock``) has
  not had a heartbeat from that run for ``lost_after_s`` is *lost* (its worker or
  host died: a SIGKILLed worker leaves the run Running forever). The dispatcher
  sets it Crashed and re-dispatches. The stale lock is broken by the new attempt;
  the manifest makes the shard resume where the lost run stopped.
- Afterwards every dispatched shard's manifest must cover every planned instance.

Requires ``PREFECT_API_URL`` (a server the workers share) and a working directory
(runs/...) on storage every worker sees (local disk or NFS; no fsspec URLs).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from uuid import UUID

from bbam.atomic import atomic_write_bytes
from bbam.manifest import read_shard
from bbam.shard_lock import read_lock
from bbam.shards import instance_key, plan_shard
from tasks.attribution_config import attribution_split, shard_dir

ACTIVE = ("PENDING", "RUNNING", "CANCELLING")  # a worker holds them: must heartbeat
FAILED = ("FAILED", "CRASHED", "CANCELLED")
SUMMARY_NAME = "last_run.json"


@dataclass(frozen=True)
class DispatchConfig:
    """Keys of the ``attribution`` params section that steer the ``deployments`` executor."""

    deployment: str = "attribute-shard/attribute-shard-process"
    max_dispatch_attempts: int = 3
    lost_after_s: float = 120.0  # no lock heartbeat from a Pending/Running run this long: lost
    heartbeat_s: float = 10.0  # lock heartbeat period (< lost_after_s / 2)
    poll_s: float = 2.0
    timeout_s: float = 0.0  # whole dispatch; 0 = no limit
    gpu_concurrency_limit: str | None = None  # global concurrency limit name, strict

    def __post_init__(self) -> None:
        if self.max_dispatch_attempts < 1:
            raise ValueError("attribution.max_dispatch_attempts must be >= 1")
        if not 0 < 2 * self.heartbeat_s < self.lost_after_s:
            raise ValueError(
                f"attribution.heartbeat_s ({self.heartbeat_s}) must be > 0 and under half of "
                f"lost_after_s ({self.lost_after_s})"
            )
        if self.poll_s <= 0 or self.timeout_s < 0:
            raise ValueError("attribution.dispatch_poll_s must be > 0, dispatch_timeout_s >= 0")

    @classmethod
    def from_section(cls, section: dict) -> DispatchConfig:
        known = {f.name for f in fields(cls)}
        aliases = {"dispatch_poll_s": "poll_s", "dispatch_timeout_s": "timeout_s"}
        picked = {}
        for key, value in section.items():
            name = aliases.get(key, key)
            if name in known and value is not None:
                picked[name] = value
        return cls(**picked)


@dataclass
class _Attempt:
    shard: int
    attempt: int
    run_id: UUID
    dispatches: int
    alive_at: float | None = None  # last time the run was seen alive (active + fresh lock)
    history: list[dict] = field(default_factory=list)


def write_run_summary(directory: Path, summary: dict) -> None:
    """The shard flow's summary, for the dispatcher (flow results may not be persisted)."""
    blob = json.dumps(summary, sort_keys=True, default=str).encode()
    atomic_write_bytes(directory / SUMMARY_NAME, blob)


def read_run_summary(directory: Path, run_id: UUID) -> dict | None:
    try:
        summary = json.loads((directory / SUMMARY_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return summary if summary.get("flow_run_id") == str(run_id) else None


def _shard_result(current: _Attempt, state: str, summary: dict) -> dict:
    """What `dispatch_shards` reports for a shard it is done with (completed or given up)."""
    return {
        "shard": current.shard,
        "state": state,
        "attempt": current.attempt,
        "dispatches": current.dispatches,
        "flow_run_id": str(current.run_id),
        "history": current.history,
        "summary": summary,
    }


def _require_server() -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError(
            "executor 'deployments' needs PREFECT_API_URL pointing at the server the "
            "workers poll (a temporary per-process server is invisible to workers)"
        )


def dispatch_shards(
    params_path: str,
    shards: list[int],
    params_hash: str,
    out_dir: str,
    config: DispatchConfig,
) -> list[dict]:
    """Run ``shards`` as deployment flow runs until each completes or runs out of attempts.

    Returns one dict per shard (final state, attempts, run ids, the run's summary).
    Raises RuntimeError naming the shards that never completed.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    _require_server()
    clock = time.monotonic()

    def submit(shard: int, attempt: int) -> tuple[int, UUID]:
        parameters = {
            "params_path": params_path,
            "shard": shard,
            "params_hash": params_hash,
            "out_dir": out_dir,
        }
        if config.gpu_concurrency_limit:  # else the deployment's own default applies
            parameters["concurrency_limit"] = config.gpu_concurrency_limit
        while True:
            run = run_deployment(
                config.deployment,
                parameters=parameters | {"attempt": attempt},
                timeout=0,
                idempotency_key=f"{params_hash}-shard{shard}-attempt{attempt}",
                tags=["bbam", f"shard-{shard}"],
            )
            kind = run.state.type.value if run.state else "SCHEDULED"
            if kind == "COMPLETED" or kind in FAILED:
                attempt += 1  # an earlier invocation's finished run: never reuse it
                continue
            return attempt, run.id

    pending: dict[int, _Attempt] = {}
    for shard in shards:
        attempt, run_id = submit(shard, 1)
        pending[shard] = _Attempt(shard, attempt, run_id, dispatches=1)
    print(f"[bbam] dispatched {len(shards)} shard runs to {config.deployment}")
    done: dict[int, dict] = {}
    with get_client(sync_client=True) as client:
        while pending:
            for shard, current in list(pending.items()):
                run = client.read_flow_run(current.run_id)
                kind = run.state.type.value if run.state else "SCHEDULED"
                reason = None
                if kind == "COMPLETED":
                    summary = read_run_summary(shard_dir(out_dir, shard), current.run_id)
                    done[shard] = _shard_result(current, kind, summary or {})
                    del pending[shard]
                    continue
                if kind in FAILED:
                    reason = f"{run.state.name}: {run.state.message or ''}".strip()
                elif kind in ACTIVE:
                    now = time.monotonic()
                    lock = read_lock(shard_dir(out_dir, shard))
                    fresh = (
                        lock is not None
                        and str(current.run_id) in str(lock.get("owner", ""))
                        and lock["age_s"] <= config.lost_after_s
                    )
                    if fresh or current.alive_at is None:
                        current.alive_at = now
                    elif now - current.alive_at > config.lost_after_s:
                        reason = (
                            f"lost: {kind} with no shard-lock heartbeat for "
                            f"{now - current.alive_at:.0f} s"
                        )
                        client.set_flow_run_state(
                            current.run_id,
                            Crashed(message=f"bbam dispatcher: {reason}"),
                            force=True,
                        )
                if reason is None:
                    continue
                current.history.append(
                    {"attempt": current.attempt, "flow_run_id": str(current.run_id), "why": reason}
                )
                print(f"[bbam] shard {shard} attempt {current.attempt}: {reason}")
                if current.dispatches >= config.max_dispatch_attempts:
                    done[shard] = _shard_result(current, kind, {})
                    del pending[shard]
                    continue
                attempt, run_id = submit(shard, current.attempt + 1)
                print(f"[bbam] shard {shard}: re-dispatched as attempt {attempt}")
                current.attempt, current.run_id = attempt, run_id
                current.dispatches += 1
                current.alive_at = None
            if config.timeout_s and time.monotonic() - clock > config.timeout_s:
                raise RuntimeError(
                    f"dispatch timed out after {config.timeout_s} s; still waiting for shards "
                    f"{sorted(pending)} (their runs keep going; re-run to resume)"
                )
            if pending:
                time.sleep(config.poll_s)
    results = [done[s] for s in shards]
    failed = [r["shard"] for r in results if r["state"] != "COMPLETED"]
    if failed:
        raise RuntimeError(
            f"shards {failed} did not complete after {config.max_dispatch_attempts} dispatches: "
            + "; ".join(f"{r['shard']}: {r['history'][-1]['why']}" for r in results if r["history"])
        )
    return results


def verify_shards(dataset, shards: list[int], num_shards: int, out_dir: str) -> None:
    """Every planned instance of every shard has a manifest row (nothing lost on the way)."""
    missing: dict[int, int] = {}
    for shard in shards:
        planned = {
            instance_key(r.image_id, i.instance_id)
            for r, i in plan_shard(dataset, shard, num_shards)
        }
        directory = shard_dir(out_dir, shard)
        table = read_shard(directory) if directory.exists() else None
        have = (
            set(table.column("key").to_pylist()) if table is not None and table.num_rows else set()
        )
        if planned - have:
            missing[shard] = len(planned - have)
    if missing:
        raise RuntimeError(f"{out_dir}: shards lack manifest rows for planned instances: {missing}")


def run_on_deployments(
    params_path: str, params: dict, shards: list[int], params_hash: str, out_dir: str | Path
) -> list[dict]:
    """The ``deployments`` executor as the attribute flow uses it: dispatch, then verify.

    Returns per-shard summaries shaped like the local executor's (``ran``, ``skipped_done``).
    """
    section = params["attribution"]
    config = DispatchConfig.from_section(section)
    results = dispatch_shards(params_path, shards, params_hash, str(out_dir), config)
    dataset = attribution_split(params)  # every image, as the shards plan them
    verify_shards(dataset, shards, int(section["num_shards"]), str(out_dir))
    redispatched = sum(r["dispatches"] - 1 for r in results)
    if redispatched:
        print(f"[bbam] {redispatched} shard runs were re-dispatched (failed or lost)")
    return [
        {
            "shard": r["shard"],
            "ran": int(r["summary"].get("ran", 0)),
            "skipped_done": int(r["summary"].get("skipped_done", 0)),
            "dispatches": r["dispatches"],
        }
        for r in results
    ]
