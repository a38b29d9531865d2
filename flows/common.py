"""What every stage shares: the CLI (parse ``--params`` once, check it, run the flow) and
the table artifact each stage publishes to the Prefect UI."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from prefect.artifacts import create_table_artifact

from bbam.data.records import DataError
from bbam.device import set_torch_threads
from tasks.params import load_params


def configure_runtime(params: dict) -> None:
    """Torch threads from params (0 keeps torch's default)."""
    set_torch_threads(int(params.get("torch_threads", 0) or 0))


def publish_table(key: str, rows: list[dict], description: str) -> UUID:
    """The stage's numbers as a table artifact of the current flow run: the Prefect UI then
    shows them on the run's Artifacts tab (and the latest under ``key`` on the Artifacts
    page), with no need to open ``metrics/*.json``.

    Call it inside a flow, once the stage's result exists. A flow run always has an API
    (a server, or Prefect's ephemeral one), so a failure here is a real error and raises."""
    return create_table_artifact(table=rows, key=key, description=description)


def metric_rows(metrics: Mapping[str, Any], labels: Mapping[str, str]) -> list[dict]:
    """``[{"metric": label, "value": metrics[key]}, ...]`` in the order of ``labels``
    (key -> label); a missing value is None, shown empty rather than dropped."""
    return [{"metric": label, "value": metrics.get(key)} for key, label in labels.items()]


class BadInputWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback. For bad input (a
    ``DataError``, whose message names the file and what is wrong) the traceback only hides
    that message from the user, so it is dropped; any other exception keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DataError):
            record.exc_info, record.exc_text = None, None
        return True


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def load_checked(path: str) -> dict:
    """The params file, loaded and checked: once per process, then passed down as values."""
    # Imported here, not at the top: the schema imports every stage's code, and a shard
    # worker (flows.attribute_shard) must take its lock before paying for that.
    from flows.params_schema import check_params

    params = load_params(path)
    check_params(params, path)
    return params


def stage_cli(description: str, flow_fn: Callable[..., Any], extra: Callable | None = None) -> None:
    """Parse ``--params``, check them, run the flow, exit non-zero on any failure.

    The flow gets the checked dict as ``params``, and the file's path as ``params_path``
    only when it hands the file on to other processes (the ``deployments`` executor)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    params = load_checked(args.params)
    configure_runtime(params)
    kwargs = {k: v for k, v in vars(args).items() if k != "params"}
    if "params_path" in inspect.signature(flow_fn).parameters:
        kwargs["params_path"] = str(args.params)
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(BadInputWithoutTraceback())
    try:
        flow_fn(params=params, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the flow already logged it (with its traceback unless bad input)
        print(f"[bbam] {description}: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
