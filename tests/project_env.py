"""Environment for a pipeline subprocess in a throwaway project: this venv's tools first, the
project's own code on the path, and DVC and Prefect state kept inside the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"),
        BBAM_PREFECT_HOME=str(project / ".prefect"),
        PYTHONPATH=str(project),
        OMP_NUM_THREADS="1",
    )
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    return env
