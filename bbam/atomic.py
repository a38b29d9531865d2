"""Atomic file writes: a temp file in the same directory, fsync, then os.replace.

Readers never see a partial file, and a write killed half-way leaves the old file (or
none). A write stopped by an exception removes its temp file; one whose process died
(SIGKILL, a lost node) cannot, and `remove_stale_temps` clears those. Every output file of
the project goes through here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_TOKEN_BYTES = 6  # a temp file is .<name>.<12 hex digits>.tmp


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(binary_file)`` on a temp file next to ``path``, fsync it, rename it over.

    The temp file is made with ``open(..., "xb")`` (exclusive create) rather than mkstemp so
    the result gets the usual umask permissions, like a plainly written file. It is removed
    on any exception, KeyboardInterrupt included.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")
    handle = open(tmp, "xb")  # outside the try: a name clash must not delete the other file
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(path: str | Path, idle_s: float = 600.0) -> list[Path]:
    """Remove the temp files that writes of ``path`` left when their process died mid-write:
    those not written to for ``idle_s`` seconds.

    Why: a SIGKILL skips ``atomic_write``'s clean-up, so each kill during a checkpoint write
    leaves a checkpoint-sized file behind, for good. The idle time spares the temp file of a
    write in flight (another run on the same folder by mistake); a kill's leftover goes at a
    later start."""
    path = Path(path)
    pattern = f".{glob.escape(path.name)}.{'?' * 2 * _TOKEN_BYTES}.tmp"
    found = sorted(path.parent.glob(pattern)) if path.parent.is_dir() else []
    stale = []
    for tmp in found:
        try:
            if time.time() - tmp.stat().st_mtime >= idle_s:
                tmp.unlink()
                stale.append(tmp)
        except FileNotFoundError:  # its write finished or failed meanwhile
            continue
    return stale


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8, newlines written as given (no platform translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Compact JSON (no spaces, no trailing newline), for machine-read files."""
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # not needed by the data-only users of this module

    atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (weights, annotation files, stage inputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
