"""Where tensors run: the one ``resolve_device`` every stage uses, and torch's thread count."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; anything else is taken as written (``cpu``, ``cuda:1``)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_torch_threads(threads: int) -> None:
    """Torch's intra-op threads (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
