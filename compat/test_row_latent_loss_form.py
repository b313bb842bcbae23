"""Row: latent loss form.

Both trainers must compute the T2L latent loss as the MSE between the L2-normalised prediction
and the L2-normalised target of the parameterization, scaled by `loss.latent_loss_weight` in the
total. Checked for every parameterization and schedule against an independent oracle (target
rebuilt from x0, the injected noise and a float64 alphas_cumprod), on the same batch and noise.
"""
from __future__ import annotations

import pytest
import torch

from compat import oracle
from compat.harness import CallRecorder, row_runner, row_test
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("latent_loss_form")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")
SCHEDULES = ("cosine", "linear", "sigmoid")
WEIGHT = 0.25  # not the default 0.1, so a hard-coded weight shows


def check_loss_form(ctx, measure, parameterization: str, schedule: str):
    model = ctx.semantic_model()
    batch = ctx.batch(ctx.options.batch_size, seed=50)
    noise = ctx.noise(batch, seed=50)
    settings = {"model.latent_parameterization": parameterization, "model.latent_beta_schedule": schedule,
                "latent_loss_weight": WEIGHT}
    spy = CallRecorder(model)
    stable_loss, stable = ctx.stable("t2l", model=spy, **settings)(batch, draws={"latent_noise": noise})
    stable_pred = spy.outputs[-1][1]
    spy = CallRecorder(model)
    cycle_loss, cycle = ctx.cycle(model=spy, latent_t_mode="full", cycle_text_weight=0.0, cycle_latent_weight=0.0,
                                  **settings)(batch, draws={"latent_noise": noise})
    cycle_pred = spy.outputs[0][1]

    T = int(ctx.cycle_config.model.get("latent_timesteps", 1000))
    ab = oracle.alphas_cumprod(schedule, T)[oracle.timestep_index(torch.ones(batch["latent"].shape[0]), T)]
    x0 = ctx.as_fed(batch["latent"].reshape(batch["latent"].shape[0], -1))
    target = oracle.target(x0, ctx.as_fed(noise), ab, parameterization)
    want_stable = oracle.normalized_mse(stable_pred.cpu(), target)
    want_cycle = oracle.normalized_mse(cycle_pred.cpu(), target)
    label = f"{parameterization}/{schedule}"
    for name, got, want in (("stable latent_loss", stable["latent_loss"], want_stable),
                            ("cycle base_t2l_latent_loss", cycle["base_t2l_latent_loss"], want_cycle)):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, **tol(ctx.oracle_tolerance),
                                   msg=lambda m, n=name: f"{label}: {n} is not the normalised MSE to the target\n{m}")
    torch.testing.assert_close(torch.tensor(cycle["base_t2l_latent_loss"]), torch.tensor(stable["latent_loss"]),
                               **tol("float32_loss"), msg=lambda m: f"{label}: latent loss differs between trainers\n{m}")
    # The weight: stable t2l total = w * latent; cycle total = w * T2L + L2T (cycle terms off).
    torch.testing.assert_close(stable_loss.detach().double().cpu(), WEIGHT * want_stable, **tol(ctx.oracle_tolerance),
                               msg=lambda m: f"{label}: stable total is not latent_loss_weight x latent loss\n{m}")
    torch.testing.assert_close(cycle_loss.detach().double().cpu() - cycle["base_l2t_text_loss"], WEIGHT * want_cycle,
                               **tol(ctx.oracle_tolerance),
                               msg=lambda m: f"{label}: cycle total is not latent_loss_weight x T2L + L2T\n{m}")
    measure(f"{parameterization}_{schedule}", stable["latent_loss"])


CHECKS = {f"{p}-{s}": (lambda ctx, measure, p=p, s=s: check_loss_form(ctx, measure, p, s))
          for p in PARAMETERIZATIONS for s in SCHEDULES}


run_row = row_runner(CHECKS)
test_latent_loss_form = row_test(CHECKS)
