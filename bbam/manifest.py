"""Per-instance Parquet manifests: the source of truth for what a shard has finished.

A shard directory holds append-only *parts*. Each part is one compressed array
file (``part-NNNNN.npz``, all of the part's float16 grids concatenated into one
flat array) and one Parquet file (``part-NNNNN.parquet``) with a row per
instance. The array file is written first and the Parquet file last, both
atomically, so a row exists only if its map is on disk: a killed job leaves at
worst an orphan array file, never a row without data.

When a shard finishes, its parts are compacted into one ``maps-GGGGG.npz`` +
``manifest.parquet`` (latest attempt per instance wins, so no key appears twice).

A file that cannot be read back (a disk fault, a bad copy, a foreign file dropped in
place) raises ``ManifestError`` naming it and what is wrong. ``scan_shard`` and
``unreadable_maps`` report such files instead of raising, so a resume can recompute
what they held rather than stop a dataset-scale job.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bbam import __version__
from bbam.atomic import atomic_write

STATUSES = ("ok", "failed", "no_positive", "skipped")
_SHARD_FOLDER = re.compile(r"shard-(\d{4,})$")


def shard_folder(root: str | Path, shard: int) -> Path:
    """``<root>/shard-NNNN``: one shard's folder (manifest, maps, lock)."""
    return Path(root) / f"shard-{shard:04d}"


def shard_folders(root: str | Path) -> dict[int, Path]:
    """The shard folders under ``root`` by index (none when ``root`` does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found = ((_SHARD_FOLDER.match(p.name), p) for p in root.iterdir() if p.is_dir())
    return {int(m.group(1)): p for m, p in found if m}


def current_stamp(params_hash: str) -> dict[str, str]:
    """The columns that make a row current: written with these settings by this code."""
    return {"params_hash": params_hash, "code_version": __version__}


def is_current(row: dict | None, params_hash: str) -> bool:
    """A row written with these settings and this code: the only rows a run reuses, and the
    only rows the merged manifest keeps (``merge_manifests``)."""
    return row is not None and all(row[k] == v for k, v in current_stamp(params_hash).items())


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

# A file without these columns is not a shard manifest. Other columns may be missing
# (files written before the column was added) and read as null.
REQUIRED = (
    "key",
    "status",
    "attempt",
    "params_hash",
    "code_version",
    "array_file",
    "offset",
    "length",
    "grid_h",
    "grid_w",
    "sha256",
)

_PART = re.compile(r"part-(\d{5})\.parquet$")

logger = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest or map file that cannot be read back: names the file and what is wrong."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{path}: {what}")
        self.path = Path(path)
        self.what = what


def _why(exc: BaseException) -> str:
    """One short line from a library's exception (pyarrow and numpy ones run long)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


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


def read_manifest_file(path: Path) -> pa.Table:
    """One Parquet manifest file in ``SCHEMA``; ManifestError when it is not one.

    Checked before use because ``read_table(schema=SCHEMA)`` alone reads a foreign
    Parquet file as rows of nulls, which would pass for instances.
    """
    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise ManifestError(path, f"not a readable Parquet file ({_why(exc)})") from exc
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise ManifestError(path, f"not a shard manifest (no column {', '.join(missing)})")
    try:
        table = pq.read_table(path, schema=SCHEMA)
    except Exception as exc:
        raise ManifestError(path, f"cannot be read as a shard manifest ({_why(exc)})") from exc
    status = table.column("status")
    valid = pc.all(pc.is_in(status, value_set=pa.array(STATUSES))).as_py()
    if table.column("key").null_count or status.null_count or valid is False:
        raise ManifestError(path, f"rows without a key or with a status not in {STATUSES}")
    return table


def _manifest_files(shard_dir: Path) -> list[Path]:
    """The compacted manifest first, then the parts in write order."""
    files = sorted(shard_dir.glob("part-*.parquet"))
    if (shard_dir / "manifest.parquet").exists():
        files.insert(0, shard_dir / "manifest.parquet")
    return files


def _read_files(files: list[Path], problems: list[ManifestError] | None) -> pa.Table:
    tables = []
    for path in files:
        try:
            tables.append(read_manifest_file(path))
        except ManifestError as exc:
            if problems is None:
                raise
            problems.append(exc)
    if not tables:
        return SCHEMA.empty_table()
    return latest_per_key(pa.concat_tables(tables))


def read_shard(shard_dir: Path) -> pa.Table:
    """All rows of a shard (compacted manifest plus any parts), latest attempt per key.

    A manifest file that cannot be read raises ManifestError naming it.
    """
    return _read_files(_manifest_files(shard_dir), None)


def scan_shard(shard_dir: Path) -> tuple[pa.Table, list[ManifestError]]:
    """Like ``read_shard``, but an unreadable manifest file is left out and reported.

    For a resume: the rows of such a file count as not done and get recomputed, where
    raising would stop the whole shard on one bad file.
    """
    problems: list[ManifestError] = []
    return _read_files(_manifest_files(shard_dir), problems), problems


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


def _load_flat(path: Path) -> np.ndarray:
    """The flat float16 array of one map file; ManifestError when it is not one."""
    if not path.is_file():
        raise ManifestError(path, "map file missing")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and say so
        raise ManifestError(path, "not an .npz archive (truncated or a foreign file)")
    try:
        with np.load(path) as data:
            flat = data["maps"]
    except Exception as exc:
        raise ManifestError(path, f"unreadable map file ({_why(exc)})") from exc
    if flat.dtype != np.float16 or flat.ndim != 1:
        raise ManifestError(path, f"not a map file (maps is {flat.dtype} {flat.shape})")
    return flat


def _grid_of(flat: np.ndarray, row: dict, path: Path) -> np.ndarray:
    """The row's grid out of its file's flat array, checked against its sha256."""
    start, length = int(row["offset"]), int(row["length"])
    shape = (int(row["grid_h"]), int(row["grid_w"]))
    if start < 0 or start + length > flat.size or shape[0] * shape[1] != length:
        raise ManifestError(path, f"map of {row['key']} lies outside the file ({flat.size} values)")
    grid = flat[start : start + length].reshape(shape)
    if grid_sha256(grid) != row["sha256"]:
        raise ManifestError(path, f"map of {row['key']} does not match its sha256")
    return grid


def load_grid(shard_dir: Path, row: dict, cache: dict | None = None) -> np.ndarray:
    """Read one instance's grid and check its sha256 (ManifestError naming the file)."""
    path = shard_dir / row["array_file"]
    if cache is not None and path in cache:
        flat = cache[path]
    else:
        flat = _load_flat(path)
        if cache is not None:
            cache[path] = flat
    return _grid_of(flat, row, path)


def unreadable_maps(shard_dir: Path, rows: list[dict]) -> dict[str, ManifestError]:
    """Keys of ``rows`` whose map cannot be read back or fails its sha256, with why.

    One map file in memory at a time. Rows without a map (``length`` 0) are not checked.
    """
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        if row["length"]:
            by_file.setdefault(row["array_file"], []).append(row)
    bad: dict[str, ManifestError] = {}
    for name, file_rows in by_file.items():
        path = shard_dir / name
        try:
            flat = _load_flat(path)
        except ManifestError as exc:
            bad.update((row["key"], exc) for row in file_rows)
            continue
        for row in file_rows:
            try:
                _grid_of(flat, row, path)
            except ManifestError as exc:
                bad[row["key"]] = exc
    return bad


def compact_shard(shard_dir: Path, repair: bool = False) -> pa.Table:
    """Fold all parts into one ``maps-GGGGG.npz`` + ``manifest.parquet``; delete the parts.

    Crash-safe: the new array file gets a fresh name, the manifest (the single
    commit point) is replaced atomically, and only then are parts and older array
    files removed. Reading tolerates parts that are also in the manifest.

    An unreadable manifest or map file raises ManifestError, unless ``repair``: then,
    each with a warning, an unreadable manifest file is left out (and removed with the
    parts) and a row whose map cannot be read is kept as ``failed`` with the reason, so
    a later run retries it. For ``run_shard``, which has just recomputed every planned
    instance that was not readable: nothing readable is lost, no bad map stays "ok".
    """
    if repair:
        table, problems = scan_shard(shard_dir)
        for problem in problems:
            logger.warning("%s; left out of the compacted manifest", problem)
    else:
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
        try:
            grid = load_grid(shard_dir, row, cache)
        except ManifestError as exc:
            if not repair:
                raise
            logger.warning("%s; recorded as failed in the compacted manifest", exc)
            lost = {"array_file": "", "offset": -1, "length": 0, "sha256": ""}
            row.update(status="failed", error=str(exc), **lost)
            continue
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


def merge_manifests(
    shard_dirs: Iterable[Path],
    keys: Collection[str] | None = None,
    params_hash: str | None = None,
) -> pa.Table:
    """One table over all shards; raises naming the key and both folders if a key is in two.

    When given, only rows of ``keys`` and, with ``params_hash``, only current rows
    (``is_current``) are kept: a shard folder also holds rows of earlier settings or another
    split (kept there for a later run to reuse), and those must never pass for results of
    this one.
    """
    wanted = pa.array(sorted(keys), pa.string()) if keys is not None else None
    tables, left_out = [], 0
    for shard_dir in shard_dirs:
        try:
            table = read_shard(shard_dir)
        except ManifestError as exc:
            hint = "; re-running its shard recomputes the instances it held"
            raise ManifestError(exc.path, exc.what + hint) from exc
        mask = pa.repeat(pa.scalar(True), table.num_rows)
        if wanted is not None:
            mask = pc.and_(mask, pc.is_in(table.column("key"), value_set=wanted))
        for column, value in current_stamp(params_hash).items() if params_hash else ():
            mask = pc.and_(mask, pc.fill_null(pc.equal(table.column(column), value), False))
        kept = table.filter(mask)
        left_out += table.num_rows - kept.num_rows
        where = pa.repeat(pa.scalar(str(shard_dir), pa.string()), kept.num_rows)
        tables.append(kept.append_column("shard_dir", where))
    if left_out:
        logger.info("merge: left out %d rows of other settings or unplanned instances", left_out)
    if not tables:
        return SCHEMA.empty_table()
    merged = pa.concat_tables(tables)
    if pc.count_distinct(merged.column("key")).as_py() != merged.num_rows:
        counts = merged.group_by("key", use_threads=False).aggregate([("key", "count")])
        key = counts.filter(pc.greater(counts.column("key_count"), 1)).column("key")[0].as_py()
        where = merged.filter(pc.equal(merged.column("key"), key)).column("shard_dir")
        raise ValueError(
            f"instance key {key} appears in more than one shard: {' and '.join(where.to_pylist())};"
            " the folders were laid out for different num_shards (python -m flows.attribute "
            "re-shards them at its start) or one was copied in by hand: remove the stale one"
        )
    return merged


def status_counts(table: pa.Table) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    if table.num_rows:
        for item in pc.value_counts(table.column("status")).to_pylist():
            counts[item["values"]] = item["counts"]
    return counts


def status_counts_by_shard(table: pa.Table, num_shards: int) -> dict[int, dict[str, int]]:
    """``status_counts`` of each shard 0..num_shards-1 of a merged manifest (a shard with no
    rows counts zeros), so a shard that failed or found no positives stands out."""
    counts = {s: {status: 0 for status in STATUSES} for s in range(num_shards)}
    for shard, status in zip(
        table.column("shard").to_pylist(), table.column("status").to_pylist(), strict=True
    ):
        counts.setdefault(shard, {status: 0 for status in STATUSES})[status] += 1
    return counts
