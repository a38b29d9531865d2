"""Resuming from a damaged or foreign file: checkpoints restart with a warning naming the
file, shard manifests and map files that cannot be read back are recomputed, and strict
readers name the file and what is wrong."""

from __future__ import annotations

import io
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.builders import make_segmenter_data, tiny_detector_config
from PIL import Image

from bbam import training as T
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.manifest import (
    ManifestError,
    compact_shard,
    load_grid,
    merge_manifests,
    read_shard,
    write_part,
)
from bbam.segmenters.instance import InstanceTrainConfig, train_instance
from bbam.segmenters.semantic import SemanticTrainConfig, train_semantic
from bbam.segmenters.targets import render_label_map
from bbam.shards import run_shard
from bbam.train_detector import train_detector

torch.set_num_threads(1)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not what you think\xff" * 40)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _a_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "empty": _empty, "a tensor": _a_tensor}


# ----------------------------------------------------------------------------- checkpoints


def _tiny_parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = T.make_optimizer(model, 0.1, 0.9, 0.0)
    scheduler = T.make_scheduler(optimizer, 2, (5,), 0.1, 1, 0.1)
    return model, optimizer, scheduler


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_segmenter_checkpoint_starts_over_naming_it(tmp_path, caplog, damage):
    model, optimizer, scheduler = _tiny_parts()
    T.save_checkpoint(tmp_path, "h", 3, model, optimizer, scheduler, None)
    assert T.try_resume(tmp_path, "h", *_tiny_parts(), None)[0] == 4
    path = tmp_path / T.CHECKPOINT_NAME
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="bbam.checkpoint"):
        start, why = T.try_resume(tmp_path, "h", *_tiny_parts(), None)
    assert start == 0 and why  # the reason goes to the training log as a restart event
    assert str(path) in caplog.text and "starting over" in caplog.text
    assert "weights_only" not in caplog.text, "torch's advice to load unsafely is not ours"


def test_checkpoint_that_does_not_fit_leaves_the_model_as_it_was(tmp_path, caplog):
    """load_state_dict copies what matches before it raises: a start over must be clean."""
    model, optimizer, scheduler = _tiny_parts()
    T.save_checkpoint(tmp_path, "h", 0, model, optimizer, scheduler, None)
    ckpt = torch.load(tmp_path / T.CHECKPOINT_NAME, weights_only=True)
    ckpt["model"]["weight"] = torch.full((2, 3), 7.0)  # fits, and is copied first
    ckpt["model"]["bias"] = torch.zeros(5)  # does not fit
    torch.save(ckpt, tmp_path / T.CHECKPOINT_NAME)
    fresh, fresh_opt, fresh_sched = _tiny_parts()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="bbam.checkpoint"):
        assert T.try_resume(tmp_path, "h", fresh, fresh_opt, fresh_sched, None)[0] == 0
    assert "do not fit" in caplog.text and str(tmp_path / T.CHECKPOINT_NAME) in caplog.text
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_checkpoint_missing_states_starts_over(tmp_path, caplog):
    torch.save({"params_hash": "h", "epoch": 2, "model": {}}, tmp_path / T.CHECKPOINT_NAME)
    with caplog.at_level(logging.WARNING, logger="bbam.checkpoint"):
        assert T.try_resume(tmp_path, "h", *_tiny_parts(), None)[0] == 0
    assert "without" in caplog.text and "model" in caplog.text


def test_unreadable_checkpoint_file_raises_naming_it(tmp_path, monkeypatch):
    """An I/O error says nothing about the bytes: starting over could overwrite a good file."""
    T.save_checkpoint(tmp_path, "h", 0, *_tiny_parts(), None)

    def io_error(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "load", io_error)
    with pytest.raises(OSError, match="checkpoint.pt: cannot read the checkpoint"):
        T.try_resume(tmp_path, "h", *_tiny_parts(), None)


def test_semantic_training_restarts_from_a_truncated_checkpoint(tmp_path, caplog):
    records = make_segmenter_data(tmp_path, n=2)
    labels = tmp_path / "sem"
    labels.mkdir()
    for record in records:
        Image.fromarray(render_label_map(record, "mask")).save(labels / f"{record.image_id}.png")
    cfg = SemanticTrainConfig(
        supervision="bbam", epochs=1, batch_size=2, crop_size=64, scale=1.0, device="cpu"
    )
    out = tmp_path / "s"
    first = train_semantic(records, ["thing"], out, cfg, labels, progress=False)
    _truncate(out / T.CHECKPOINT_NAME)
    with caplog.at_level(logging.WARNING, logger="bbam.checkpoint"):
        again = train_semantic(records, ["thing"], out, cfg, labels, progress=False)
    assert str(out / T.CHECKPOINT_NAME) in caplog.text
    assert again.start_epoch == 0 and again.losses == pytest.approx(first.losses, rel=1e-4)
    ckpt = torch.load(out / T.CHECKPOINT_NAME, weights_only=True)  # a good one again
    assert ckpt["epoch"] == 0 and ckpt["params_hash"]
    log = [json.loads(line) for line in (out / T.LOG_NAME).read_text().splitlines()]
    assert {"event": "restart", "reason": "unreadable checkpoint"} in log


def test_instance_training_restarts_from_a_copied_model_file(tmp_path, caplog):
    """model.pt copied over checkpoint.pt: readable, but no checkpoint of ours."""
    records = make_segmenter_data(tmp_path, n=2)
    cfg = InstanceTrainConfig(
        supervision="full", epochs=1, batch_size=2, min_size=64, max_size=64, device="cpu"
    )
    out = tmp_path / "i"
    train_instance(records, ["thing"], out, cfg, progress=False)
    (out / T.CHECKPOINT_NAME).write_bytes((out / T.MODEL_NAME).read_bytes())
    with caplog.at_level(logging.WARNING, logger="bbam.checkpoint"):
        again = train_instance(records, ["thing"], out, cfg, progress=False)
    assert again.start_epoch == 0 and len(again.losses) == 1
    assert f"{out / T.CHECKPOINT_NAME}: not a training checkpoint" in caplog.text


def test_detector_restarts_from_a_garbage_checkpoint(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    data = Dataset(["thing"], make_segmenter_data(tmp_path / "img", n=2))
    cfg = tiny_detector_config(max_size=64)
    out = tmp_path / "det"
    out.mkdir()
    _garbage(out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="bbam.checkpoint"):
        metrics = train_detector(data, data, out, cfg, params_hash="h1", progress=False)
    assert f"{out / 'checkpoint.pt'}: not a readable weights-only torch file" in caplog.text
    assert metrics["epochs"] == 1 and (out / "model.pt").is_file()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["params_hash"] == "h1"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0] == {"event": "restart", "reason": "unreadable checkpoint"}
    assert any(entry.get("event") == "epoch_end" for entry in log)


# ----------------------------------------------------------------------------- shards


def _dataset(tmp_path: Path, images: int = 6, per_image: int = 2) -> Dataset:
    records = []
    for i in range(images):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((16, 20, 3), i * 10, np.uint8)).save(path)
        instances = [
            Instance(instance_id=k, label=1, box=np.array([1, 2, 10 + k, 12], np.float32))
            for k in range(per_image)
        ]
        records.append(ImageRecord(f"im{i}", path, 20, 16, instances))
    return Dataset(["a"], records)


class Engine:
    """A stand-in for the BBAM engine: a grid from the key's crc32, recording what it ran."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, images, items):
        out = []
        for item in items:
            self.seen.append(item.key)
            grid = np.full((3, 4), zlib.crc32(item.key.encode()) % 97 / 97.0, np.float32)
            out.append(({"status": "ok", "resized_h": 16, "resized_w": 20}, grid))
        return out


def _maps(shard_dir: Path) -> dict[str, np.ndarray]:
    return {r["key"]: load_grid(shard_dir, r) for r in read_shard(shard_dir).to_pylist()}


def _partial_shard(tmp_path: Path, dataset: Dataset) -> Path:
    """Two parts of 4 instances each, uncompacted (a stopped run)."""
    shard_dir = tmp_path / "shard"
    engine = Engine()
    run_shard(
        dataset,
        0,
        1,
        shard_dir,
        engine,
        "h",
        chunk_size=4,
        should_stop=lambda: len(engine.seen) >= 8,
    )
    assert len(list(shard_dir.glob("part-*.parquet"))) == 2
    return shard_dir


def _foreign_parquet(path: Path) -> None:
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), path)


def _wrong_types(path: Path) -> None:
    table = pq.read_table(path)
    i = table.schema.get_field_index("attempt")
    pq.write_table(table.set_column(i, "attempt", pa.array(["x"] * table.num_rows)), path)


PART_DAMAGE = {
    "truncated": _truncate,
    "garbage": _garbage,
    "empty": _empty,
    "foreign table": _foreign_parquet,
    "wrong types": _wrong_types,
}


@pytest.mark.parametrize("damage", sorted(PART_DAMAGE))
def test_damaged_manifest_part_is_recomputed(tmp_path, caplog, damage):
    dataset = _dataset(tmp_path)
    shard_dir = _partial_shard(tmp_path, dataset)
    part = shard_dir / "part-00000.parquet"
    lost = set(pq.read_table(part).column("key").to_pylist())
    PART_DAMAGE[damage](part)
    with pytest.raises(ManifestError, match="part-00000.parquet: "):
        read_shard(shard_dir)  # strict readers name the file

    engine = Engine()
    with caplog.at_level(logging.WARNING, logger="bbam"):
        summary = run_shard(dataset, 0, 1, shard_dir, engine, "h", chunk_size=4)
    assert str(part) in caplog.text and "recomputed" in caplog.text
    assert summary["unreadable_files"] == [str(part)]
    assert lost <= set(engine.seen) and summary["skipped_done"] == 4
    assert summary["ok"] == 12 and not part.exists()
    table = read_shard(shard_dir)  # compacted: a clean manifest, one row per instance
    assert table.num_rows == 12 and table.column("key").null_count == 0
    fresh = tmp_path / "fresh"
    run_shard(dataset, 0, 1, fresh, Engine(), "h", chunk_size=4)
    got, want = _maps(shard_dir), _maps(fresh)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_damaged_compacted_manifest_is_recomputed_and_merge_names_it(tmp_path, caplog):
    dataset = _dataset(tmp_path, images=3)
    shard_dir = tmp_path / "shard"
    run_shard(dataset, 0, 1, shard_dir, Engine(), "h")
    manifest = shard_dir / "manifest.parquet"
    _truncate(manifest)
    with pytest.raises(ManifestError, match="manifest.parquet: not a readable Parquet file"):
        merge_manifests([shard_dir])
    engine = Engine()
    with caplog.at_level(logging.WARNING, logger="bbam"):
        summary = run_shard(dataset, 0, 1, shard_dir, engine, "h")
    assert str(manifest) in caplog.text
    assert len(engine.seen) == 6 and summary["ok"] == 6
    assert merge_manifests([shard_dir]).num_rows == 6
    assert len(_maps(shard_dir)) == 6


MAP_DAMAGE = {
    "truncated": _truncate,
    "garbage": _garbage,
    "other values": lambda p: np.savez_compressed(p, maps=np.zeros(12 * 4, np.float16)),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(MAP_DAMAGE))
def test_damaged_part_maps_are_recomputed_not_compacted_into_a_crash(tmp_path, caplog, damage):
    """Rows count as done only if their map reads back: else compaction failed on every
    re-run and the instances were never recomputed."""
    dataset = _dataset(tmp_path)
    shard_dir = _partial_shard(tmp_path, dataset)
    maps = shard_dir / "part-00000.npz"
    lost = set(pq.read_table(shard_dir / "part-00000.parquet").column("key").to_pylist())
    MAP_DAMAGE[damage](maps)
    engine = Engine()
    with caplog.at_level(logging.WARNING, logger="bbam"):
        summary = run_shard(dataset, 0, 1, shard_dir, engine, "h", chunk_size=4)
    assert str(maps) in caplog.text
    assert summary["recomputed_unreadable"] == 4 and summary["unreadable_files"] == [str(maps)]
    assert lost <= set(engine.seen) and summary["skipped_done"] == 4 and summary["ok"] == 12
    assert len(_maps(shard_dir)) == 12 and not maps.exists()


def test_damaged_compacted_maps_are_recomputed(tmp_path, caplog):
    """Before: the resume counted every row as done and left maps the next stage could
    not read."""
    dataset = _dataset(tmp_path, images=3)
    shard_dir = tmp_path / "shard"
    run_shard(dataset, 0, 1, shard_dir, Engine(), "h")
    (maps,) = shard_dir.glob("maps-*.npz")
    _truncate(maps)
    with pytest.raises(ManifestError, match=f"{maps.name}: not an .npz archive"):
        _maps(shard_dir)
    engine = Engine()
    with caplog.at_level(logging.WARNING, logger="bbam"):
        summary = run_shard(dataset, 0, 1, shard_dir, engine, "h")
    assert f"{maps}: not an .npz archive" in caplog.text
    assert len(engine.seen) == 6 and summary["recomputed_unreadable"] == 6
    assert len(_maps(shard_dir)) == 6 and not maps.exists()
    again = Engine()
    assert run_shard(dataset, 0, 1, shard_dir, again, "h")["unreadable_files"] == []
    assert again.seen == []


def test_load_grid_names_the_file_and_what_is_wrong(tmp_path):
    write_part(tmp_path, [{"key": "a/0", "status": "ok"}], [np.ones((2, 2))])
    row = read_shard(tmp_path).to_pylist()[0]
    path = tmp_path / row["array_file"]
    _garbage(path)
    with pytest.raises(ManifestError, match=f"{path}: not an .npz archive"):
        load_grid(tmp_path, row)
    np.savez_compressed(path, maps=np.zeros(2, np.float16))
    with pytest.raises(ManifestError, match="map of a/0 lies outside the file"):
        load_grid(tmp_path, row)
    np.savez_compressed(path, other=np.zeros(4, np.float16))
    with pytest.raises(ManifestError, match=f"{path}: unreadable map file"):
        load_grid(tmp_path, row)


def test_repairing_compaction_records_a_lost_map_as_failed(tmp_path, caplog):
    """A row the run did not re-verify (no longer planned) with a bad map: the compacted
    manifest keeps it, as failed with the reason, never as "ok" without a map."""
    write_part(tmp_path, [{"key": "gone/0", "status": "ok"}], [np.ones((2, 2))])
    write_part(tmp_path, [{"key": "kept/0", "status": "ok"}], [np.full((1, 3), 0.5)])
    _garbage(tmp_path / "part-00000.npz")
    with pytest.raises(ManifestError, match="part-00000.npz"):
        compact_shard(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bbam.manifest"):
        compact_shard(tmp_path, repair=True)
    assert "part-00000.npz" in caplog.text
    rows = {r["key"]: r for r in read_shard(tmp_path).to_pylist()}
    assert rows["gone/0"]["status"] == "failed" and "part-00000.npz" in rows["gone/0"]["error"]
    assert rows["gone/0"]["length"] == 0
    np.testing.assert_array_equal(load_grid(tmp_path, rows["kept/0"]), np.full((1, 3), 0.5))


def test_extra_columns_and_old_files_still_read(tmp_path):
    """Not everything unusual is damage: an extra column, or one added since (read as
    null), leaves the rows usable."""
    write_part(tmp_path, [{"key": "a/0", "status": "ok"}], [np.ones((2, 2))])
    part = tmp_path / "part-00000.parquet"
    table = pq.read_table(part).drop_columns(["run_id"]).append_column("extra", pa.array([1]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    part.write_bytes(buf.getvalue())
    (row,) = read_shard(tmp_path).to_pylist()
    assert row["key"] == "a/0" and row["run_id"] is None
    np.testing.assert_array_equal(load_grid(tmp_path, row), np.ones((2, 2), np.float16))
