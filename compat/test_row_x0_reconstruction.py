"""Row: x0 reconstruction.

cycle_text conditions an L2T pass on the x0 the cycle trainer reconstructs from its T2L output.
Checked from the observed passes, for every parameterization: the latents of the cycle_text pass
equal the float64 oracle's x0 from the T2L pass's own latents, t and prediction (x0 from eps, from
v, or the prediction itself), at small t where every parameterization is well conditioned.

At t = 1, where `latent_t_mode: full` puts every T2L pass, the error gain |d x0 / d prediction| is
measured through the trainer (the T2L prediction perturbed, the change of the cycle_text input
observed) and compared with the closed form: 1/sqrt(alphas_cumprod) times sqrt(1 - ab) is about
6.4e4 for epsilon under the cosine schedule, so cycle_text would condition on x0 whose error is
amplified that much. The review's "medium, keep stop-grad" verdict does not survive that: the row
fails when the configured cycle_text is on in full mode and the gain exceeds 100, and asks for
review above 10.
"""

from __future__ import annotations

import pytest
import torch

from compat import oracle
from compat.figure_data import x0_gain_curves
from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.observe import CYCLE_TEXT, T2L
from compat.oracle import tol
from compat.terms import LatentSchedule

pytestmark = pytest.mark.compat_row("x0_reconstruction")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")
GAIN_INCOMPATIBLE = 100.0
GAIN_REVIEW = 10.0
CYCLE_TEXT_ON = row_settings(
    {"cycle_text_weight": 1.0, "cycle_latent_weight": 0.0, "cycle_text_warmup_steps": 0, "cycle_text_ramp_steps": 0}
)
SMALL_T = row_settings(dict(CYCLE_TEXT_ON, latent_t_mode="random", cycle_latent_t_min=0.0, cycle_latent_t_max=0.05))


def check_formula(ctx, measure, parameterization):
    batch = ctx.batch(ctx.options.batch_size, seed=70)
    settings = dict(SMALL_T, **{"model.latent_parameterization": parameterization})
    record = ctx.run_cycle(batch, settings=settings, step=0, draws=ctx.draws(batch, seed=70), grad=False)
    t2l, ct = record.one(T2L), record.one(CYCLE_TEXT)
    schedule = LatentSchedule.of(ctx.cycle_config_for(settings))
    ab = schedule.ab(t2l.timestep("latent"))
    want = oracle.x0_from_prediction(
        t2l.latents_2d.cpu(), t2l.outputs[1].reshape(t2l.batch_size, -1).cpu(), ab, parameterization
    )
    got = ct.latents_2d.double().cpu()
    torch.testing.assert_close(
        got,
        want,
        **tol(ctx.oracle_tolerance),
        msg=lambda m: (
            f"{parameterization}: the x0 fed to cycle_text is not x0 reconstructed "
            f"from the T2L pass's latents, t and prediction\n{m}"
        ),
    )
    measure(f"{parameterization}_max_abs_err", float((got - want).abs().max()))


class PerturbedT2L(torch.nn.Module):
    """The model, with `delta` [B, D] added to the latent prediction of the base T2L pass (the first
    pass given the clean text): how the cycle trainer's x0 responds shows its error gain."""

    def __init__(self, inner, clean_ids, delta):
        super().__init__()
        self.inner, self.clean_ids, self.delta, self.done = inner, clean_ids, delta, False

    def forward(self, text_tokens, latents, text_timesteps, latent_timesteps, attention_mask=None):
        out = list(
            self.inner(
                text_tokens=text_tokens,
                latents=latents,
                text_timesteps=text_timesteps,
                latent_timesteps=latent_timesteps,
                attention_mask=attention_mask,
            )
        )
        if not self.done and self.delta is not None and torch.equal(text_tokens, self.clean_ids):
            self.done = True
            out[1] = out[1] + self.delta.reshape(out[1].shape).to(out[1])
        return tuple(out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def measured_gain(ctx, settings: dict) -> tuple[float, torch.Tensor]:
    """|change of the cycle_text input| / |change of the T2L prediction| at the configured
    parameterization in full mode, and the T2L pass's t."""
    batch = ctx.batch(ctx.options.batch_size, seed=72)
    draws = ctx.draws(batch, seed=72)
    B = batch["input_ids"].shape[0]
    delta = 1e-3 * torch.randn(B, ctx.latent_dim, generator=torch.Generator().manual_seed(72))
    inputs = []
    for d in (None, delta):
        model = PerturbedT2L(ctx.semantic_model(), batch["input_ids"], d)
        record = ctx.run_cycle(batch, settings=settings, step=0, draws=draws, model=model, grad=False)
        inputs.append(record.one(CYCLE_TEXT).latents_2d.double().cpu())
    return float((inputs[1] - inputs[0]).norm() / delta.double().norm()), record.one(T2L).timestep("latent")


def check_gain_at_t1(ctx, measure):
    """The configured parameterization's error gain at t = 1, measured through the trainer."""
    config = ctx.cycle_config_for()
    schedule = LatentSchedule.of(config)
    gain, t = measured_gain(ctx, dict(CYCLE_TEXT_ON, latent_t_mode="full"))
    measure("x0_gain", x0_gain_curves(schedule, float(t.max()), gain, GAIN_REVIEW, GAIN_INCOMPATIBLE), figure=True)
    ab = schedule.ab(t)
    closed = {"epsilon": ((1 - ab).sqrt() / ab.sqrt()), "v_param": (1 - ab).sqrt(), "x0": torch.ones_like(ab)}[
        schedule.parameterization
    ].max()
    torch.testing.assert_close(
        torch.tensor(gain, dtype=torch.float64),
        closed,
        rtol=0.05,
        atol=1e-3,
        msg=lambda m: (
            f"the measured x0 error gain differs from the closed form for "
            f"{schedule.parameterization}/{schedule.beta_schedule} at t = 1\n{m}"
        ),
    )
    measure(f"{schedule.parameterization}_x0_error_gain_t1", gain, headline=True)
    mode, w_text = str(config.loss.latent_t_mode), float(config.loss.cycle_text_weight)
    if mode not in ("full", "ones", "t1") or w_text <= 0:
        return
    assert gain <= GAIN_INCOMPATIBLE, (
        f"with latent_t_mode={mode} and cycle_text_weight={w_text}, cycle_text conditions on x0 whose error is "
        f"amplified {gain:.3g}x ({schedule.parameterization}, {schedule.beta_schedule}): use v_param or x0 "
        "parameterization, or cycle_text_weight=0"
    )
    if gain > GAIN_REVIEW:
        measure("x0_gain_above_10", gain, review=True)


CHECKS = {
    "control_sensitivity": sensitivity_control("latent_t", "latents"),
    **{f"formula_{p}": (lambda ctx, measure, p=p: check_formula(ctx, measure, p)) for p in PARAMETERIZATIONS},
}
CHECKS["gain_at_t1"] = check_gain_at_t1


run_row = row_runner(CHECKS)
test_x0_reconstruction = row_test(CHECKS)
