"""Fault tolerance of the attribution stage: one writer per shard (the local executor takes
the shard lock too, and a run whose lock was taken over stops at its next chunk), a changed
``num_shards`` re-shards finished work instead of recomputing it, the merged manifest holds
only current rows of planned instances (the rest counted as missing), an image gone since
prepare_data gets skipped rows naming it, and nothing trusts a cache of deleted outputs.

The engine is a stand-in (a grid from the key's crc32); the stage's own code runs for real,
as plain functions and, where Prefect is the point, as the flow on a loopback server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prefect.logging import disable_run_logger

import bbam.shards as shards_module
import tasks.attribution as attribution_module
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.data.writers import write_coco_json
from bbam.manifest import load_grid, merge_manifests, read_shard, shard_folder, write_part
from bbam.shard_lock import LockLost, ShardBusy, ShardLock, read_lock
from bbam.shards import (
    LAYOUT_NAME,
    ShardLayoutError,
    misplaced_rows,
    recover_reshard,
    reshard,
    run_shard,
)
from tasks.attribution import attribute_shard, merge_shards
from tasks.attribution_config import shard_dir

OUT = "runs/attribution"


class Engine:
    """A stand-in for the BBAM engine, recording the keys it ran and calling ``hook`` after
    each chunk (to break a lock half-way through a shard)."""

    def __init__(self, hook=None) -> None:
        self.seen: list[str] = []
        self.chunks = 0
        self.hook = hook

    def __call__(self, images, items):
        self.chunks += 1
        out = []
        for item in items:
            self.seen.append(item.key)
            grid = np.full((3, 4), zlib.crc32(item.key.encode()) % 97 / 97.0, np.float32)
            out.append(({"status": "ok", "resized_h": 16, "resized_w": 20}, grid))
        if self.hook is not None:
            self.hook(self)
        return out


def _records(root: Path, images: int, per_image: int = 2) -> list[ImageRecord]:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(images):
        path = root / f"im{i}.png"
        Image.fromarray(np.full((16, 20, 3), i * 10, np.uint8)).save(path)
        instances = [
            Instance(instance_id=10 * i + k + 1, label=1, box=np.array([1, 2, 10 + k, 12]))
            for k in range(per_image)
        ]
        records.append(ImageRecord(f"im{i}", path, 20, 16, instances))
    return records


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with a COCO split of 8 images (16 instances), a detector file for
    the params hash and the engine replaced by ``Engine``; yields (params, engines)."""
    monkeypatch.chdir(tmp_path)
    records = _records(Path("data/images"), 8)
    write_coco_json("data/train.json", Dataset(["a"], records), image_root="data/images")
    Path("runs/detector").mkdir(parents=True)
    Path("runs/detector/model.pt").write_bytes(b"weights")
    params = {
        "seed": 0,
        "device": "cpu",
        "data": {"train_json": "data/train.json", "train_images": "data/images"},
        "attribution": {
            "split": "train",
            "profile": "fast",
            "overrides": {},
            "num_shards": 2,
            "chunk_size": 2,
            "max_attempts": 2,
            "max_failure_fraction": 0.0,
            "lost_after_s": 30,
            "heartbeat_s": 1,
        },
    }
    engines: list[Engine] = []

    def chunk_fn(model, config, device):
        engines.append(Engine())
        return engines[-1]

    monkeypatch.setattr(attribution_module, "load_detector_from_params", lambda *a: None)
    monkeypatch.setattr(attribution_module, "detector_chunk_fn", chunk_fn)
    return params, engines


def _planned(params: dict) -> set[str]:
    dataset = attribution_module.attribution_split(params)
    return {f"{r.image_id}/{i.instance_id}" for r in dataset.records for i in r.instances}


def _run_shard_fn(params: dict, shard: int, params_hash: str = "h") -> dict:
    with disable_run_logger():
        return attribute_shard.fn(params, shard, OUT, params_hash)


def _merge_fn(params: dict, params_hash: str = "h") -> dict:
    with disable_run_logger():
        num_shards = params["attribution"]["num_shards"]
        return merge_shards.fn(params, OUT, num_shards, params_hash)


# ----------------------------------------------------------------- 1. one writer per shard


def test_local_shard_refuses_to_start_while_another_run_holds_it(project):
    params, engines = project
    directory = shard_dir(OUT, 0)
    with ShardLock(directory, "the other run", stale_s=30, heartbeat_s=1):
        with pytest.raises(ShardBusy) as caught:
            _run_shard_fn(params, 0)
        assert read_lock(directory)["owner"] == "the other run"  # untouched
    message = str(caught.value)
    assert str(directory / ".lock") in message and "the other run" in message
    assert f"another run is working in {directory}: let it finish or stop it" in message
    assert not engines and not list(directory.glob("part-*")), "the second run wrote"


def test_taken_over_shard_stops_at_the_next_chunk_and_writes_nothing_more(project, monkeypatch):
    """A run presumed dead (its lock broken and taken by a new attempt) used to attribute
    the whole shard, racing the new attempt on part numbers and compaction."""
    params, engines = project
    directory = shard_dir(OUT, 0)

    def take_over(engine: Engine) -> None:
        if engine.chunks == 2:  # a new attempt breaks the lock (rename) and takes it
            (directory / ".lock").rename(directory / ".lock.stale")
            (directory / ".lock").write_text(json.dumps({"owner": "new attempt", "token": "x"}))

    def chunk_fn(model, config, device):
        engines.append(Engine(take_over))
        return engines[-1]

    monkeypatch.setattr(attribution_module, "detector_chunk_fn", chunk_fn)
    with pytest.raises(LockLost, match=r"\.lock: lock taken over"):
        _run_shard_fn(params, 0)
    (engine,) = engines
    planned = len(shards_module.plan_shard(attribution_module.attribution_split(params), 0, 2))
    assert engine.chunks == 2 and len(engine.seen) < planned
    assert len(list(directory.glob("part-*.parquet"))) == 1, "the chunk in hand was written"
    assert not (directory / "manifest.parquet").exists(), "a presumed-dead run compacted"
    assert read_lock(directory)["owner"] == "new attempt"  # the new holder's lock stays


HOLD = """
import sys, time
from bbam.shard_lock import ShardLock
ShardLock(sys.argv[1], "a local run", stale_s=30, heartbeat_s=1).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_killed_local_run_does_not_block_the_rerun(tmp_path):
    """The local executor now takes the lock: after a SIGKILL (OOM killer, kill -9) on this
    host, the rerun takes it over at once rather than refuse for lost_after_s."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(ShardBusy, match="a local run"):  # alive: refused
            ShardLock(tmp_path, "rerun", stale_s=30, heartbeat_s=1).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert read_lock(tmp_path)["owner"] == "a local run"  # left behind, heartbeat fresh
    with ShardLock(tmp_path, "rerun", stale_s=30, heartbeat_s=1):
        assert read_lock(tmp_path)["owner"] == "rerun"


def test_run_shard_checks_before_every_write(tmp_path):
    dataset = Dataset(["a"], _records(tmp_path / "img", 4))
    calls: list[int] = []

    def before_write() -> None:
        calls.append(len(list((tmp_path / "shard").glob("part-*.parquet"))))

    run_shard(
        dataset, 0, 1, tmp_path / "shard", Engine(), "h", chunk_size=2, before_write=before_write
    )
    assert calls == [0, 1, 2, 3, 4]  # before each of the 4 parts, then before compaction


# ----------------------------------------------------------------- 2. num_shards changed


def _write_layout(tmp_path: Path, records: list[ImageRecord], num_shards: int) -> Path:
    root = tmp_path / "shards"
    dataset = Dataset(["a"], records)
    for shard in range(num_shards):
        run_shard(
            dataset, shard, num_shards, shard_folder(root, shard), Engine(), "h", chunk_size=3
        )
    return root


def _all_maps(root: Path) -> dict[str, np.ndarray]:
    maps = {}
    for folder in sorted(root.glob("shard-*")):
        for row in read_shard(folder).to_pylist():
            assert row["key"] not in maps, f"{row['key']} twice"
            maps[row["key"]] = load_grid(folder, row)
    return maps


@pytest.mark.parametrize(("before", "after"), [(2, 4), (4, 3), (3, 1)])
def test_changed_num_shards_moves_finished_work_instead_of_recomputing(tmp_path, before, after):
    records = _records(tmp_path / "img", 12)
    root = _write_layout(tmp_path, records, before)
    maps = _all_maps(root)
    misplaced = misplaced_rows(root, after)
    assert misplaced > 0
    moved = reshard(root, after, stale_s=30, heartbeat_s=1)
    assert sum(moved.values()) == misplaced and misplaced_rows(root, after) == 0
    assert {p.name for p in root.glob("shard-*")} <= {f"shard-{s:04d}" for s in range(after)}
    got = _all_maps(root)
    assert got.keys() == maps.keys()
    for key in maps:
        np.testing.assert_array_equal(got[key], maps[key])
    engine = Engine()
    dataset = Dataset(["a"], records)
    for shard in range(after):
        summary = run_shard(dataset, shard, after, shard_folder(root, shard), engine, "h")
        assert summary["ran"] == 0 and summary["skipped_done"] == summary["planned"]
    assert engine.seen == [], "finished work was recomputed"
    folders = [shard_folder(root, s) for s in range(after) if shard_folder(root, s).exists()]
    assert merge_manifests(folders).num_rows == 24
    assert not list(tmp_path.glob(".shards.*")), "the re-shard left a folder behind"
    assert reshard(root, after) == {}, "a second call has nothing to do"


def test_a_shard_of_another_layout_is_refused_not_recomputed(tmp_path):
    """Before: the shard recomputed the instances another folder already held, and the
    merge then failed on duplicate keys."""
    records = _records(tmp_path / "img", 12)
    root = _write_layout(tmp_path, records, 2)
    engine = Engine()
    with pytest.raises(ShardLayoutError, match="another num_shards; re-shard first"):
        run_shard(Dataset(["a"], records), 0, 4, shard_folder(root, 0), engine, "h")
    assert engine.seen == []


def test_merge_names_the_duplicated_key_and_both_folders(tmp_path):
    for name in ("shard-0000", "shard-0001"):
        write_part(tmp_path / name, [{"key": "x/0", "status": "ok"}], [np.ones((1, 1))])
    with pytest.raises(ValueError, match="x/0 appears in more than one shard") as caught:
        merge_manifests([tmp_path / "shard-0000", tmp_path / "shard-0001"])
    assert str(tmp_path / "shard-0000") in str(caught.value)
    assert str(tmp_path / "shard-0001") in str(caught.value)


def test_reshard_waits_for_no_one_and_changes_nothing_while_a_shard_is_held(tmp_path):
    records = _records(tmp_path / "img", 12)
    root = _write_layout(tmp_path, records, 2)
    maps = _all_maps(root)
    with ShardLock(shard_folder(root, 1), "a live run", stale_s=30, heartbeat_s=1):
        with pytest.raises(ShardBusy, match="a live run"):
            reshard(root, 4, stale_s=30, heartbeat_s=1)
    assert _all_maps(root).keys() == maps.keys() and misplaced_rows(root, 2) == 0
    assert not list(tmp_path.glob(".shards.*"))
    assert not list(root.glob("shard-*/.lock"))


def test_a_reshard_in_progress_is_not_taken_for_a_leftover(tmp_path):
    """Another run's half-built layout looks like a killed one's: only the holder of the
    re-shard lock (on the parent folder) may clean it up."""
    records = _records(tmp_path / "img", 12)
    root = _write_layout(tmp_path, records, 2)
    building = tmp_path / ".shards.new-other"
    (building / "shard-0003").mkdir(parents=True)
    with ShardLock(tmp_path, "another stage run re-sharding", stale_s=30, heartbeat_s=1):
        with pytest.raises(ShardBusy, match="another stage run re-sharding"):
            reshard(root, 4, stale_s=30, heartbeat_s=1)
        assert building.is_dir() and misplaced_rows(root, 4) > 0
    assert reshard(root, 4, stale_s=30, heartbeat_s=1) and not building.exists()


class Killed(BaseException):
    """A kill -9 at a chosen point (BaseException: nothing on the way catches it)."""


def _check_one_complete_layout(root: Path, maps: dict, num_shards: int | None) -> None:
    recover_reshard(root)
    assert not list(root.parent.glob(".shards.*"))
    got = _all_maps(root)
    assert got.keys() == maps.keys()
    for key in maps:
        np.testing.assert_array_equal(got[key], maps[key])
    if num_shards is not None:
        assert misplaced_rows(root, num_shards) == 0
        assert json.loads((root / LAYOUT_NAME).read_text())["num_shards"] == num_shards


@pytest.mark.parametrize("where", ["building", "before the swap", "between the renames"])
def test_a_killed_reshard_leaves_the_old_or_the_new_layout_complete(tmp_path, monkeypatch, where):
    records = _records(tmp_path / "img", 12)
    root = _write_layout(tmp_path, records, 2)
    maps = _all_maps(root)
    if where == "building":
        real = shards_module.write_part
        calls = []

        def write_part_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(shards_module, "write_part", write_part_then_die)
    else:
        real_rename = os.rename
        renames = []

        def rename_then_die(src, dst):
            renames.append(1)
            if len(renames) == (1 if where == "before the swap" else 2):
                raise Killed
            return real_rename(src, dst)

        monkeypatch.setattr(shards_module.os, "rename", rename_then_die)
    with pytest.raises(Killed):
        reshard(root, 4, stale_s=30, heartbeat_s=1)
    monkeypatch.undo()
    completed = where == "between the renames"  # the new layout was whole: it goes in
    _check_one_complete_layout(root, maps, 4 if completed else None)
    assert reshard(root, 4, stale_s=30, heartbeat_s=1) or completed
    _check_one_complete_layout(root, maps, 4)


# ----------------------------------------------------------------- 3. only current rows


def test_merge_keeps_only_current_rows_of_planned_instances(project):
    params, _ = project
    for shard in range(2):
        _run_shard_fn(params, shard, params_hash="old")
    _run_shard_fn(params, 0, params_hash="new")  # shard 1 never ran with the new settings
    summary = _merge_fn(params, params_hash="new")
    merged = pq.read_table(Path(OUT) / "manifest.parquet")
    assert set(merged.column("params_hash").to_pylist()) == {"new"}
    planned = _planned(params)
    shard0 = set(read_shard(shard_dir(OUT, 0)).column("key").to_pylist())
    assert set(merged.column("key").to_pylist()) == shard0 and shard0 < planned
    assert summary["instances"] == len(planned) == 16
    assert summary["missing"] == len(planned - shard0) > 0
    assert set(summary["missing_keys"]) <= planned - shard0 and summary["missing_keys"]
    assert summary["missing_in_run"] == summary["missing"]  # every shard was this run's
    with disable_run_logger():
        only0 = merge_shards.fn(params, OUT, 2, "new", shards=[0])
    assert only0["missing"] == summary["missing"] and only0["missing_in_run"] == 0


def test_rows_of_another_split_stay_out_of_the_merge(project):
    params, _ = project
    for shard in range(2):
        _run_shard_fn(params, shard)
    foreign = [{"key": "val9/1", "image_id": "val9", "status": "failed", "params_hash": "h"}]
    write_part(shard_dir(OUT, 1), foreign, [None])
    summary = _merge_fn(params)
    assert (summary["instances"], summary["ok"], summary["failed"]) == (16, 16, 0)
    assert summary["missing"] == 0


# ----------------------------------------------------------------- 4. image gone


def test_an_image_deleted_after_prepare_gets_skipped_rows_naming_it(project):
    """Before: load_split dropped it, and its instances vanished from the manifest. Now they
    are skipped rows naming the file, and prepare_data's limit on unreadable images applies
    again (1 of 8 images > data.max_unreadable_train's default 1 %: a partial copy fails)."""
    params, _ = project
    gone = Path("data/images/im3.png")
    gone.unlink()
    for shard in range(2):
        _run_shard_fn(params, shard)
    summary = _merge_fn(params)
    rows = pq.read_table(Path(OUT) / "manifest.parquet").to_pylist()
    lost = [r for r in rows if r["image_id"] == "im3"]
    assert len(lost) == 2 and {r["status"] for r in lost} == {"skipped"}
    assert all(r["error"].startswith(f"{gone}: image file not found") for r in lost)
    assert summary["failed"] == 0 and summary["skipped"] == 2 and summary["missing"] == 0
    assert summary["instances"] == 16 and summary["unreadable_images"] == 1
    assert summary["unreadable_image_errors"][0].startswith(f"{gone}: image file not found")
    assert "data.max_unreadable_train" in summary["unreadable_error"]
    assert str(gone) in summary["unreadable_error"]
    params["data"]["max_unreadable_train"] = 0.2  # within the limit: a recorded skip only
    assert _merge_fn(params)["unreadable_error"] == ""


def test_an_image_prepare_found_unreadable_is_skipped_by_name_until_replaced(tmp_path):
    """Accepted under data.max_unreadable_train, such an image is the data stage's decision:
    its instances are skipped rows naming it, not failures; a replaced file is attributed."""
    records = _records(tmp_path / "img", 3)
    dataset, engine = Dataset(["a"], records), Engine()
    bad = {"im1": f"{records[1].path}: truncated"}
    out = tmp_path / "shard"
    summary = run_shard(dataset, 0, 1, out, engine, "h", chunk_size=2, skip_images=bad)
    rows = {r["key"]: r for r in read_shard(out).to_pylist()}
    skipped = [r for r in rows.values() if r["image_id"] == "im1"]
    assert len(skipped) == 2 and {r["status"] for r in skipped} == {"skipped"}
    assert all(r["error"].startswith(bad["im1"]) for r in skipped)
    assert summary["skipped"] == 2 and summary["failed"] == 0
    assert not any(k.startswith("im1/") for k in engine.seen)
    again = run_shard(dataset, 0, 1, out, engine, "h", skip_images=bad)
    assert again["ran"] == 0  # still unreadable: done
    run_shard(dataset, 0, 1, out, engine, "h")  # the file was replaced
    assert sorted(k for k in engine.seen if k.startswith("im1/")) == ["im1/11", "im1/12"]
    assert {r["status"] for r in read_shard(out).to_pylist()} == {"ok"}


def test_the_stage_skips_what_prepare_found_unreadable(project):
    """The data stage's cache (data/image_check.json) names an image unreadable: the shard
    skips its instances, naming the file, and the merge counts it without a failure."""
    from bbam.data.verify import verify_images

    params, _ = project
    image = Path("data/images/im2.png")
    image.write_bytes(image.read_bytes()[:40])
    found = verify_images(sorted(str(p) for p in Path("data/images").glob("*.png")), workers=1)
    assert list(found) == [str(image)]  # the data stage's check, cached in data/
    for shard in range(2):
        _run_shard_fn(params, shard)
    summary = _merge_fn(params)
    rows = pq.read_table(Path(OUT) / "manifest.parquet").to_pylist()
    mine = [r for r in rows if r["image_id"] == "im2"]
    assert {r["status"] for r in mine} == {"skipped"} and len(mine) == 2
    assert all(r["error"].startswith(f"{image}: ") for r in mine)
    assert all(
        r["error"].endswith("found unreadable by prepare_data; not attributed") for r in mine
    )
    assert (summary["failed"], summary["skipped"], summary["unreadable_images"]) == (0, 2, 1)


# ----------------------------------------------------------------- 5. the stage, for real


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from loopback_prefect import prefect_server
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    with prefect_server(tmp_path_factory.mktemp("prefect"), timeout_s=600) as env:
        settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_LOGGING_TO_API_ENABLED: False}
        with temporary_settings(settings):
            yield


def _stage(params: dict, shards: str | None = None):
    from flows.attribute import attribute_flow

    return attribute_flow(params=params, shards=shards, executor="local", return_state=True)


def _metrics() -> dict:
    return json.loads(Path("metrics/attribution.json").read_text())


@pytest.mark.slow
def test_the_stage_survives_deleted_outputs_a_new_shard_count_and_a_subset(prefect_api, project):
    """With dvc.yaml in place (so tasks.caching would key the tasks on their inputs only):
    a deleted shard folder or merged manifest is rebuilt, not reported as reused; a changed
    num_shards reuses every finished map; a --shards subset counts the other shards'
    instances missing without failing on them (another host's to run)."""
    params, engines = project
    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "dvc.yaml", "dvc.yaml")
    manifest = Path(OUT) / "manifest.parquet"

    assert _stage(params).is_completed()
    assert _metrics()["ran_now"] == 16 and _metrics()["instances"] == 16

    shutil.rmtree(shard_dir(OUT, 1))
    assert _stage(params).is_completed()
    first = _metrics()
    assert first["ran_now"] > 0 and first["ok"] == 16, "a deleted shard was reported reused"
    manifest.unlink()
    assert _stage(params).is_completed()
    assert manifest.is_file() and pq.read_table(manifest).num_rows == 16
    assert _metrics()["ran_now"] == 0
    before = manifest.read_bytes()  # the next stage's cache key: a no-op rerun keeps it
    assert _stage(params).is_completed() and manifest.read_bytes() == before

    ran_before = sum(len(e.seen) for e in engines)
    params["attribution"]["num_shards"] = 3
    assert _stage(params).is_completed()
    again = _metrics()
    assert again["resharded_rows"] > 0 and again["ran_now"] == 0 and again["ok"] == 16
    assert sum(len(e.seen) for e in engines) == ran_before, "finished maps were recomputed"

    params["attribution"]["overrides"] = {"iterations": 7}  # new settings, one shard only
    state = _stage(params, shards="0")
    assert state.is_completed(), state
    metrics = _metrics()
    assert metrics["missing"] > 0 and metrics["ok"] + metrics["missing"] == 16
    assert metrics["missing_in_run"] == 0
    assert set(pq.read_table(manifest).column("params_hash").to_pylist()) == {
        metrics["params_hash"]
    }
