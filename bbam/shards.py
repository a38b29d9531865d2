"""Run attribution over one shard of a dataset, resumably.

Instances are assigned to shards by a hash of their image id, so the
assignment never depends on the order of the dataset or on the shard count of
an earlier run of a different dataset, and all instances of one image land in
the same shard (the image is read and resized once). The shard's Parquet
manifest (see ``bbam.manifest``) says what is finished: a re-run skips
instances whose row matches the params hash and code version, retries failed
ones up to ``max_attempts``, and appends new rows in small parts so a kill
costs at most one chunk. A finished row counts as done only if it can be read back:
rows of an unreadable manifest file, and rows whose map file is unreadable or fails
its sha256, are recomputed with a warning naming the file (a disk fault or a foreign
file must not stop a dataset-scale run, nor leave broken maps behind a "done").
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bbam.atomic import atomic_write_json
from bbam.data.images import load_rgb
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.manifest import (
    REQUIRED,
    compact_shard,
    current_stamp,
    empty_row,
    is_current,
    load_grid,
    scan_shard,
    shard_folder,
    shard_folders,
    unreadable_maps,
    write_part,
)
from bbam.shard_lock import ShardLock

DONE = ("ok", "no_positive", "skipped")

logger = logging.getLogger(__name__)


def shard_of(image_id: str, num_shards: int) -> int:
    """Deterministic shard of an image: sha1 of its id modulo the shard count."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def instance_key(image_id: str, instance_id: int) -> str:
    return f"{image_id}/{instance_id}"


def image_of(key: str) -> str:
    """The image id of an instance key (image ids may themselves contain '/')."""
    return key.rsplit("/", 1)[0]


class ShardLayoutError(ValueError):
    """A shard folder holds rows that belong to another shard under this ``num_shards``."""


@dataclass
class WorkItem:
    record: ImageRecord
    instance: Instance
    attempt: int

    @property
    def key(self) -> str:
        return instance_key(self.record.image_id, self.instance.instance_id)


CROWD_SKIP = "iscrowd=1: a crowd region, not one object; not attributed"
# An image prepare_data found unreadable, and accepted under data.max_unreadable_<split>:
# its instances are skipped, not failed, until the file is replaced.
UNREADABLE_SKIP = "found unreadable by prepare_data; not attributed"


def plan_shard(dataset: Dataset, shard: int, num_shards: int) -> list[tuple[ImageRecord, Instance]]:
    """All (image, instance) pairs of a shard in dataset order. Crowd regions are planned
    too: run_shard records them as ``skipped`` so the manifest accounts for every instance."""
    return [
        (record, instance)
        for record in dataset.records
        if shard_of(record.image_id, num_shards) == shard
        for instance in record.instances
    ]


def pending_work(
    planned: list[tuple[ImageRecord, Instance]],
    shard_dir: Path,
    params_hash: str,
    max_attempts: int,
    layout: tuple[int, int] | None = None,
    skip_images: Mapping[str, str] | None = None,
) -> tuple[list[WorkItem], dict[str, int], list[str]]:
    """What still has to run, counts of why the rest is skipped, and the unreadable files.

    A done row whose map cannot be read back is run again (counted as ``unreadable``),
    as are the rows of a manifest file that cannot be read (counted as ``new``).
    ``layout`` (shard, num_shards): raise ShardLayoutError if the folder holds rows of
    another shard count, rather than recompute them here while their rows stay there.
    An instance skipped as unreadable whose image is no longer in ``skip_images`` (the file
    was replaced) runs again.
    """
    table, problems = scan_shard(shard_dir) if shard_dir.exists() else (None, [])
    for problem in problems:
        logger.warning("%s; its instances count as not done and are recomputed", problem)
    previous = {}
    if table is not None and table.num_rows:
        columns = [*REQUIRED, "error"]
        previous = {row["key"]: row for row in table.select(columns).to_pylist()}
    if layout is not None:
        shard, num_shards = layout
        foreign = [k for k in previous if shard_of(image_of(k), num_shards) != shard]
        if foreign:
            raise ShardLayoutError(
                f"{shard_dir}: {len(foreign)} rows (e.g. {foreign[0]}) belong to other shards "
                f"with num_shards {num_shards}: the folder was written with another num_shards; "
                "re-shard first (python -m flows.attribute does it at its start, "
                "or bbam.shards.reshard)"
            )

    skip_images = skip_images or {}

    def current(row: dict | None) -> bool:
        if row is not None and UNREADABLE_SKIP in (row["error"] or ""):
            if image_of(row["key"]) not in skip_images:
                return False  # readable now: attribute it
        return is_current(row, params_hash)

    rows = [previous.get(instance_key(r.image_id, i.instance_id)) for r, i in planned]
    done = [row for row in rows if current(row) and row["status"] in DONE]
    bad_maps = unreadable_maps(shard_dir, done)
    by_file: dict[Path, list[str]] = {}
    for key, problem in bad_maps.items():
        by_file.setdefault(problem.path, []).append(key)
    for keys in by_file.values():
        logger.warning(
            "%s; %d finished instances with a map in it are recomputed",
            bad_maps[keys[0]],
            len(keys),
        )
    work, counts = [], {"done": 0, "retry": 0, "new": 0, "gave_up": 0, "unreadable": 0}
    for (record, instance), row in zip(planned, rows, strict=True):
        if current(row) and row["key"] in bad_maps:
            counts["unreadable"] += 1
            work.append(WorkItem(record, instance, 1))
        elif current(row) and row["status"] in DONE:
            counts["done"] += 1
        elif current(row) and row["status"] == "failed":
            if row["attempt"] >= max_attempts:
                counts["gave_up"] += 1
            else:
                counts["retry"] += 1
                work.append(WorkItem(record, instance, row["attempt"] + 1))
        else:
            counts["new"] += 1
            work.append(WorkItem(record, instance, 1))
    # Same-size images next to each other: the engine batches instances whose resized
    # images have one size, so this keeps chunks full on datasets of mixed sizes.
    work.sort(key=lambda w: (w.record.height, w.record.width))
    unreadable = sorted({str(p.path) for p in problems} | {str(p) for p in by_file})
    return work, counts, unreadable


def _chunks(work: list[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    """Chunks of about ``size`` instances that never split an image."""
    chunk: list[WorkItem] = []
    for i, item in enumerate(work):
        chunk.append(item)
        next_image = work[i + 1].record.image_id if i + 1 < len(work) else None
        if len(chunk) >= size and next_image != item.record.image_id:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _base_row(
    item: WorkItem, shard: int, classes: list[str], params_hash: str, run_id: str
) -> dict:
    row = empty_row()
    row.update(
        run_id=run_id,
        key=item.key,
        image_id=item.record.image_id,
        instance_id=int(item.instance.instance_id),
        class_id=int(item.instance.label),
        class_name=classes[item.instance.label - 1],
        box=[float(v) for v in item.instance.box],
        shard=shard,
        attempt=item.attempt,
        **current_stamp(params_hash),  # what is_current checks on resume and merge
        image_h=item.record.height,
        image_w=item.record.width,
    )
    return row


# attribute_chunk(images: list[HxWx3 uint8], items: list[WorkItem]) -> list[(row update, grid|None)]
ChunkFn = Callable[[list[np.ndarray], list[WorkItem]], list[tuple[dict, np.ndarray | None]]]


def run_shard(
    dataset: Dataset,
    shard: int,
    num_shards: int,
    shard_dir: Path,
    attribute_chunk: ChunkFn,
    params_hash: str,
    chunk_size: int = 8,
    max_attempts: int = 2,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_write: Callable[[], None] | None = None,
    skip_images: Mapping[str, str] | None = None,
) -> dict:
    """Attribute every pending instance of ``shard``; returns counts for the summary.

    A chunk that raises is recorded as failed (with the error text) for each of
    its instances and the shard goes on. An image that cannot be read fails only
    its own instances. Crowd regions get a ``skipped`` row with the reason, as do the
    instances of ``skip_images`` (image_id -> why: images prepare_data found unreadable).
    ``should_stop`` is asked before each chunk (a SIGTERM from a scheduler): when
    it says so, the shard stops with its finished chunks on disk, uncompacted, and
    the summary says ``interrupted``. ``before_write`` is called before every write into
    the folder (each part, the compaction): a shard lock's ``check`` there raises once the
    lock was taken over, so a run presumed dead writes nothing more. Files that could not be
    read back are listed in the summary (``unreadable_files``); what they held is
    recomputed (``recomputed_unreadable`` counts finished rows whose map was lost).
    """
    planned = plan_shard(dataset, shard, num_shards)
    skip_images = skip_images or {}
    work, counts, unreadable = pending_work(
        planned, shard_dir, params_hash, max_attempts, (shard, num_shards), skip_images
    )
    started = time.perf_counter()
    run_id = uuid.uuid4().hex
    interrupted, ran = False, 0
    for chunk in _chunks(work, chunk_size):
        if should_stop is not None and should_stop():
            interrupted = True
            break
        rows, grids = [], []
        readable: list[WorkItem] = []
        images: list[np.ndarray] = []
        cache: dict[str, np.ndarray] = {}
        for item in chunk:
            skip = item.record.image_id in skip_images
            if item.instance.iscrowd or skip:
                row = _base_row(item, shard, dataset.classes, params_hash, run_id)
                why = (
                    f"{skip_images[item.record.image_id]}; {UNREADABLE_SKIP}"
                    if skip
                    else CROWD_SKIP
                )
                row.update(status="skipped", error=why)
                rows.append(row)
                grids.append(None)
                continue
            try:
                if item.record.image_id not in cache:
                    cache[item.record.image_id] = load_rgb(item.record.path)
                images.append(cache[item.record.image_id])
                readable.append(item)
            except Exception as exc:  # recorded per instance, never fatal for the shard
                row = _base_row(item, shard, dataset.classes, params_hash, run_id)
                row.update(status="failed", error=str(exc))
                rows.append(row)
                grids.append(None)
        if readable:
            try:
                outputs = attribute_chunk(images, readable)
            except Exception:
                error = traceback.format_exc(limit=3)
                outputs = [({"status": "failed", "error": error}, None) for _ in readable]
            for item, (update, grid) in zip(readable, outputs, strict=True):
                row = _base_row(item, shard, dataset.classes, params_hash, run_id)
                row.update(update)
                rows.append(row)
                grids.append(grid)
        if before_write is not None:
            before_write()
        write_part(shard_dir, rows, grids)
        ran += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if interrupted or not shard_dir.exists():
        table, _ = scan_shard(shard_dir)  # compaction can wait for the run that finishes
    else:
        # Every planned instance now has a readable row: what is unreadable can go.
        if before_write is not None:
            before_write()
        table = compact_shard(shard_dir, repair=True)
    keys = {instance_key(r.image_id, i.instance_id) for r, i in planned}
    statuses = (
        [
            s
            for k, s in zip(
                table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True
            )
            if k in keys
        ]
        if table.num_rows
        else []
    )
    return {
        "shard": shard,
        "planned": len(planned),
        "ran": ran,
        "interrupted": interrupted,
        "skipped_done": counts["done"],
        "retried": counts["retry"],
        "recomputed_unreadable": counts["unreadable"],
        "unreadable_files": unreadable,
        "seconds": time.perf_counter() - started,
        "ok": statuses.count("ok"),
        "no_positive": statuses.count("no_positive"),
        "failed": statuses.count("failed"),
        "skipped": statuses.count("skipped"),
    }


LAYOUT_NAME = "layout.json"  # written last into a re-shard's new folder: it is complete


def misplaced_rows(root: str | Path, num_shards: int) -> int:
    """Rows under ``root`` in a folder other than their image's shard under ``num_shards``:
    non-zero when the folders were written with another ``num_shards``."""
    count = 0
    for index, folder in shard_folders(root).items():
        table, _ = scan_shard(folder)  # unreadable files are the resume's to report
        keys = table.column("key").to_pylist()
        count += sum(shard_of(image_of(k), num_shards) != index for k in keys)
    return count


def recover_reshard(root: str | Path) -> None:
    """Finish or undo a re-shard that was killed: a complete new layout (``LAYOUT_NAME``
    written) whose swap did not happen goes in place, an incomplete one goes, and the old
    layout goes once the new one is in place."""
    root = Path(root)
    for new in sorted(root.parent.glob(f".{root.name}.new-*")):
        if (new / LAYOUT_NAME).is_file() and not root.exists():
            os.rename(new, root)  # killed between the two renames of the swap
            logger.warning("re-shard: %s completed from %s", root, new.name)
        else:
            shutil.rmtree(new)  # killed before the swap: the old layout is still whole
    for old in sorted(root.parent.glob(f".{root.name}.old-*")):
        if root.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, root)


def reshard(
    root: str | Path,
    num_shards: int,
    stale_s: float = 120.0,
    heartbeat_s: float = 10.0,
    owner: str = "re-shard",
) -> dict[str, int]:
    """Move finished rows and their maps into the folders of ``num_shards``, computing nothing.

    Nothing happens when every row already sits in its image's shard. Otherwise, holding
    the lock of ``root.parent`` (one re-shard at a time) and every shard's lock (ShardBusy
    if a live run holds one), the new layout is built next to
    ``root`` (``.<name>.new-*``: parts written, compacted, then ``LAYOUT_NAME``) and swapped
    in by two renames; ``recover_reshard`` completes or drops a layout a kill left behind,
    so there is always one complete layout. Rows whose map cannot be read back are left out
    with a warning (the next run recomputes them). Returns rows moved per "old->new" folder.
    """
    root = Path(root)
    # One re-shard (or recovery) at a time: another run's half-built layout is not a leftover.
    with ShardLock(root.parent, owner, stale_s, heartbeat_s):
        recover_reshard(root)
        if not misplaced_rows(root, num_shards):
            return {}
        return _rebuild_layout(root, num_shards, stale_s, heartbeat_s, owner)


def _rebuild_layout(
    root: Path, num_shards: int, stale_s: float, heartbeat_s: float, owner: str
) -> dict[str, int]:
    """``reshard``'s build and swap, under its lock on ``root.parent``."""
    token = uuid.uuid4().hex[:8]
    new_root = root.with_name(f".{root.name}.new-{token}")
    old_root = root.with_name(f".{root.name}.old-{token}")
    moved: dict[str, int] = {}
    with ExitStack() as locks:
        for index in sorted(set(shard_folders(root)) | set(range(num_shards))):
            lock = ShardLock(shard_folder(root, index), owner, stale_s, heartbeat_s)
            locks.enter_context(lock)  # also stops a run starting in a folder about to go
        tables = {}
        for index, folder in sorted(shard_folders(root).items()):
            tables[index], problems = scan_shard(folder)
            for problem in problems:
                logger.warning("re-shard: %s; its rows are left out and recomputed", problem)
        # One row per key: a key in two folders (an earlier run with another num_shards and
        # no re-shard) keeps the row of the folder it belongs to, else the first one.
        source: dict[str, int] = {}
        for index, table in tables.items():
            for key in table.column("key").to_pylist():
                if key not in source or shard_of(image_of(key), num_shards) == index:
                    source[key] = index
        for index, table in tables.items():
            folder = shard_folder(root, index)
            rows = [row for row in table.to_pylist() if source[row["key"]] == index]
            if len(rows) < table.num_rows:
                logger.warning(
                    "re-shard: %s: %d rows left out, their keys have a row in the folder "
                    "they belong to",
                    folder,
                    table.num_rows - len(rows),
                )
            bad = unreadable_maps(folder, rows)
            for key, problem in bad.items():
                logger.warning("re-shard: %s; %s is left out and recomputed", problem, key)
            buckets: dict[int, tuple[list[dict], list[np.ndarray | None]]] = {}
            cache: dict = {}
            for row in rows:
                if row["key"] in bad:
                    continue
                grid = load_grid(folder, row, cache) if row["length"] else None
                if grid is None:
                    row.update(array_file="", offset=-1, length=0, sha256="")
                target = shard_of(image_of(row["key"]), num_shards)
                row["shard"] = target
                bucket = buckets.setdefault(target, ([], []))
                bucket[0].append(row)
                bucket[1].append(grid)
            for target, (part_rows, grids) in sorted(buckets.items()):
                write_part(shard_folder(new_root, target), part_rows, grids)
                if target != index:
                    moved[f"{folder.name}->{shard_folder(root, target).name}"] = len(part_rows)
        for folder in shard_folders(new_root).values():
            compact_shard(folder)
        atomic_write_json(new_root / LAYOUT_NAME, {"num_shards": num_shards, "moved": moved})
        os.rename(root, old_root)
        os.rename(new_root, root)
    shutil.rmtree(old_root)
    return moved


def detector_chunk_fn(model: torch.nn.Module, config, device: torch.device) -> ChunkFn:
    """The production ``attribute_chunk``: resize with the detector's own transform,
    then run the BBAM engine on every instance of the chunk together."""
    from bbam.attribution import AttributionItem, attribute_instances
    from bbam.detector import make_heads_fn, prepare_images

    heads = make_heads_fn(model)

    def run(
        images: list[np.ndarray], items: list[WorkItem]
    ) -> list[tuple[dict, np.ndarray | None]]:
        firsts: dict[str, np.ndarray] = {}
        for image, item in zip(images, items, strict=True):
            firsts.setdefault(item.record.image_id, image)
        unique = {image_id: j for j, image_id in enumerate(firsts)}
        batch, scales, sizes = prepare_images(model, list(firsts.values()))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            by_size.setdefault(tuple(sizes[unique[item.record.image_id]]), []).append(i)
        outputs: list = [None] * len(items)
        for (h, w), indices in by_size.items():
            attribution_items = []
            for i in indices:
                j = unique[items[i].record.image_id]
                box = torch.as_tensor(items[i].instance.box, dtype=torch.float32) * scales[j]
                attribution_items.append(
                    AttributionItem(
                        key=items[i].key,
                        image=batch[j, :, :h, :w],
                        box=box,
                        label=int(items[i].instance.label),
                    )
                )
            results = attribute_instances(heads, attribution_items, config, device)
            for i, result in zip(indices, results, strict=True):
                stats = result.stats
                update = {
                    "status": result.status,
                    "positives": stats.get("positives"),
                    "threshold": stats.get("threshold_used"),
                    "iterations": stats.get("iterations"),
                    "loss_total": stats.get("loss_total"),
                    "loss_box": stats.get("loss_box"),
                    "loss_cls": stats.get("loss_cls"),
                    "loss_l1": stats.get("loss_l1"),
                    "loss_tv": stats.get("loss_tv"),
                    "seconds": stats.get("seconds"),
                    "device": str(stats.get("device", device)),
                    "stride": float(result.stride),
                    "resized_h": int(result.resized_hw[0]),
                    "resized_w": int(result.resized_hw[1]),
                }
                outputs[i] = (update, np.asarray(result.grid, dtype=np.float16))
        return outputs

    return run
