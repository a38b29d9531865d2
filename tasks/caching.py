"""Prefect caching keyed on what a stage reads, so a task reruns when DVC would rerun its stage.

A stage task's cache key is built from:

- the stage's entry in ``dvc.yaml``: the values of the ``params`` keys it lists, and the
  digests of its ``deps`` (code files, data files, the folders earlier stages wrote;
  ``${...}`` paths resolved from the params);
- the task's own inputs other than the params dict (a shard index, a supervision);
- the task's source.

Results are persisted inside the stage's own output folder (``<out>/.prefect-results``), so
when the outputs are deleted the cache goes with them. A second ``python -m flows.pipeline``
with nothing changed therefore ends with every task ``Cached`` but three that take no cache:
``summarise-splits`` (re-verifies images by its own size/mtime cache), ``attribute-shard``
and ``merge-manifests`` (they read the shard manifests, which say what is done). A changed
knob reruns the stage that lists it, and the stages after it whose inputs then change. To
force a rerun: ``PREFECT_TASKS_REFRESH_CACHE=true``. Without a ``dvc.yaml`` in the working directory (the
project a stage runs in) nothing is cached.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

from tasks.params import file_sha256, params_digest

RESULTS = ".prefect-results"


@lru_cache(maxsize=1)
def _dvc_stages(dvc_yaml: Path) -> dict[str, dict]:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def _lookup(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _path_digest(path: Path) -> str:
    """sha256 of a file; of a folder, over its files' relative paths and contents (Prefect's
    own result files left out); "missing" when absent."""
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and RESULTS not in p.parts):
        digest.update(f"{file.relative_to(path)}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def stage_digest(params: dict, stage: str, root: Path | None = None) -> str | None:
    """The digest of what ``root/dvc.yaml`` says ``stage`` reads, its paths taken from
    ``root`` as DVC does (default: the working directory); None without a dvc.yaml."""
    root = Path.cwd() if root is None else Path(root)
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return None
    spec = _dvc_stages(dvc_yaml).get(stage)
    if spec is None:
        return None
    keys = [str(k) for k in spec.get("params", [])]
    deps = []
    for dep in spec.get("deps", []):
        path = re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), str(dep))
        deps.append((path, _path_digest(root / path)))
    return params_digest({k: _lookup(params, k) for k in keys}, deps)


@dataclass
class StageInputs(CachePolicy):
    """Key = the stage's ``dvc.yaml`` inputs + the task's other inputs + its source; None (no
    caching) without a params dict or a ``dvc.yaml``. One policy rather than a sum of
    Prefect's, because a sum would still cache on the other parts when this one is None."""

    stage: str = ""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        params = inputs.get("params")
        digest = stage_digest(params, self.stage) if isinstance(params, dict) else None
        if digest is None:
            return None
        others = [
            policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
            for policy in (INPUTS - "params", TASK_SOURCE)
        ]
        return params_digest(self.stage, digest, others)


def stage_cache(stage: str, out_dir: str | Path) -> dict[str, Any]:
    """``@task`` keywords that cache a task of ``stage`` with results under ``out_dir``
    (relative paths are taken from the working directory when the task runs)."""
    return {
        "cache_policy": StageInputs(stage=stage),
        "persist_result": True,
        "result_storage": Path(out_dir) / RESULTS,
    }
