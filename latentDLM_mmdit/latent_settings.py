"""Where the latent diffusion settings of a config come from.

Upstream's stable trainer read `latent_timesteps`, `latent_beta_schedule` and
`latent_parameterization` from the config ROOT (falling back to 1000 / cosine / epsilon), while
its configs and the cycle trainer put them under `model.*` (upstream defect 4). Here both trainers
resolve them the same way: `model.*` first, the root spelling accepted too, and a config where the
two disagree is an error naming both keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LATENT_KEYS = ("latent_timesteps", "latent_beta_schedule", "latent_parameterization")
LATENT_DEFAULTS = {"latent_timesteps": 1000, "latent_beta_schedule": "cosine", "latent_parameterization": "epsilon"}


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    try:
        return node.get(key, None)
    except AttributeError:
        return getattr(node, key, None)


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


def resolve_latent_settings(config: Any) -> LatentSettings:
    """Reads the three latent keys from `model.*` or the root; raises ValueError on disagreement."""
    model = _get(config, "model")
    values, sources = {}, {}
    for key in LATENT_KEYS:
        nested, root = _get(model, key), _get(config, key)
        if nested is not None and root is not None and nested != root:
            raise ValueError(
                f"config sets model.{key}={nested!r} and root {key}={root!r}: they disagree; "
                f"upstream's stable trainer read the root key, its cycle trainer model.{key}. Keep one."
            )
        if nested is not None:
            values[key], sources[key] = nested, f"model.{key}"
        elif root is not None:
            values[key], sources[key] = root, key
        else:
            values[key], sources[key] = LATENT_DEFAULTS[key], "default"
    return LatentSettings(int(values["latent_timesteps"]), str(values["latent_beta_schedule"]),
                          str(values["latent_parameterization"]), sources)


def upstream_stable_reading(config: Any) -> dict:
    """What upstream's stable trainer would have used for this config (root keys or defaults)."""
    return {key: (_get(config, key) if _get(config, key) is not None else LATENT_DEFAULTS[key])
            for key in LATENT_KEYS}


def upstream_cycle_reading(config: Any) -> dict:
    """What upstream's cycle trainer would have used (model.* keys or defaults)."""
    model = _get(config, "model")
    return {key: (_get(model, key) if _get(model, key) is not None else LATENT_DEFAULTS[key])
            for key in LATENT_KEYS}
