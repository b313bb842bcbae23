"""Row: T2L latent timestep.

Stable T2L trains at latent_t = 1 only, so a pretrained T2L path has only ever seen full noise.
The cycle trainer's `loss.latent_t_mode` decides what its T2L passes (base and cycle_latent) see:
`full` must equal the stable t = 1 exactly, and then the base T2L latent loss equals the stable one
on the same batch and noise; `random` is a distribution shift for pretrained reuse, reported with
its statistics and failing the row.
"""
from __future__ import annotations

import pytest
import torch

from compat.harness import CallRecorder, row_runner, row_test
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("t2l_latent_timestep")
STEPS = 8


def cycle_t2l_timesteps(ctx, steps: int = STEPS, **overrides) -> torch.Tensor:
    """Every latent timestep the cycle trainer's T2L passes used over `steps` steps, drawn from
    its own generator as in training."""
    model = ctx.semantic_model()
    spy = CallRecorder(model, keep_outputs=False)
    trainer = ctx.cycle(model=spy, **overrides)
    for step in range(steps):
        with torch.no_grad():
            trainer(ctx.batch(ctx.options.batch_size, seed=40 + step), step=10_000 + step)
    # T2L passes condition on text (t_text = 0); L2T-like passes have t_text = 1.
    ts = [kw["latent_timesteps"].float().cpu() for _, kw in spy.calls if not bool((kw["text_timesteps"] == 1).all())]
    return torch.cat(ts)


def distribution(ts: torch.Tensor) -> dict[str, float]:
    return {"mean": float(ts.mean()), "min": float(ts.min()), "share_below_1": float((ts < 1).float().mean())}


def check_stable_uses_t1(ctx, measure):
    model = ctx.semantic_model()
    spy = CallRecorder(model)
    batch = ctx.batch(ctx.options.batch_size, seed=41)
    ctx.stable("t2l", model=spy)(batch, draws={"latent_noise": ctx.noise(batch, seed=41)})
    t = spy.calls[-1][1]["latent_timesteps"].float().cpu()
    torch.testing.assert_close(t, torch.ones_like(t), **tol("bit_exact"), msg=lambda m: f"stable t2l latent_t is not 1\n{m}")
    measure("stable_t", 1.0)


def check_cycle_distribution(ctx, measure):
    """The configured cycle trainer's T2L t distribution equals the stable point mass at 1."""
    ts = cycle_t2l_timesteps(ctx, cycle_text_weight=0.1, cycle_latent_weight=0.1)
    stats = distribution(ts)
    mode = ctx.cycle().latent_t_mode
    measure("cycle_latent_t_mode", mode)
    measure("cycle_t_mean", stats["mean"])
    measure("cycle_t_share_below_1", stats["share_below_1"])
    assert stats["share_below_1"] == 0.0, (
        f"distribution shift: with latent_t_mode={mode} the cycle trainer's T2L passes see t < 1 in "
        f"{stats['share_below_1']:.0%} of samples (mean t {stats['mean']:.3f}, min {stats['min']:.3f}) while the "
        "pretrained stable T2L only saw t = 1: set loss.latent_t_mode=full for pretrained reuse")


def check_random_mode_is_a_shift(ctx, measure):
    """What `random` would give, measured, so the report shows the size of the shift it avoids."""
    ts = cycle_t2l_timesteps(ctx, steps=2, latent_t_mode="random", cycle_text_weight=0.0, cycle_latent_weight=0.0)
    stats = distribution(ts)
    measure("random_mode_t_mean", stats["mean"])
    assert stats["share_below_1"] > 0.9, f"random mode produced t < 1 in only {stats['share_below_1']:.0%} of samples"


def check_full_matches_stable_loss(ctx, measure):
    batch = ctx.batch(ctx.options.batch_size, seed=42)
    noise = ctx.noise(batch, seed=42)
    model = ctx.require_model()  # the checkpoint's T2L path
    with torch.no_grad():  # values only: no autograd graph of a full-size model kept alive
        _, stable = ctx.stable("t2l", model=model)(batch, draws={"latent_noise": noise})
        _, cycle = ctx.cycle(model=model, latent_t_mode="full", cycle_text_weight=0.0, cycle_latent_weight=0.0)(
            batch, draws={"latent_noise": noise})
    torch.testing.assert_close(torch.tensor(cycle["base_t2l_latent_loss"]), torch.tensor(stable["latent_loss"]),
                               **tol("float32_loss"), msg=lambda m: f"full-mode T2L latent loss differs from stable\n{m}")
    measure("t2l_latent_loss", stable["latent_loss"])


CHECKS = {
    "stable_uses_t1": check_stable_uses_t1,
    "cycle_distribution": check_cycle_distribution,
    "random_mode_is_a_shift": check_random_mode_is_a_shift,
    "full_matches_stable_loss": check_full_matches_stable_loss,
}


run_row = row_runner(CHECKS)
test_t2l_latent_timestep = row_test(CHECKS)
