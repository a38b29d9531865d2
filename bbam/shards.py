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
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bbam import __version__
from bbam.data.images import load_rgb
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.manifest import (
    REQUIRED,
    compact_shard,
    empty_row,
    scan_shard,
    unreadable_maps,
    write_part,
)

DONE = ("ok", "no_positive", "skipped")

logger = logging.getLogger(__name__)


def shard_of(image_id: str, num_shards: int) -> int:
    """Deterministic shard of an image: sha1 of its id modulo the shard count."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def instance_key(image_id: str, instance_id: int) -> str:
    return f"{image_id}/{instance_id}"


@dataclass
class WorkItem:
    record: ImageRecord
    instance: Instance
    attempt: int

    @property
    def key(self) -> str:
        return instance_key(self.record.image_id, self.instance.instance_id)


CROWD_SKIP = "iscrowd=1: a crowd region, not one object; not attributed"


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
) -> tuple[list[WorkItem], dict[str, int], list[str]]:
    """What still has to run, counts of why the rest is skipped, and the unreadable files.

    A done row whose map cannot be read back is run again (counted as ``unreadable``),
    as are the rows of a manifest file that cannot be read (counted as ``new``).
    """
    table, problems = scan_shard(shard_dir) if shard_dir.exists() else (None, [])
    for problem in problems:
        logger.warning("%s; its instances count as not done and are recomputed", problem)
    previous = {}
    if table is not None and table.num_rows:
        previous = {row["key"]: row for row in table.select(list(REQUIRED)).to_pylist()}

    def current(row: dict | None) -> bool:
        return (
            row is not None
            and row["params_hash"] == params_hash
            and row["code_version"] == __version__
        )

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
        params_hash=params_hash,
        code_version=__version__,
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
) -> dict:
    """Attribute every pending instance of ``shard``; returns counts for the summary.

    A chunk that raises is recorded as failed (with the error text) for each of
    its instances and the shard goes on. An image that cannot be read fails only
    its own instances. Crowd regions get a ``skipped`` row with the reason.
    ``should_stop`` is asked before each chunk (a SIGTERM from a scheduler): when
    it says so, the shard stops with its finished chunks on disk, uncompacted, and
    the summary says ``interrupted``. Files that could not be
    read back are listed in the summary (``unreadable_files``); what they held is
    recomputed (``recomputed_unreadable`` counts finished rows whose map was lost).
    """
    planned = plan_shard(dataset, shard, num_shards)
    work, counts, unreadable = pending_work(planned, shard_dir, params_hash, max_attempts)
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
            if item.instance.iscrowd:
                row = _base_row(item, shard, dataset.classes, params_hash, run_id)
                row.update(status="skipped", error=CROWD_SKIP)
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
        write_part(shard_dir, rows, grids)
        ran += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if interrupted or not shard_dir.exists():
        table, _ = scan_shard(shard_dir)  # compaction can wait for the run that finishes
    else:
        # Every planned instance now has a readable row: what is unreadable can go.
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
