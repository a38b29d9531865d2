"""Stage 3: BBAM attribution maps for every instance, sharded and resumable.

``python -m flows.attribute --params params.yaml [--shards 0,2] [--executor deployments]``
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from bbam.atomic import atomic_write_json
from bbam.manifest import status_counts_by_shard
from bbam.shards import reshard
from flows.common import publish_table, stage_cli
from tasks.attribution import (
    STOP,
    attribute_shard,
    lock_timing,
    merge_shards,
    stop_shards_on_sigterm,
)
from tasks.attribution_config import engine_config, shards_root
from tasks.deployments import run_on_deployments
from tasks.params import (
    ATTRIBUTION_DIR,
    DETECTOR_DIR,
    METRICS_DIR,
    file_sha256,
    params_digest,
    split_paths,
)

OUT_DIR = ATTRIBUTION_DIR
METRICS = METRICS_DIR / "attribution.json"
ARTIFACT = "bbam-attribution-shards"


def attribution_hash(params: dict) -> str:
    """What a finished map depends on: the resolved engine config (profile defaults included,
    so a changed default in the code invalidates old maps too), the split, the detector
    weights and the annotations."""
    section = params["attribution"]
    annotation_json, _ = split_paths(params, section["split"])
    return params_digest(
        dataclasses.asdict(engine_config(params)),
        section["split"],
        params.get("seed", 0),
        file_sha256(DETECTOR_DIR / "model.pt"),
        file_sha256(annotation_json),
    )


def shard_table(manifest: Path, num_shards: int) -> list[dict]:
    """Per shard, then for all, how many instances came out ok, without a positive, failed
    or skipped (the merged manifest's rows): where a bad shard shows in the Prefect UI."""
    table = pq.read_table(manifest, columns=["shard", "status"])
    rows = []
    for shard, counts in sorted(status_counts_by_shard(table, num_shards).items()):
        statuses = {k: counts[k] for k in ("ok", "no_positive", "failed", "skipped")}
        rows.append({"shard": shard, "instances": sum(statuses.values()), **statuses})
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "shard"} if rows else {}
    return [*rows, {"shard": "all", **total}]


def reshard_if_needed(section: dict, out_dir: Path) -> dict[str, int]:
    """Finished work laid out for another ``num_shards`` moves into this one's folders
    (``bbam.shards.reshard``): never recomputed, never merged twice."""
    stale_s, heartbeat_s = lock_timing(section)
    root = shards_root(out_dir)
    moved = reshard(
        root, int(section["num_shards"]), stale_s, heartbeat_s, "flows.attribute re-shard"
    )
    if moved:
        print(
            f"[bbam] attribute: re-sharded {root} into {section['num_shards']} shards, "
            f"{sum(moved.values())} finished rows moved: "
            + ", ".join(f"{k} {v}" for k, v in sorted(moved.items()))
        )
    return moved


@flow(name="attribute")
def attribute_flow(
    params: dict,
    params_path: str = "params.yaml",
    shards: str | None = None,
    executor: str | None = None,
) -> dict:
    section = params["attribution"]
    num_shards = int(section["num_shards"])
    wanted = range(num_shards) if not shards else [int(s) for s in shards.split(",")]
    digest = attribution_hash(params)
    executor = executor or section.get("executor", "local")
    if executor not in ("local", "deployments"):
        raise ValueError(f"{params_path}: attribution.executor {executor!r}: local | deployments")
    started = time.perf_counter()
    moved = reshard_if_needed(section, OUT_DIR)
    if executor == "local":
        STOP.clear()
        with stop_shards_on_sigterm():  # chained in front of Prefect's own SIGTERM handler
            futures = [attribute_shard.submit(params, s, str(OUT_DIR), digest) for s in wanted]
            wait(futures)  # every shard ends (and drops its lock) before one's error is raised
            now = [f.result() for f in futures]  # raises if any shard failed or
            # stopped on request (ShardInterrupted): a partial run is never reported
    else:
        now = run_on_deployments(params_path, params, list(wanted), digest, OUT_DIR)
    summary = merge_shards(params, str(OUT_DIR), num_shards, digest, list(wanted))
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    summary["ran_now"] = sum(s["ran"] for s in now)
    summary["skipped_done"] = sum(s["skipped_done"] for s in now)
    summary["resharded_rows"] = sum(moved.values())
    summary["params_hash"] = digest
    atomic_write_json(METRICS, summary)
    publish_table(  # before the failure check: a failed run shows which shards failed
        ARTIFACT,
        shard_table(OUT_DIR / "manifest.parquet", num_shards),
        f"Attribution: instances per status and shard ({OUT_DIR / 'manifest.parquet'}); "
        f"this run attributed {summary['ran_now']}, reused {summary['skipped_done']}.",
    )
    print(
        f"[bbam] attribute: {summary['instances']} instances, ok {summary['ok']}, "
        f"no_positive {summary['no_positive']}, skipped {summary['skipped']}, "
        f"failed {summary['failed']}, missing {summary['missing']}; "
        f"ran {summary['ran_now']}, reused {summary['skipped_done']}, {summary['wall_seconds']} s"
    )
    if summary["unreadable_images"]:
        print(
            f"[bbam] attribute: unreadable images: {summary['unreadable_images']}, their "
            f"instances are skipped or failed rows: {'; '.join(summary['unreadable_image_errors'])}"
        )
    if summary["missing"]:
        print(
            f"[bbam] attribute: {summary['missing']} planned instances have no row with these "
            f"settings (e.g. {', '.join(summary['missing_keys'])}), "
            f"{summary['missing'] - summary['missing_in_run']} of them in shards this run "
            "did not attribute: run every shard (without --shards) to attribute them"
        )
    # Another host's --shards are not this run's failures; the next stage sees them missing.
    if summary["unreadable_error"]:
        raise RuntimeError(summary["unreadable_error"])
    bad = summary["failed"] + summary["missing_in_run"]
    failed_fraction = bad / max(1, summary["instances"])
    limit = float(section.get("max_failure_fraction", 0.05))
    if failed_fraction > limit:
        raise RuntimeError(
            f"{summary['failed']} failed and {summary['missing']} missing instances "
            f"({failed_fraction:.1%}) exceed max_failure_fraction {limit:.1%}; "
            f"see {OUT_DIR / 'manifest.parquet'}"
        )
    return summary


def attribute(
    params: dict,
    params_path: str = "params.yaml",
    shards: str | None = None,
    executor: str | None = None,
) -> dict:
    """Run the flow with a task runner bounded by ``attribution.concurrent_shards``.

    On SIGTERM the process exits 143 once the shard threads have put down their chunk
    (the hook here is the one Prefect's handler hands the signal on to)."""
    width = max(1, int(params["attribution"].get("concurrent_shards", 1)))
    runner = ThreadPoolTaskRunner(max_workers=width)
    with stop_shards_on_sigterm():
        return attribute_flow.with_options(task_runner=runner)(
            params=params, params_path=params_path, shards=shards, executor=executor
        )


def _extra(parser) -> None:
    parser.add_argument(
        "--shards", default=None, help="comma-separated shard indices (default: all)"
    )
    parser.add_argument(
        "--executor",
        choices=("local", "deployments"),
        default=None,
        help="local: shards in this process; deployments: one flow run per shard on a "
        "work pool (needs PREFECT_API_URL; see docs/scale_out.md). Default: attribution.executor",
    )


if __name__ == "__main__":
    stage_cli("attribute", attribute, _extra)
