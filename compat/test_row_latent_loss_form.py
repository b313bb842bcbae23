"""Row: latent loss form.

Both trainers must compute the T2L latent loss as the MSE between the L2-normalised prediction
and the L2-normalised target of the parameterization, scaled by `loss.latent_loss_weight` in the
total. Checked for every parameterization and schedule from the observed T2L pass: the float64
oracle rebuilds the target from x0, the pass's own t and the noise it is shown to have used, and
each trainer's returned loss must be `latent_loss_weight x` that term (stable t2l) or
`latent_loss_weight x T2L + L2T` (the cycle trainer with its cycle terms weighted 0).
"""

from __future__ import annotations

import pytest

from compat import oracle
from compat.harness import row_runner, row_test, sensitivity_control
from compat.observe import L2T, T2L
from compat.oracle import tol
from compat.outcomes import expect_close
from compat.terms import LatentSchedule, latent_term

pytestmark = pytest.mark.compat_row("latent_loss_form")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")
SCHEDULES = ("cosine", "linear", "sigmoid")
WEIGHT = 0.25  # not the default 0.1, so a hard-coded weight shows


def check_loss_form(ctx, measure, parameterization: str, schedule: str):
    batch = ctx.batch(ctx.options.batch_size, seed=50)
    draws = ctx.draws(batch, seed=50)
    latent = {
        "model.latent_parameterization": parameterization,
        "model.latent_beta_schedule": schedule,
        "latent_loss_weight": WEIGHT,
    }
    stable = ctx.run_stable("t2l", batch, settings=latent, draws=draws)
    cycle = ctx.run_cycle(
        batch,
        settings={"latent_t_mode": "full", "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0, **latent},
        draws=draws,
    )
    config = ctx.cycle_config_for(latent)
    sched = LatentSchedule.of(config)
    if (sched.parameterization, sched.beta_schedule) != (parameterization, schedule):  # the row's own settings
        raise RuntimeError(f"the row asked for {parameterization}/{schedule}, the config resolves to {sched}")
    x0 = ctx.x0_of(batch)
    label = f"{parameterization}/{schedule}"
    stable_term, _ = latent_term(stable, stable.one(T2L), x0, sched, ctx.oracle_tolerance)
    cycle_term, _ = latent_term(cycle, cycle.one(T2L), x0, sched, ctx.oracle_tolerance)
    l2t = oracle.ce_every_position(cycle.one(L2T).outputs[0].cpu(), batch["input_ids"].cpu())
    expect_close(
        stable.loss.detach().double().cpu(),
        WEIGHT * stable_term,
        **tol(ctx.oracle_tolerance),
        problem=f"the stable reference's t2l loss is not latent_loss_weight x the normalised MSE to the {label} target",
        fix="L2-normalise prediction and target per sample (eps 1e-8), MSE, clamp to [0, 10], times latent_loss_weight",
    )
    expect_close(
        cycle.loss.detach().double().cpu(),
        WEIGHT * cycle_term + l2t,
        **tol(ctx.oracle_tolerance),
        problem=f"the cycle trainer's loss is not latent_loss_weight x T2L + L2T for {label} (its T2L term is "
        "not the normalised MSE to the target)",
        fix="L2-normalise prediction and target per sample (eps 1e-8) before the MSE, as stable t2l does",
    )
    expect_close(
        cycle_term,
        stable_term,
        **tol("float32_loss"),
        problem=f"the cycle trainer's T2L latent loss differs from stable t2l's for {label}",
        fix="compute the T2L term exactly as stable t2l does (same target, normalisation and reduction)",
    )
    measure(f"{parameterization}_{schedule}", float(stable_term))


CHECKS = {
    "control_sensitivity": sensitivity_control("latent_t", "latents"),
    **{
        f"{p}-{s}": (lambda ctx, measure, p=p, s=s: check_loss_form(ctx, measure, p, s))
        for p in PARAMETERIZATIONS
        for s in SCHEDULES
    },
}


run_row = row_runner(CHECKS)
test_latent_loss_form = row_test(CHECKS)
