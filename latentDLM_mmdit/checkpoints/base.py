"""What every part of the checkpoint code shares: the format name, the key prefixes and layout
markers, `CheckpointError`, and the installed versions a checkpoint records."""

from __future__ import annotations

import logging
from importlib import metadata as importlib_metadata

import torch


logger = logging.getLogger("latentDLM_mmdit.checkpoints")  # one logger for the package, as before its split

FORMAT = "mmdit-compat/1"
TRACKED_PACKAGES = ("torch", "mmdit", "hyper-connections", "x-transformers")
# Residual-stream parameter names: those only mmdit 0.2.x (HyperConnections) has, those only
# mmdit 0.3.x (ManifoldConstrainedHyperConnections) has, and the container of both.
MMDIT_02_MARKERS = ("dynamic_alpha_scale", "dynamic_beta_scale")
MMDIT_03_MARKERS = ("pre_branch_scale", "residual_scale", "h_post_scale")
RESIDUAL_CONTAINER = "residual_fns"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["torch"] = torch.__version__
    return versions


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
