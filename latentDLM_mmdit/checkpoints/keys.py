"""Upstream's state-dict key spellings normalised to the model's: DDP's `module.`, torch.compile's
`_orig_mod.` and the trainer's `model.` prefixes stripped in any nesting, `text_noise_schedule.*` dropped."""

from __future__ import annotations

import re
from collections.abc import Iterable
from latentDLM_mmdit.checkpoints.base import CheckpointError

DROPPED_PREFIXES = ("text_noise_schedule.",)

STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")


# Where the model's sizes live in its state dict.
TOKEN_EMBED = "text_encoder.token_embed.weight"  # [V, H]
POSITION_EMBED = "text_encoder.position_embed"  # [1, max_seq_len, H]
LATENT_IN = "latent_encoder.projection.0.weight"  # [2H, D]
COND_OUT = "conditioning.combine.2.weight"  # [C, 4C]
TEXT_HEAD = "text_head.weight"  # [V, H]
CLUSTER_HEAD = "text_head_clusters.weight"  # [V, H], only when cluster_size > 0
BLOCK_KEY = re.compile(r"^mmdit\.blocks\.(\d+)\.")
STATIC_ALPHA_KEY = re.compile(r"^mmdit\.blocks\.\d+\.\w*residual_fns\.\d+\.static_alpha$")  # [n, n + 1]


def normalize_key(key: str) -> str | None:
    """Strips wrapper prefixes until none is left; None for keys that are not the model's."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    if key.startswith(DROPPED_PREFIXES):
        return None
    return key


def normalize_keys(keys: Iterable[str], source: str) -> dict[str, str]:
    """Map model key -> source key. Two source keys landing on one model key is an error."""
    mapping: dict[str, str] = {}
    for key in keys:
        model_key = normalize_key(key)
        if model_key is None:
            continue
        if model_key in mapping:
            raise CheckpointError(f"{source}: keys {mapping[model_key]!r} and {key!r} both map to {model_key!r}")
        mapping[model_key] = key
    return mapping


def _key_changes(keys: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """({stripped prefix: count}, dropped source keys)."""
    stripped: dict[str, int] = {}
    dropped = []
    for key in keys:
        model_key = normalize_key(key)
        if model_key is None:
            dropped.append(key)
        elif model_key != key:
            prefix = key[: len(key) - len(model_key)]
            stripped[prefix] = stripped.get(prefix, 0) + 1
    return stripped, dropped
