"""A real `prefect server start` on 127.0.0.1 with a throwaway home, for tests that need
Prefect's own validation (work pools, deployments). Same setup as
tests/test_scale_out.py's loopback test."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def drain_client_services(timeout_s: float = 60.0) -> None:
    """Send what this process's Prefect client still queues (events, task-run states, logs)
    while the server is up, as Prefect's own test harness does: left queued, each item is
    retried against the stopped server at interpreter exit, which then hangs for minutes."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def prefect_server(tmp_path: Path, timeout_s: float = 150) -> Iterator[dict[str, str]]:
    """Start a server, wait for /api/health, yield the environment clients need; stop it."""
    port = free_port()
    env = server_env(tmp_path / "prefect-home", port)
    log = tmp_path / "prefect-server.log"
    with open(log, "wb") as handle:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                    break
            except OSError:
                tail = log.read_text(errors="replace")[-3000:]
                assert server.poll() is None, "prefect server exited:\n" + tail
                assert time.monotonic() < deadline, "prefect server not healthy:\n" + tail
                time.sleep(1)
        yield env
    finally:
        drain_client_services()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(server.pid), 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(server.pid), 9)
            server.wait(timeout=30)
