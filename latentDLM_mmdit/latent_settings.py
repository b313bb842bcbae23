"""Where the latent diffusion settings of a config come from.

Upstream's stable trainer read `latent_timesteps`, `latent_beta_schedule` and
`latent_parameterization` from the config ROOT (falling back to 1000 / cosine / epsilon), while
its configs and the cycle trainer put them under `model.*` (upstream defect 4). Here both trainers
read `model.*` of the validated config: the schema (`settings.ModelSettings`) states the defaults,
a root spelling fills `model.*`, and a config where the two disagree is an error naming both keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from latentDLM_mmdit.settings import LATENT_KEYS, ResolvedConfig, validate_settings

# What upstream's trainers fell back to when their key was absent (a fact about upstream's code).
UPSTREAM_LATENT_DEFAULTS = {
    "latent_timesteps": 1000,
    "latent_beta_schedule": "cosine",
    "latent_parameterization": "epsilon",
}


@dataclass(frozen=True)
class LatentSettings:
    num_timesteps: int
    beta_schedule: str
    parameterization: str
    sources: dict  # key -> "model.<key>", "<key>" (root) or "default"

    def as_dict(self) -> dict:
        return {
            "latent_timesteps": self.num_timesteps,
            "latent_beta_schedule": self.beta_schedule,
            "latent_parameterization": self.parameterization,
        }


def latent_settings_of(resolved: ResolvedConfig) -> LatentSettings:
    """The latent settings of a validated config, with where each came from."""
    model = resolved.config.model
    sources = {}
    for key in LATENT_KEYS:
        origin = resolved.sources.get(f"model.{key}", "default")
        sources[key] = (
            "default" if origin == "default" else (key if origin.startswith("config root") else f"model.{key}")
        )
    return LatentSettings(model.latent_timesteps, model.latent_beta_schedule, model.latent_parameterization, sources)


def resolve_latent_settings(config: Any) -> LatentSettings:
    """Validates `config` and reads its latent settings; a root/model disagreement is a ConfigError."""
    return latent_settings_of(validate_settings(config, "config", shared=True))


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    try:
        return node.get(key, None)
    except AttributeError:
        return getattr(node, key, None)


def upstream_stable_reading(config: Any) -> dict:
    """What upstream's stable trainer would have used for this config (root keys or its defaults)."""
    return {
        key: (_get(config, key) if _get(config, key) is not None else UPSTREAM_LATENT_DEFAULTS[key])
        for key in LATENT_KEYS
    }
