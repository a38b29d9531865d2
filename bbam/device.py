"""Where tensors run: the one ``resolve_device`` every stage uses, and torch's thread count."""

from __future__ import annotations

import re

import torch

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str) -> str:
    """``name`` when it is one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, else ValueError.

    Why: torch takes names this project never runs on (``mps``, ``meta``) and refuses a typo
    (``gpu``) only when a stage first moves a tensor, with a message naming no params key;
    the params check and `resolve_device` share this one rule so they cannot disagree."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"device {name!r} is not one of {DEVICE_NAMES}")
    return name


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cpu``, ``cuda``, ``cuda:N`` are taken as written."""
    if isinstance(name, torch.device):
        return name
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_torch_threads(threads: int) -> None:
    """Torch's intra-op threads (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
