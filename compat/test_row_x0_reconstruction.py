"""Row: x0 reconstruction.

cycle_text conditions an L2T pass on the x0 the cycle trainer reconstructs from its T2L output.
Checked through the trainer's real code path with a perfect denoiser (the T2L pass returns the
exact target of the parameterization): at small t the reconstructed x0 equals the clean latent for
every parameterization. At t = 1, where `latent_t_mode: full` puts every T2L pass, the error gain
|d x0 / d prediction| is measured: 1/sqrt(alphas_cumprod) is about 6.4e4 for epsilon under the
cosine schedule, so cycle_text would condition on x0 whose error is amplified that much. The
review's "medium, keep stop-grad" verdict does not survive that: the row fails when the configured
cycle_text is on and the gain exceeds 100, and asks for review above 10.
"""
from __future__ import annotations

import pytest
import torch

from compat import oracle
from compat.harness import CallRecorder, row_runner, row_test
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("x0_reconstruction")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")
GAIN_INCOMPATIBLE = 100.0
GAIN_REVIEW = 10.0


class PerfectDenoiser(torch.nn.Module):
    """The real model, except that T2L passes (t_text = 0) predict the exact oracle target for the
    known clean latent and noise, plus an optional perturbation."""

    def __init__(self, inner, x0, noise, schedule, num_timesteps, parameterization, perturbation=None):
        super().__init__()
        self.inner = inner
        self.x0, self.noise, self.perturbation = x0, noise, perturbation
        self.ab = oracle.alphas_cumprod(schedule, num_timesteps)
        self.T, self.parameterization = num_timesteps, parameterization

    def forward(self, **kw):
        out = list(self.inner(**kw))
        if bool((kw["text_timesteps"] == 0).all()):
            ab = self.ab[oracle.timestep_index(kw["latent_timesteps"].float().cpu(), self.T)]
            target = oracle.target(self.x0, self.noise, ab, self.parameterization)
            if self.perturbation is not None:
                target = target + self.perturbation.double()
            out[1] = target.float().reshape(out[1].shape).to(out[1].device)
        return tuple(out)


def reconstruct(ctx, parameterization, mode_overrides, draws_t=None, perturbation=None):
    """(reconstructed x0 [B,D], clean x0 [B,D], trainer metrics) through the trainer's cycle_text path."""
    model = ctx.semantic_model()
    batch = ctx.batch(ctx.options.batch_size, seed=70)
    B = batch["input_ids"].shape[0]
    noise = ctx.noise(batch, seed=70)
    x0 = ctx.as_fed(batch["latent"].reshape(B, -1))
    probe = ctx.cycle(**{"model.latent_parameterization": parameterization})
    schedule, T = probe.latent_diffusion.beta_schedule, probe.latent_diffusion.num_timesteps
    spy = CallRecorder(PerfectDenoiser(model, x0, ctx.as_fed(noise), schedule, T, parameterization, perturbation))
    trainer = ctx.cycle(model=spy, cycle_text_weight=1.0, cycle_latent_weight=0.0, cycle_text_warmup_steps=0,
                        cycle_text_ramp_steps=0, **{"model.latent_parameterization": parameterization}, **mode_overrides)
    draws = {"latent_noise": noise}
    if draws_t is not None:
        draws["latent_t"] = draws_t
    _, metrics = trainer(batch, step=0, draws=draws)
    x0_cycle = spy.calls[2][1]["latents"].reshape(B, -1).float().cpu()
    return x0_cycle, x0, metrics


def check_exact_at_small_t(ctx, measure, parameterization):
    B = ctx.options.batch_size
    u = ctx.uniforms((B,), seed=71)
    rec, x0, _ = reconstruct(ctx, parameterization, {"latent_t_mode": "random", "cycle_latent_t_min": 0.0,
                                                     "cycle_latent_t_max": 0.05}, draws_t=u)
    torch.testing.assert_close(rec, x0.float(), **tol(ctx.oracle_tolerance),
                               msg=lambda m: f"{parameterization}: x0 reconstructed at small t is not the clean latent\n{m}")
    measure(f"{parameterization}_small_t_max_abs_err", float((rec - x0).abs().max()))


def check_gain_at_t1(ctx, measure):
    """The configured parameterization's error gain at t = 1, measured through the trainer."""
    trainer = ctx.cycle()
    param = trainer.latent_diffusion.parameterization
    B, D = ctx.options.batch_size, ctx.latent_dim
    delta = 1e-3 * torch.randn(B, D, generator=torch.Generator().manual_seed(72), dtype=torch.float64)
    exact, x0, metrics = reconstruct(ctx, param, {"latent_t_mode": "full"})
    perturbed, _, _ = reconstruct(ctx, param, {"latent_t_mode": "full"}, perturbation=delta)
    measured_gain = float((perturbed.double() - exact.double()).norm() / delta.norm())
    reported = metrics["x0_error_gain_max"]
    torch.testing.assert_close(torch.tensor(measured_gain), torch.tensor(reported), rtol=0.05, atol=1e-3,
                               msg=lambda m: f"the trainer's x0_error_gain_max differs from the measured gain\n{m}")
    measure(f"{param}_x0_error_gain_t1", measured_gain)
    mode, (w_text, _, _) = trainer.latent_t_mode, trainer.weights["cycle_text"]
    if mode != "full" or w_text <= 0:
        return
    assert measured_gain <= GAIN_INCOMPATIBLE, (
        f"with latent_t_mode=full and cycle_text_weight={w_text}, cycle_text conditions on x0 whose error is "
        f"amplified {measured_gain:.3g}x ({param}, {trainer.latent_diffusion.beta_schedule}): use v_param or x0 "
        "parameterization, or cycle_text_weight=0")
    if measured_gain > GAIN_REVIEW:
        measure("x0_gain_above_10", measured_gain, review=True)


CHECKS = {f"exact_small_t_{p}": (lambda ctx, measure, p=p: check_exact_at_small_t(ctx, measure, p))
          for p in PARAMETERIZATIONS}
CHECKS["gain_at_t1"] = check_gain_at_t1


run_row = row_runner(CHECKS)
test_x0_reconstruction = row_test(CHECKS)
