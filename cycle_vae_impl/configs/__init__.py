"""The cycle trainer's packaged configs."""

from __future__ import annotations

from pathlib import Path

from latentDLM_mmdit.config import ConfigError, packaged_config_path

PACKAGED_CONFIGS = {
    "cycle": "configs/mmdit_cycle_vae.yaml",
    "cycle_cluster": "configs/mmdit_cycle_vae_cluster.yaml",
}


def default_config_path(kind: str = "cycle") -> Path:
    """Path of a packaged cycle config: "cycle" (tiny CPU default) or "cycle_cluster"."""
    if kind not in PACKAGED_CONFIGS:
        raise ConfigError(f"unknown packaged cycle config {kind!r}; valid: {', '.join(PACKAGED_CONFIGS)}")
    return packaged_config_path("cycle_vae_impl", PACKAGED_CONFIGS[kind])


def config_path(kind: str) -> Path:
    """Any packaged config by name: "stable" (the reference's), "cycle" or "cycle_cluster"."""
    if kind == "stable":
        from latentDLM_mmdit.config import default_config_path as stable_config_path

        return stable_config_path("stable")
    return default_config_path(kind)
