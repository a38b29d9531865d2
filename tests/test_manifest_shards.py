"""Shard manifests: atomic parts, compaction, resume, retries, no duplicate rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbam import __version__
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.manifest import (
    SCHEMA,
    compact_shard,
    is_current,
    load_grid,
    merge_manifests,
    read_shard,
    shard_folder,
    shard_folders,
    status_counts,
    write_part,
)
from bbam.shards import plan_shard, run_shard, shard_of


def _dataset(
    tmp_path: Path, images: int = 6, per_image: int = 2, broken: set[int] = frozenset()
) -> Dataset:
    records = []
    for i in range(images):
        path = tmp_path / f"img{i}.png"
        if i in broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((16, 20, 3), i * 10, np.uint8)).save(path)
        instances = [
            Instance(instance_id=k, label=1 + k % 2, box=np.array([1, 2, 10 + k, 12], np.float32))
            for k in range(per_image)
        ]
        records.append(ImageRecord(f"im{i}", path, 20, 16, instances))
    return Dataset(["a", "b"], records)


class CountingChunk:
    """A stand-in for the BBAM engine: a grid derived from the key, counting calls."""

    def __init__(self, fail_keys: set[str] = frozenset(), raise_after: int | None = None):
        self.seen: list[str] = []
        self.fail_keys = set(fail_keys)
        self.raise_after = raise_after

    def __call__(self, images, items):
        if self.raise_after is not None and len(self.seen) >= self.raise_after:
            raise KeyboardInterrupt("simulated kill")
        out = []
        for image, item in zip(images, items, strict=True):
            self.seen.append(item.key)
            if item.key in self.fail_keys:
                raise RuntimeError(f"engine failed on {item.key}")
            grid = np.full((3, 4), (hash(item.key) % 97) / 97.0, np.float32)
            grid[0, 0] = image.mean() / 255.0
            out.append(
                (
                    {
                        "status": "ok",
                        "positives": 5,
                        "iterations": 7,
                        "seconds": 0.1,
                        "device": "cpu",
                        "stride": 16.0,
                        "resized_h": 16,
                        "resized_w": 20,
                    },
                    grid,
                )
            )
        return out


def test_write_part_and_read_back(tmp_path):
    grids = [np.random.default_rng(0).random((2, 3)).astype(np.float32), None]
    rows = [{"key": "a/0", "status": "ok"}, {"key": "a/1", "status": "failed", "error": "boom"}]
    write_part(tmp_path, rows, grids)
    table = read_shard(tmp_path)
    assert table.schema.equals(SCHEMA)
    got = table.to_pylist()
    assert [r["key"] for r in got] == ["a/0", "a/1"]
    np.testing.assert_array_equal(load_grid(tmp_path, got[0]), grids[0].astype(np.float16))
    assert got[1]["error"] == "boom" and got[1]["length"] == 0


def test_corrupted_map_is_detected(tmp_path):
    write_part(tmp_path, [{"key": "a/0", "status": "ok"}], [np.ones((2, 2))])
    row = read_shard(tmp_path).to_pylist()[0]
    np.savez_compressed(tmp_path / row["array_file"], maps=np.zeros(4, np.float16))
    with pytest.raises(ValueError, match="sha256"):
        load_grid(tmp_path, row)


def test_compaction_keeps_latest_attempt_once(tmp_path):
    write_part(tmp_path, [{"key": "a/0", "status": "failed", "error": "x"}], [None])
    write_part(
        tmp_path,
        [{"key": "a/0", "status": "ok", "attempt": 2}, {"key": "b/0", "status": "ok"}],
        [np.full((2, 2), 0.5), np.full((1, 3), 0.25)],
    )
    table = compact_shard(tmp_path)
    assert sorted(table.column("key").to_pylist()) == ["a/0", "b/0"]
    assert not list(tmp_path.glob("part-*"))
    rows = {r["key"]: r for r in read_shard(tmp_path).to_pylist()}
    assert rows["a/0"]["status"] == "ok" and rows["a/0"]["attempt"] == 2
    np.testing.assert_array_equal(
        load_grid(tmp_path, rows["b/0"]), np.full((1, 3), 0.25, np.float16)
    )


def test_shard_assignment_is_deterministic_and_complete(tmp_path):
    dataset = _dataset(tmp_path, images=20)
    assigned = [shard_of(r.image_id, 4) for r in dataset.records]
    assert assigned == [shard_of(r.image_id, 4) for r in dataset.records]
    planned = [p for s in range(4) for p in plan_shard(dataset, s, 4)]
    keys = [(r.image_id, i.instance_id) for r, i in planned]
    assert len(keys) == len(set(keys)) == 40


def test_resume_after_kill_recomputes_nothing_finished(tmp_path):
    dataset = _dataset(tmp_path)
    shard_dir = tmp_path / "shard"
    killer = CountingChunk(raise_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_shard(dataset, 0, 1, shard_dir, killer, "h1", chunk_size=2)
    finished = set(read_shard(shard_dir).column("key").to_pylist())
    assert finished == set(killer.seen) and len(finished) == 4
    resumed = CountingChunk()
    summary = run_shard(dataset, 0, 1, shard_dir, resumed, "h1", chunk_size=2)
    assert not finished & set(resumed.seen), "finished instances were recomputed"
    assert summary["skipped_done"] == 4 and summary["ok"] == 12
    table = read_shard(shard_dir)
    assert table.num_rows == 12 and len(set(table.column("key").to_pylist())) == 12

    # The same result as an uninterrupted run, map for map.
    fresh_dir = tmp_path / "fresh"
    run_shard(dataset, 0, 1, fresh_dir, CountingChunk(), "h1", chunk_size=2)
    a = {r["key"]: load_grid(shard_dir, r) for r in read_shard(shard_dir).to_pylist()}
    b = {r["key"]: load_grid(fresh_dir, r) for r in read_shard(fresh_dir).to_pylist()}
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_stop_request_ends_the_shard_at_a_chunk_boundary(tmp_path):
    dataset = _dataset(tmp_path)
    shard_dir = tmp_path / "shard"
    engine = CountingChunk()
    summary = run_shard(
        dataset,
        0,
        1,
        shard_dir,
        engine,
        "h1",
        chunk_size=2,
        should_stop=lambda: len(engine.seen) >= 4,
    )
    assert summary["interrupted"] and summary["ran"] == 4 and len(engine.seen) == 4
    assert sorted(read_shard(shard_dir).column("key").to_pylist()) == sorted(engine.seen)
    assert not (shard_dir / "manifest.parquet").exists(), "an interrupted shard is not compacted"
    resumed = CountingChunk()
    summary = run_shard(dataset, 0, 1, shard_dir, resumed, "h1", chunk_size=2)
    assert not summary["interrupted"] and summary["skipped_done"] == 4 and summary["ok"] == 12
    assert not set(engine.seen) & set(resumed.seen)


def test_failures_are_recorded_and_retried_up_to_a_bound(tmp_path):
    dataset = _dataset(tmp_path, images=4, broken={1})
    shard_dir = tmp_path / "shard"
    summary = run_shard(
        dataset, 0, 1, shard_dir, CountingChunk(fail_keys={"im2/0"}), "h", chunk_size=1
    )
    rows = {r["key"]: r for r in read_shard(shard_dir).to_pylist()}
    assert rows["im1/0"]["status"] == "failed" and "img1.png" in rows["im1/0"]["error"]
    assert rows["im2/0"]["status"] == "failed" and "engine failed" in rows["im2/0"]["error"]
    assert summary["failed"] == 4 and summary["ok"] == 4  # im1 has 2 instances; im2's chunk has 2

    retry = CountingChunk()
    run_shard(dataset, 0, 1, shard_dir, retry, "h", chunk_size=1, max_attempts=2)
    assert set(retry.seen) == {"im2/0", "im2/1"}  # the unreadable image still fails, retried once
    rows = {r["key"]: r for r in read_shard(shard_dir).to_pylist()}
    assert rows["im2/0"]["status"] == "ok" and rows["im2/0"]["attempt"] == 2
    assert rows["im1/0"]["status"] == "failed" and rows["im1/0"]["attempt"] == 2

    third = CountingChunk()
    summary = run_shard(dataset, 0, 1, shard_dir, third, "h", chunk_size=1, max_attempts=2)
    assert third.seen == [] and summary["failed"] == 2


def test_changed_params_hash_recomputes(tmp_path):
    dataset = _dataset(tmp_path, images=2)
    shard_dir = tmp_path / "shard"
    run_shard(dataset, 0, 1, shard_dir, CountingChunk(), "old")
    again = CountingChunk()
    run_shard(dataset, 0, 1, shard_dir, again, "new")
    assert len(again.seen) == 4
    assert set(read_shard(shard_dir).column("params_hash").to_pylist()) == {"new"}


def test_merge_refuses_a_key_in_two_shards(tmp_path):
    for name in ("s0", "s1"):
        write_part(tmp_path / name, [{"key": "x/0", "status": "ok"}], [np.ones((1, 1))])
    with pytest.raises(ValueError, match="x/0 appears in more than one shard") as caught:
        merge_manifests([tmp_path / "s0", tmp_path / "s1"])
    assert f"{tmp_path / 's0'} and {tmp_path / 's1'}" in str(caught.value)


def test_merge_and_status_counts(tmp_path):
    dataset = _dataset(tmp_path, images=8, broken={3})
    dirs = []
    for shard in range(3):
        dirs.append(tmp_path / f"shard-{shard}")
        run_shard(dataset, shard, 3, dirs[-1], CountingChunk(), "h")
    merged = merge_manifests(dirs)
    assert merged.num_rows == 16
    counts = status_counts(merged)
    assert counts["ok"] == 14 and counts["failed"] == 2


def test_merge_keeps_exactly_the_rows_a_resume_reuses(tmp_path):
    """The merge's filter and ``is_current`` are one rule: same settings and same code."""
    rows = [
        {"key": "a/0", "status": "ok", "params_hash": "h", "code_version": __version__},
        {"key": "b/0", "status": "ok", "params_hash": "h", "code_version": "0.0.0-old"},
        {"key": "c/0", "status": "ok", "params_hash": "other", "code_version": __version__},
        {"key": "d/0", "status": "ok"},  # no stamp at all
    ]
    folder = shard_folder(tmp_path, 0)
    write_part(folder, rows, [np.ones((1, 1))] * len(rows))
    table = read_shard(folder)
    current = {r["key"] for r in table.to_pylist() if is_current(r, "h")}
    assert current == {"a/0"}
    merged = merge_manifests([folder], params_hash="h")
    assert set(merged.column("key").to_pylist()) == current
    assert merge_manifests([folder]).num_rows == 4  # no params_hash: no filter


def test_shard_folders_finds_what_shard_folder_names(tmp_path):
    made = {i: shard_folder(tmp_path, i) for i in (0, 3, 12345)}
    for folder in made.values():
        folder.mkdir()
    (tmp_path / "shard-7").mkdir()  # not a shard folder's name: fewer than 4 digits
    (tmp_path / "shard-0001").write_text("a file, not a folder")
    assert shard_folders(tmp_path) == made
    assert shard_folders(tmp_path / "absent") == {}
