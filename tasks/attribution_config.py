"""The ``attribution`` section as the engine's AttributionConfig.

No Prefect here: the pseudo-label and evaluate stages read the engine settings (how maps
were upsampled) without importing the attribution stage's tasks, locks and dispatcher.
"""

from __future__ import annotations

from bbam.attribution import AttributionConfig, profile_config
from tasks.params import top_level


def engine_config(params: dict) -> AttributionConfig:
    """The engine settings every attribution step uses: the params' profile plus overrides
    (the top-level ``seed`` unless ``overrides.seed`` sets the engine's own)."""
    section = params["attribution"]
    overrides = {"seed": top_level(params)["seed"], **(section.get("overrides") or {})}
    return profile_config(section.get("profile", "fast"), **overrides)
