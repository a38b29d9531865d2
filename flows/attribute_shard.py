"""One attribution shard as its own flow: the unit a work-pool worker executes.

Deployed by ``prefect.yaml`` and fanned out by ``tasks.deployments`` (executor
``deployments``). Paths (``params_path``, ``out_dir``, ``runs/detector``) are
relative to the working directory, which the deployment's pull step sets to the
checkout on shared storage. The shard holds ``<shard_dir>/.lock`` while it works
(see ``bbam.shard_lock``) so a re-dispatched attempt never writes alongside a
run that is still alive, and a run whose lock was taken over stops at its next chunk.
"""

from __future__ import annotations

import contextlib

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from bbam.shard_lock import LockLost, ShardLock
from flows.common import configure_runtime
from tasks.attribution import lock_timing, run_locked_shard
from tasks.attribution_config import shard_dir
from tasks.deployments import write_run_summary
from tasks.params import ATTRIBUTION_DIR, load_params

OUT_DIR = str(ATTRIBUTION_DIR)


def gpu_slot(limit_name: str | None, lease_s: float):
    """Hold one slot of a global concurrency limit. strict: a missing limit is an error, not
    silently no limit. The slot's lease is renewed while we run; a killed holder's slot comes
    back when the lease expires (server's repossessor), about when the dispatcher declares
    the run lost. None: no server-side limit (bound GPUs with ``worker start --limit 1``)."""
    if not limit_name:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(limit_name, occupy=1, strict=True, lease_duration=max(60.0, lease_s))


@flow(name="attribute-shard", log_prints=True)
def attribute_shard_flow(
    params_path: str,
    shard: int,
    params_hash: str,
    attempt: int = 1,
    out_dir: str = OUT_DIR,
    concurrency_limit: str | None = None,
) -> dict:
    params = load_params(params_path)  # a process boundary: the path comes in, not the dict
    configure_runtime(params)
    stale_s, heartbeat_s = lock_timing(params["attribution"])
    directory = shard_dir(out_dir, shard)
    owner = f"flow-run {flow_run.get_id()} attempt {attempt}"
    lock = ShardLock(directory, owner, stale_s, heartbeat_s, wait_s=stale_s + 2 * heartbeat_s)
    with lock:
        # Checked once the lock heartbeats: the schema imports every stage's code, which on a
        # busy host can take longer than the dispatcher waits for a new run to show life.
        from flows.params_schema import check_params

        check_params(params, params_path)
        with gpu_slot(concurrency_limit, stale_s):
            # stops at the next chunk, writing nothing more, once the lock is taken over
            summary = run_locked_shard(params, shard, out_dir, params_hash, lock)
        lock.check()  # a run presumed dead must not report success
        summary.update(attempt=attempt, flow_run_id=flow_run.get_id())
        write_run_summary(directory, summary)
    get_run_logger().info("shard %d attempt %d done: %s", shard, attempt, summary)
    return summary


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="run one attribution shard (no dispatcher)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--params-hash", required=True)
    args = parser.parse_args()
    try:
        attribute_shard_flow(args.params, args.shard, args.params_hash)
    except LockLost as exc:
        raise SystemExit(str(exc)) from exc


if __name__ == "__main__":
    _main()
