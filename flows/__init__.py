"""Prefect flows, one per pipeline stage (``python -m flows.<stage> --params params.yaml``).

Importing ``tasks`` first sets Prefect's per-stage home (see ``tasks/__init__.py``).
"""

import tasks  # noqa: F401
