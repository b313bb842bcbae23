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

import dataclasses

import pytest
import torch

from compat import oracle
from compat.figure_data import x0_gain_curves
from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.observe import CYCLE_TEXT, T2L
from compat.oracle import derived_tol, tol
from compat.outcomes import control_failed, expect, expect_close
from compat.terms import LatentSchedule
from latentDLM_mmdit.settings import FULL_T_MODES

pytestmark = pytest.mark.compat_row("x0_reconstruction")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")
X0_FORMULAS = {
    "epsilon": "x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)",
    "v_param": "x0 = sqrt(ab) x_t - sqrt(1 - ab) v",
    "x0": "x0 = the prediction",
}
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
    expect_close(
        got,
        want,
        **tol(ctx.oracle_tolerance),
        problem=f"the x0 the cycle trainer feeds to cycle_text is not the x0 that the {parameterization} "
        "parameterization gives from the T2L pass's latents, t and prediction",
        fix=f"reconstruct x0 with the {parameterization} formula ({X0_FORMULAS[parameterization]})",
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


# The perturbation of the T2L prediction, relative to the prediction's norm: at least this, and large
# enough that the fed x0's rounding (`x0_gain_measurement`) is at most MEASUREMENT_RTOL of the change.
DELTA_MIN = 1e-3
MEASUREMENT_RTOL = 0.01


def closed_form_gain(schedule: LatentSchedule, t: torch.Tensor) -> torch.Tensor:
    """|d x0 / d prediction| of the configured parameterization at t [B] (float64)."""
    ab = schedule.ab(t)
    gains = {"epsilon": (1 - ab).sqrt() / ab.sqrt(), "v_param": (1 - ab).sqrt(), "x0": torch.ones_like(ab)}
    return gains[schedule.parameterization]


def fed_x0(ctx, batch, settings, draws, delta=None):
    """The cycle step's record and the x0 it fed to cycle_text (float64), the T2L prediction
    perturbed by `delta` [B, D] (None: as the model gave it)."""
    model = PerturbedT2L(ctx.semantic_model(), batch["input_ids"], delta)
    record = ctx.run_cycle(batch, settings=settings, step=0, draws=draws, model=model, grad=False)
    return record, record.one(CYCLE_TEXT)


def measured_gain(ctx, settings: dict, schedule: LatentSchedule) -> dict:
    """The x0 error gain measured through the trainer at the configured parameterization in full
    mode, |change of the cycle_text input| / |change of the T2L prediction|, with a perturbation
    sized to the dtype x0 is fed in (`x0_gain_measurement`); the closed form at the t the trainer
    fed; and what the measurement's bound needs."""
    batch = ctx.batch(ctx.options.batch_size, seed=72)
    draws = ctx.draws(batch, seed=72)
    record, base = fed_x0(ctx, batch, settings, draws)
    t = record.one(T2L).timestep("latent")
    closed = float(closed_form_gain(schedule, t).max())
    prediction = record.one(T2L).outputs[1].reshape(base.batch_size, -1).double().cpu()  # [B, D]
    x0 = base.latents_2d.double().cpu()  # [B, D]
    u = oracle.unit_roundoff(base.latents_2d.dtype)
    # ||delta|| such that 2 n_ops u ||x0|| / (gain ||delta||) = MEASUREMENT_RTOL (n_ops 4), at least DELTA_MIN ||pred||
    delta_norm = max(DELTA_MIN * float(prediction.norm()), 8 * u * float(x0.norm()) / (closed * MEASUREMENT_RTOL))
    direction = torch.randn(prediction.shape, generator=torch.Generator().manual_seed(72), dtype=torch.float64)
    delta = (direction * (delta_norm / float(direction.norm()))).float()  # [B, D], added to the float32 output
    _, perturbed = fed_x0(ctx, batch, settings, draws, delta)
    change = perturbed.latents_2d.double().cpu() - x0
    return {
        "gain": float(change.norm() / delta.double().norm()),
        "closed": closed,
        "t": t,
        "x0_norm": max(float(x0.norm()), float(perturbed.latents_2d.double().norm())),
        "delta_norm": float(delta.double().norm()),
        "fed_dtype": base.latents_2d.dtype,
    }


def check_gain_at_t1(ctx, measure):
    """The configured parameterization's error gain at t = 1, measured through the trainer; the
    measurement agreeing with the closed form is the row's control of itself."""
    config = ctx.cycle_config_for()
    schedule = LatentSchedule.of(config)
    m = measured_gain(ctx, dict(CYCLE_TEXT_ON, latent_t_mode="full"), schedule)
    gain, closed = m["gain"], m["closed"]
    measure(
        "x0_gain",
        x0_gain_curves(schedule, float(m["t"].max()), gain, GAIN_REVIEW, GAIN_INCOMPATIBLE),
        figure=True,
    )
    bound = derived_tol(
        "x0_gain_measurement", dtype=m["fed_dtype"], x0_norm=m["x0_norm"], delta_norm=m["delta_norm"], gain=gain
    )
    label = f"{schedule.parameterization}/{schedule.beta_schedule}"
    measure(
        f"{schedule.parameterization}_x0_error_gain_t1",
        f"{gain:.4g} measured, {closed:.4g} closed form (x0 fed in {str(m['fed_dtype']).removeprefix('torch.')}, "
        f"measurement rtol {bound['rtol']:.2g})",
        headline=True,
    )
    if not abs(gain - closed) <= bound["atol"] + bound["rtol"] * closed:
        control_failed(
            f"the x0 error gain measured through the cycle trainer, {gain:.4g}, differs from the closed form "
            f"for {label} at the t it fed ({closed:.4g}) by more than the measurement's rounding bound "
            f"({bound['rtol']:.2g}, x0_gain_measurement): the trainer does not reconstruct x0 as the "
            "parameterization says at t = 1, or the perturbation did not reach the cycle_text pass"
        )
    mode, w_text = str(config.loss.latent_t_mode), float(config.loss.cycle_text_weight)
    if mode not in FULL_T_MODES or w_text <= 0:
        measure("x0_gain_applies", f"no: latent_t_mode={mode}, cycle_text_weight={w_text:g}")
        return
    v_gain = float(closed_form_gain(dataclasses.replace(schedule, parameterization="v_param"), m["t"]).max())
    expect(
        gain <= GAIN_INCOMPATIBLE,
        f"cycle_text conditions on an x0 whose error is amplified {gain:.2g}x at t = 1 ({label}, "
        f"latent_t_mode={mode}, cycle_text_weight={w_text:g})",
        f"set model.latent_parameterization to v_param (gain {v_gain:.2g}) or x0 (gain 1), or loss.cycle_text_weight "
        "to 0",
        f"measured {gain:.4g}, closed form {closed:.4g}, above {GAIN_INCOMPATIBLE:g}",
    )
    if gain > GAIN_REVIEW:
        measure(
            "x0_gain_above_10",
            f"cycle_text conditions on an x0 whose error is amplified {gain:.3g}x at t = 1 ({label}): consider "
            "v_param or x0 parameterization",
            review=True,
        )


CHECKS = {
    "control_sensitivity": sensitivity_control("latent_t", "latents"),
    **{f"formula_{p}": (lambda ctx, measure, p=p: check_formula(ctx, measure, p)) for p in PARAMETERIZATIONS},
}
CHECKS["gain_at_t1"] = check_gain_at_t1


run_row = row_runner(CHECKS)
test_x0_reconstruction = row_test(CHECKS)
