"""Per-instance Parquet manifests: the source of truth for what a shard has finished.

A shard directory holds append-only *parts*. Each part is one compressed array
file (``part-NNNNN.npz``, all of the part's float16 grids concatenated into one
flat array) and one Parquet file (``part-NNNNN.parquet``) with a row per
instance. The array file is written first and the Parquet file last, both
atomically, so a row exists only if its map is on disk: a killed job leaves at
worst an orphan array file, never a row without data.

When a shard finishes, its parts are compacted into one ``maps-GGGGG.npz`` +
``manifest.parquet`` (latest attempt per instance wins, so no key appears twice).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bbam.atomic import atomic_write

STATUSES = ("ok", "failed", "no_positive", "skipped")

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # "<image_id>/<instance_id>", unique per dataset
        ("image_id", pa.string()),
        ("instance_id", pa.int64()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("box", pa.list_(pa.float32(), 4)),  # xyxy, original image pixels
        ("shard", pa.int32()),
        ("status", pa.string()),  # one of STATUSES
        ("error", pa.string()),
        ("attempt", pa.int32()),
        ("run_id", pa.string()),  # which process run wrote the row (resume audits)
        ("positives", pa.int32()),
        ("threshold", pa.float32()),
        ("iterations", pa.int32()),
        ("loss_total", pa.float32()),
        ("loss_box", pa.float32()),
        ("loss_cls", pa.float32()),
        ("loss_l1", pa.float32()),
        ("loss_tv", pa.float32()),
        ("seconds", pa.float32()),
        ("device", pa.string()),
        ("params_hash", pa.string()),
        ("code_version", pa.string()),
        ("stride", pa.float32()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("resized_h", pa.int32()),
        ("resized_w", pa.int32()),
        ("image_h", pa.int32()),
        ("image_w", pa.int32()),
        ("array_file", pa.string()),  # relative to the shard directory
        ("offset", pa.int64()),  # element offset of the grid in the flat array
        ("length", pa.int64()),
        ("sha256", pa.string()),  # of the grid's float16 bytes
    ]
)

_PART = re.compile(r"part-(\d{5})\.parquet$")


def grid_sha256(grid: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(grid, dtype=np.float16).tobytes()).hexdigest()


def empty_row() -> dict:
    """A row with every column present, for callers to fill."""
    row = {name: None for name in SCHEMA.names}
    row.update(error="", attempt=1, array_file="", offset=-1, length=0, sha256="")
    return row


def write_part(shard_dir: Path, rows: list[dict], grids: list[np.ndarray | None]) -> Path:
    """Append one part (array file, then manifest) holding ``rows``.

    ``grids[i]`` is the map of ``rows[i]`` or None (failed / skipped rows).
    """
    if len(rows) != len(grids):
        raise ValueError("rows and grids differ in length")
    shard_dir.mkdir(parents=True, exist_ok=True)
    index = _next_part_index(shard_dir)
    array_name = f"part-{index:05d}.npz"
    flat, offset, out_rows = [], 0, []
    for row, grid in zip(rows, grids, strict=True):
        row = {**empty_row(), **row}
        if grid is not None:
            grid16 = np.ascontiguousarray(grid, dtype=np.float16)
            row.update(
                array_file=array_name,
                offset=offset,
                length=grid16.size,
                grid_h=grid16.shape[0],
                grid_w=grid16.shape[1],
                sha256=grid_sha256(grid16),
            )
            flat.append(grid16.ravel())
            offset += grid16.size
        out_rows.append(row)
    data = np.concatenate(flat) if flat else np.zeros(0, np.float16)
    atomic_write(shard_dir / array_name, lambda f: np.savez_compressed(f, maps=data))
    table = pa.Table.from_pylist(out_rows, schema=SCHEMA)
    part = shard_dir / f"part-{index:05d}.parquet"
    atomic_write(part, lambda f: pq.write_table(table, f, compression="zstd"))
    return part


def _next_part_index(shard_dir: Path) -> int:
    found = [int(m.group(1)) for p in shard_dir.iterdir() if (m := _PART.match(p.name))]
    return max(found, default=-1) + 1


def read_shard(shard_dir: Path) -> pa.Table:
    """All rows of a shard (compacted manifest plus any parts), latest attempt per key."""
    files = sorted(shard_dir.glob("part-*.parquet"))
    if (shard_dir / "manifest.parquet").exists():
        files.insert(0, shard_dir / "manifest.parquet")
    if not files:
        return SCHEMA.empty_table()
    tables = [pq.read_table(f, schema=SCHEMA) for f in files]
    return latest_per_key(pa.concat_tables(tables))


def latest_per_key(table: pa.Table) -> pa.Table:
    """Keep one row per key: the last one written (rows are in write order)."""
    if table.num_rows == 0:
        return table
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() == table.num_rows:
        return table  # the common case: a compacted shard
    order = pa.table({"key": keys, "row": pa.array(np.arange(table.num_rows, dtype=np.int64))})
    last = order.group_by("key", use_threads=False).aggregate([("row", "max")])
    return table.take(np.sort(last.column("row_max").to_numpy()))


def load_grid(shard_dir: Path, row: dict, cache: dict | None = None) -> np.ndarray:
    """Read one instance's grid and check its sha256."""
    path = shard_dir / row["array_file"]
    if cache is not None and path in cache:
        flat = cache[path]
    else:
        with np.load(path) as data:
            flat = data["maps"]
        if cache is not None:
            cache[path] = flat
    start = int(row["offset"])
    grid = flat[start : start + int(row["length"])].reshape(int(row["grid_h"]), int(row["grid_w"]))
    if grid_sha256(grid) != row["sha256"]:
        raise ValueError(f"{path}: map of {row['key']} does not match its sha256")
    return grid


def compact_shard(shard_dir: Path) -> pa.Table:
    """Fold all parts into one ``maps-GGGGG.npz`` + ``manifest.parquet``; delete the parts.

    Crash-safe: the new array file gets a fresh name, the manifest (the single
    commit point) is replaced atomically, and only then are parts and older array
    files removed. Reading tolerates parts that are also in the manifest.
    """
    table = read_shard(shard_dir)
    parts = sorted(shard_dir.glob("part-*.parquet"))
    if not parts:
        return table
    cache: dict = {}
    rows = table.to_pylist()
    generation = len(list(shard_dir.glob("maps-*.npz")))
    while (shard_dir / f"maps-{generation:05d}.npz").exists():
        generation += 1
    maps_name = f"maps-{generation:05d}.npz"
    flat, offset = [], 0
    for row in rows:
        if not row["length"]:
            row.update(array_file="", offset=-1)
            continue
        grid = load_grid(shard_dir, row, cache)
        row.update(array_file=maps_name, offset=offset)
        flat.append(grid.ravel())
        offset += grid.size
    data = np.concatenate(flat) if flat else np.zeros(0, np.float16)
    atomic_write(shard_dir / maps_name, lambda f: np.savez_compressed(f, maps=data))
    compacted = pa.Table.from_pylist(rows, schema=SCHEMA)
    atomic_write(
        shard_dir / "manifest.parquet", lambda f: pq.write_table(compacted, f, compression="zstd")
    )
    for part in parts:
        part.unlink()
    for stale in [*shard_dir.glob("part-*.npz"), *shard_dir.glob("maps-*.npz")]:
        if stale.name != maps_name:
            stale.unlink()
    return compacted


def merge_manifests(shard_dirs: Iterable[Path]) -> pa.Table:
    """One table over all shards; raises if a key appears in two shards."""
    tables = []
    for shard_dir in shard_dirs:
        table = read_shard(shard_dir)
        where = pa.repeat(pa.scalar(str(shard_dir), pa.string()), table.num_rows)
        tables.append(table.append_column("shard_dir", where))
    if not tables:
        return SCHEMA.empty_table()
    merged = pa.concat_tables(tables)
    if pc.count_distinct(merged.column("key")).as_py() != merged.num_rows:
        raise ValueError("an instance key appears in more than one shard")
    return merged


def status_counts(table: pa.Table) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    if table.num_rows:
        for item in pc.value_counts(table.column("status")).to_pylist():
            counts[item["values"]] = item["counts"]
    return counts
