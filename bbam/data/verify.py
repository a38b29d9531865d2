"""Decode every image a split hands on, once, before anything trains on it.

Why: the readers only read image headers, so a truncated, garbage or missing file used to
surface hours later, in attribution or a training loader. The data stage decodes each image
fully (a header alone does not show truncation) in worker processes, records every
unreadable file with its reason, and fails when too many are unreadable; later stages drop
the ones it recorded (`drop_unreadable`). Results are cached by file size and mtime, so a
re-run decodes only new or changed files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bbam.data.images import load_rgb
from bbam.data.records import DataError, Dataset

CACHE = Path("data/image_check.json")  # relative to the project (the stages' working dir)
CACHE_VERSION = 1
REASON = "unreadable_image"  # the SkipReport reason of a dropped image
PARALLEL_FROM = 256  # fewer files to decode than this: in-process (spawning costs ~1 s)
SHOWN = 5  # files named in the error of a split over its limit
# Fraction of a split's images that may be unreadable before the data stage fails
# (data.max_unreadable_<split>): none for val (scores must cover the whole split), a few
# for train (a handful of bad files in 100k should not stop a run; they are skipped).
DEFAULT_LIMITS = {"train": 0.01, "val": 0.0}


def check_image(path: str) -> str | None:
    """None when the file decodes fully as the stages read it (`load_rgb`), else why not."""
    try:
        load_rgb(path)
    except DataError as exc:
        text = str(exc)
        return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text
    return None


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load_cache(cache: Path | None) -> dict[str, list]:
    """{absolute path: [size, mtime_ns, reason or None]}; an unreadable cache is empty."""
    if cache is None or not Path(cache).is_file():
        return {}
    try:
        data = json.loads(Path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("images")
    return entries if isinstance(entries, dict) else {}


def _save_cache(cache: Path, found: Mapping[str, list]) -> None:
    from bbam.atomic import atomic_write_json

    entries = load_cache(cache)  # re-read: another process may have added files
    entries.update(found)
    atomic_write_json(cache, {"version": CACHE_VERSION, "images": entries})


def verify_images(
    paths: Iterable[str | Path],
    *,
    cache: Path | None = CACHE,
    workers: int = 0,
    progress: bool = False,
    desc: str = "verify images",
) -> dict[str, str]:
    """{path: reason} of the files among `paths` that do not decode (missing ones included).

    `workers` processes decode the files the cache does not vouch for (0: one per core);
    each result is cached under the file's size and mtime. Paths are returned as given.
    """
    paths = [str(p) for p in paths]
    entries = load_cache(cache)
    unreadable: dict[str, str] = {}
    todo: list[tuple[str, str, tuple[int, int]]] = []
    for path in paths:
        stamp = _stamp(path)
        if stamp is None:
            unreadable[path] = "image file not found"
            continue
        key = os.path.abspath(path)
        entry = entries.get(key)
        if isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == stamp:
            if entry[2] is not None:
                unreadable[path] = str(entry[2])
        else:
            todo.append((path, key, stamp))
    if not todo:
        return unreadable
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    found: dict[str, list] = {}
    with tqdm(total=len(todo), desc=desc, disable=not progress, mininterval=1.0) as bar:
        if workers > 1 and len(todo) >= PARALLEL_FROM:
            # spawn, not fork: the stage's process has Prefect's threads running
            context = multiprocessing.get_context("spawn")
            chunk = max(1, min(256, len(todo) // (workers * 8)))
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                results = pool.map(check_image, [p for p, _, _ in todo], chunksize=chunk)
                for (_path, key, stamp), reason in zip(todo, results, strict=True):
                    found[key] = [*stamp, reason]
                    bar.update()
        else:
            for path, key, stamp in todo:
                found[key] = [*stamp, check_image(path)]
                bar.update()
    for path, key, _ in todo:
        if found[key][2] is not None:
            unreadable[path] = found[key][2]
    if cache is not None:
        _save_cache(Path(cache), found)
    return unreadable


def check_split(
    dataset: Dataset,
    *,
    cache: Path | None = CACHE,
    workers: int = 0,
    progress: bool = False,
    split: str = "",
) -> dict:
    """Verify a split's images; the summary keys the data stage adds for it (no timings:
    metrics/data.json describes the data, bench/data_check.py times this).

    Each unreadable image is also counted in `dataset.skipped` (the stages skip it)."""
    unreadable = verify_images(
        (r.path for r in dataset.records),
        cache=cache,
        workers=workers,
        progress=progress,
        desc=f"verify {split} images".replace("  ", " "),
    )
    for path, reason in unreadable.items():
        dataset.skipped.add(REASON, f"{path}: {reason}")
    return {
        "images_verified": len(dataset.records),
        "unreadable_images": dict(sorted(unreadable.items())),
    }


def unreadable_limit_error(summary: Mapping[str, Mapping], limits: Mapping[str, float]) -> str:
    """The error for the splits whose unreadable fraction exceeds `limits[split]` ('' if none),
    naming the first few files of each."""
    problems = []
    for split, limit in limits.items():
        stats = summary.get(split) or {}
        bad = stats.get("unreadable_images") or {}
        total = stats.get("images_verified") or 0
        if not bad or not total or len(bad) / total <= limit:
            continue
        shown = "; ".join(f"{p}: {r}" for p, r in list(bad.items())[:SHOWN])
        more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
        problems.append(
            f"{split}: {len(bad)} of {total} images are unreadable "
            f"({len(bad) / total:.2%} > data.max_unreadable_{split} {limit:.2%}): {shown}{more}"
        )
    if not problems:
        return ""
    return (
        "; ".join(problems) + ". Fix or remove those images (metrics/data.json lists all of "
        "them), or raise the limit to go on without them"
    )


def unreadable_limits(data: Mapping) -> dict[str, float]:
    """data.max_unreadable_<split> of a params ``data`` section, with the defaults."""
    return {
        split: float(data.get(f"max_unreadable_{split}", default))
        for split, default in DEFAULT_LIMITS.items()
    }


def _known_problem(path: str, entries: dict[str, list]) -> str | None:
    """Why the data stage found ``path`` unreadable, for the file as it is now (None: it did
    not, or the file changed since), or "image file not found"."""
    stamp = _stamp(path)
    if stamp is None:
        return "image file not found"
    entry = entries.get(os.path.abspath(path))
    if isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == stamp and entry[2]:
        return str(entry[2])
    return None


def drop_unreadable(dataset: Dataset, cache: Path | None = CACHE) -> Dataset:
    """`dataset` without the images the data stage found unreadable (by the cache, for the
    file as it is now) or that are missing, each counted in `dataset.skipped` (`REASON`).

    Nothing is decoded here: an image the cache does not know stays, and `load_rgb` names it
    if it is bad."""
    found = found_unreadable(dataset, cache)
    for path, problem in found.values():
        dataset.skipped.add(REASON, f"{path}: {problem}")
    dataset.records = [r for r in dataset.records if r.image_id not in found]
    return dataset


def found_unreadable(dataset: Dataset, cache: Path | None = CACHE) -> dict[str, tuple[str, str]]:
    """image_id -> (path, reason) of the images `drop_unreadable` leaves out: those the data
    stage found unreadable, by the cache for the file as it is now, and those missing."""
    entries = load_cache(cache)
    found = {}
    for record in dataset.records:
        problem = _known_problem(str(record.path), entries)
        if problem is not None:
            found[record.image_id] = (str(record.path), problem)
    return found
