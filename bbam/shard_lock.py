"""One writer per shard directory, across hosts that share the folder.

A re-dispatched shard may start while the run it replaces is still alive (a
worker that lost its network but not its GPU), and a requeued local run may start
while the first is alive. Two writers in one shard folder would race on part
numbers and compaction, so every shard run (the shard flow, the local executor)
holds ``<shard_dir>/.lock``: created with O_EXCL, holding {pid, host, owner,
started, pidns, pid_start}, its mtime refreshed by a heartbeat thread. A lock
whose mtime is older than ``stale_s`` belongs to a dead process and may be broken
(renamed away, so two breakers cannot both win); so may one whose holder is known
dead at once: same host name and pid namespace, and its pid no longer runs the
process that took the lock (a SIGKILLed local run must not block the rerun for
``stale_s``). The dispatcher reads the same heartbeat to tell a slow shard from a
lost one. Needs a shared POSIX folder (local disk or NFS v3+ with O_EXCL); fsspec
URLs are not supported.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LOCK_NAME = ".lock"


class ShardBusy(RuntimeError):
    """Another live process holds the shard."""


class LockLost(RuntimeError):
    """Our lock was broken or replaced while we worked (we were presumed dead)."""


def lock_path(shard_dir: str | Path) -> Path:
    return Path(shard_dir) / LOCK_NAME


def _start_time(pid: int) -> str | None:
    """The start time of a live process (``/proc/<pid>/stat``), None if gone, a zombie or
    unknown (no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _identity() -> dict:
    """What tells another process on this host whether we are still alive."""
    try:
        return {"pidns": os.readlink("/proc/self/ns/pid"), "pid_start": _start_time(os.getpid())}
    except OSError:
        return {}


def holder_dead(info: dict | None) -> bool:
    """True only when sure: the holder ran on this host, in our pid namespace (pids compare),
    and its pid is gone or now another process. Anything else waits for ``stale_s``."""
    if not info or info.get("host") != socket.gethostname() or not info.get("pid_start"):
        return False
    if info.get("pidns") != _identity().get("pidns"):
        return False
    return _start_time(int(info["pid"])) != info["pid_start"]


def read_lock(shard_dir: str | Path) -> dict | None:
    """The lock's holder plus ``age_s`` (seconds since its last heartbeat), or None."""
    path = lock_path(shard_dir)
    try:
        age = time.time() - path.stat().st_mtime
        info = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict):
        return None
    info["age_s"] = age
    return info


class ShardLock:
    """Context manager: acquire (waiting up to ``wait_s`` for a live holder), heartbeat, release."""

    def __init__(
        self,
        shard_dir: str | Path,
        owner: str,
        stale_s: float = 60.0,
        heartbeat_s: float = 5.0,
        wait_s: float = 0.0,
    ) -> None:
        if heartbeat_s * 2 > stale_s:
            raise ValueError(f"heartbeat_s {heartbeat_s} must be under half of stale_s {stale_s}")
        self.path = lock_path(shard_dir)
        self.owner = owner
        self.token = uuid.uuid4().hex
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.wait_s = wait_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try_create(self) -> bool:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "owner": self.owner,
            "token": self.token,
            "started": time.time(),
            **_identity(),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _break_if_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age <= self.stale_s and not holder_dead(read_lock(self.path.parent)):
            return False
        grave = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, grave)  # only one breaker's rename finds the file
        except FileNotFoundError:
            return True
        grave.unlink(missing_ok=True)
        return True

    def acquire(self) -> ShardLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._try_create():
                break
            if self._break_if_stale() and self._try_create():
                break
            if time.monotonic() >= deadline:
                holder = read_lock(self.path.parent) or {}
                raise ShardBusy(
                    f"{self.path}: held by pid {holder.get('pid')} on {holder.get('host')} "
                    f"({holder.get('owner')}), heartbeat {holder.get('age_s', 0):.0f} s ago; "
                    f"another run is working in {self.path.parent}: let it finish or stop it "
                    f"(a lock without a heartbeat for {self.stale_s:.0f} s is taken over)"
                )
            time.sleep(min(self.heartbeat_s, 1.0))
        self._thread = threading.Thread(target=self._beat, name=f"lock {self.path}", daemon=True)
        self._thread.start()
        return self

    def owned(self) -> bool:
        info = read_lock(self.path.parent)
        return info is not None and info.get("token") == self.token

    def check(self) -> None:
        """Raise LockLost if someone broke our lock (call between chunks)."""
        if self.lost.is_set() or not self.owned():
            self.lost.set()
            raise LockLost(f"{self.path}: lock taken over while this run was working")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.owned():
                self.lost.set()
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> ShardLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
