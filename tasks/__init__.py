"""Prefect tasks, one module per pipeline stage, plus ``tasks.params`` (params.yaml -> values).

Importing this package points Prefect at a per-stage home before Prefect itself is
imported: processes sharing one SQLite database can fail with "database is locked",
and DVC runs each stage as its own process. Set PREFECT_API_URL to use a real server.
This is the lowest package that imports Prefect, so every entry point passes here first.
"""

import os
from pathlib import Path

if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
    _stage = os.environ.get("DVC_STAGE", "cli").replace("@", "-").replace("/", "-")
    _base = Path(
        os.environ.get("BBAM_PREFECT_HOME", Path(__file__).resolve().parent.parent / ".prefect")
    )
    os.environ["PREFECT_HOME"] = str(_base / _stage)
    (_base / _stage).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The temporary server needs longer than the default 20 s on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
