"""What every stage's CLI shares: parse ``--params`` once, check it, run the flow."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any

from bbam.device import set_torch_threads
from tasks.params import load_params


def configure_runtime(params: dict) -> None:
    """Torch threads from params (0 keeps torch's default)."""
    set_torch_threads(int(params.get("torch_threads", 0) or 0))


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
    try:
        flow_fn(params=params, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the flow already logged the traceback
        print(f"[bbam] {description}: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
