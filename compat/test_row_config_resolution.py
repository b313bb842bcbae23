"""Row: config resolution.

Upstream's stable trainer read the latent diffusion keys from the config root (defaults 1000 /
cosine / epsilon when absent) while its configs and the cycle trainer put them under `model.*`
(upstream defect 4). Checked: the same YAML gives the same schedule, parameterization and
timesteps (and the same alphas_cumprod, bit for bit) in both trainers; the settings the checkpoint
was trained with equal those the cycle trainer will use; both configs build the same model layout;
a config that upstream's stable trainer would have read differently is flagged.
"""
from __future__ import annotations

import pytest
import torch

from compat.harness import LAYOUT_KEYS, row_runner, row_test
from compat.oracle import tol
from latentDLM_mmdit.checkpoints import open_checkpoint
from latentDLM_mmdit.latent_settings import resolve_latent_settings, upstream_stable_reading

pytestmark = pytest.mark.compat_row("config_resolution")


def _settings(trainer) -> dict:
    d = trainer.latent_diffusion
    return {"latent_timesteps": d.num_timesteps, "latent_beta_schedule": d.beta_schedule,
            "latent_parameterization": d.parameterization}


def check_same_yaml_same_settings(ctx, measure):
    for label, config in (("stable config", ctx.stable_config), ("cycle config", ctx.cycle_config)):
        stable, cycle = ctx.stable("t2l", base=config), ctx.cycle(base=config)
        assert _settings(stable) == _settings(cycle), (
            f"{label}: the stable trainer resolves {_settings(stable)}, the cycle trainer {_settings(cycle)}")
        torch.testing.assert_close(cycle.latent_diffusion.alphas_cumprod, stable.latent_diffusion.alphas_cumprod,
                                   **tol("bit_exact"), msg=lambda m, l=label: f"{l}: alphas_cumprod differ\n{m}")
    measure("cycle_settings", "/".join(str(v) for v in _settings(ctx.cycle()).values()))


def trained_with(ctx) -> tuple[dict, str]:
    """The latent settings the checkpoint was trained with, and where that knowledge comes from."""
    recorded = None
    if ctx.checkpoint_path.suffix == ".safetensors":
        with open_checkpoint(ctx.checkpoint_path) as source:
            recorded = source.metadata.get("config")
    if isinstance(recorded, dict) and recorded.get("model") is not None:
        return resolve_latent_settings(recorded).as_dict(), "the config recorded in the checkpoint"
    return upstream_stable_reading(ctx.stable_config), "upstream's stable trainer reading of the stable config (root keys)"


def check_checkpoint_settings_match_cycle(ctx, measure):
    trained, source = trained_with(ctx)
    cycle = resolve_latent_settings(ctx.cycle_config).as_dict()
    measure("trained_with_source", source)
    diff = {k: (trained[k], cycle[k]) for k in cycle if str(trained[k]) != str(cycle[k])}
    assert not diff, (f"the checkpoint was trained with {trained} ({source}) but the cycle trainer will use "
                      f"{cycle}: differing {diff}")


def check_upstream_reading_flagged(ctx, measure):
    trained, source = trained_with(ctx)
    for label, config in (("stable", ctx.stable_config), ("cycle", ctx.cycle_config)):
        upstream = upstream_stable_reading(config)
        resolved = resolve_latent_settings(config).as_dict()
        differs = {k: (upstream[k], resolved[k]) for k in resolved if str(upstream[k]) != str(resolved[k])}
        if differs:
            measure(f"{label}_config_read_differently_by_upstream_stable", differs,
                    review=not source.startswith("the config recorded"))
    measure("upstream_reading_checked", True)


def check_model_layout_keys_agree(ctx, measure):
    diff = {}
    for key in LAYOUT_KEYS:
        a, b = ctx.stable_config.model.get(key), ctx.cycle_config.model.get(key)
        if a != b:
            diff[key] = (a, b)
    for key in ("vocab_size", "mask_token_id"):
        a, b = ctx.stable_config.tokenizer.get(key), ctx.cycle_config.tokenizer.get(key)
        if a != b:
            diff[f"tokenizer.{key}"] = (a, b)
    assert not diff, f"the stable and cycle configs build different models (stable, cycle): {diff}"
    measure("layout_keys", "equal")


CHECKS = {
    "same_yaml_same_settings": check_same_yaml_same_settings,
    "checkpoint_settings_match_cycle": check_checkpoint_settings_match_cycle,
    "upstream_reading_flagged": check_upstream_reading_flagged,
    "model_layout_keys_agree": check_model_layout_keys_agree,
}


run_row = row_runner(CHECKS)
test_config_resolution = row_test(CHECKS)
