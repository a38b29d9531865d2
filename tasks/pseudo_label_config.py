"""The ``refine`` and ``proposals`` sections as the library's configs.

No Prefect here: the benches and the GPU check (whose machine has no Prefect) refine maps as
the pseudo_labels stage does.
"""

from __future__ import annotations

from bbam.mcg import MCGConfig
from bbam.refine import RefineConfig


def refine_config(params: dict) -> RefineConfig:
    """The pseudo-label stage's refinement settings (also what the benches measure)."""
    return RefineConfig(**(params.get("refine") or {}))


def proposal_config(params: dict) -> tuple[MCGConfig, str | None]:
    """(MCGConfig, directory of MCG .mat files or None) of the ``proposals`` section."""
    section = dict(params.get("proposals") or {})
    mcg_dir = section.pop("mcg_dir", None)
    return MCGConfig(**section), mcg_dir
