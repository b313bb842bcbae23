"""Row: recommended settings (review section 5).

For a first run that reuses stable-trained weights the review recommends: `loss.latent_t_mode:
full` (the stable T2L only ever trained at t = 1), small cycle weights (`cycle_text_weight` and
`cycle_latent_weight` 0.1) ramped in (`*_ramp_steps` N > 0; a warmup is fine too), and
`loss.cycle_stop_grad_latent: true`. Checked on the cycle config under test as the settings schema
resolves it (a key left out takes the schema's default, which states it), and on what the trainer
built from it does; it runs also when the checkpoint does not load (a fresh model of the
configured layout then drives the trainer):

- latent_t_mode other than full fails the row (a timestep distribution shift for pretrained reuse);
- a cycle weight above 0.1, a term with weight > 0 and no ramp, and stop-grad off are each reported
  as a measured deviation (REVIEW);
- the trainer honours the config: at a step inside the ramps its loss is the oracle's with the
  ramped weights, its noised passes get t = 1 in full mode, and the x0 it feeds cycle_text carries
  no graph when stop-grad is on (observed); a trainer that ignores a key fails the row.
"""

from __future__ import annotations

import pytest
import torch

from compat.figure_data import weight_schedule
from compat.harness import row_runner, row_test
from compat.observe import CYCLE_LATENT, CYCLE_TEXT, T2L
from compat.oracle import tol
from compat.outcomes import expect, expect_close
from compat.terms import cycle_terms
from latentDLM_mmdit.settings import FULL_T_MODES

pytestmark = pytest.mark.compat_row("recommended_settings")

SMALL_WEIGHT = 0.1
TERMS = ("cycle_text", "cycle_latent")


def loss_settings(ctx):
    return ctx.cycle_config_for().loss


def model_for_settings(ctx):
    """The settings need no pretrained weights: the semantics rows' model (for a full-size checkpoint
    the proxy, so that no autograd graph is built over the full model), or, when the checkpoint did not
    load, a fresh proxy of the configured layout."""
    return ctx.semantic_model() if ctx.loaded and not ctx.nonfinite else ctx.proxy_model()


def check_latent_t_mode(ctx, measure):
    mode = str(loss_settings(ctx).latent_t_mode)
    measure("latent_t_mode", mode)
    expect(
        mode in FULL_T_MODES,
        f"loss.latent_t_mode is {mode!r}: the cycle T2L passes see t < 1 while the pretrained stable T2L only "
        "trained at t = 1 (a distribution shift)",
        "set loss.latent_t_mode: full (review section 5)",
    )
    if mode != "full":
        measure(
            "latent_t_mode_spelling",
            f"loss.latent_t_mode {mode!r} is an alias of full: write 'full', as the review does",
            review=True,
        )


def check_cycle_weights_small(ctx, measure):
    loss = loss_settings(ctx)
    for term in TERMS:
        base = float(loss[f"{term}_weight"])
        measure(f"{term}_weight", base)
        if base > SMALL_WEIGHT:
            measure(
                f"{term}_weight_not_small",
                f"loss.{term}_weight {base:g} is above the review's starting {SMALL_WEIGHT:g}: start at "
                f"{SMALL_WEIGHT:g} (review section 5)",
                review=True,
            )


def check_ramps(ctx, measure):
    loss = loss_settings(ctx)
    for term in TERMS:
        base, warmup, ramp = (
            float(loss[f"{term}_weight"]),
            int(loss[f"{term}_warmup_steps"]),
            int(loss[f"{term}_ramp_steps"]),
        )
        measure(f"{term}_warmup_steps", warmup)
        measure(f"{term}_ramp_steps", ramp)
        if base > 0 and ramp <= 0:
            measure(
                f"{term}_no_ramp",
                f"loss.{term}_weight {base:g} applies in full from step {warmup}: ramp it in with "
                f"loss.{term}_ramp_steps (review section 5)",
                review=True,
            )


def check_stop_grad(ctx, measure):
    stop = bool(loss_settings(ctx).cycle_stop_grad_latent)
    measure("cycle_stop_grad_latent", stop)
    if not stop:
        measure(
            "stop_grad_off",
            "x0 from the T2L prediction is not detached in cycle_text: keep loss.cycle_stop_grad_latent true "
            "(review section 5)",
            review=True,
        )


def check_trainer_honours_config(ctx, measure):
    """The trainer built from the config does what the config says, observed in a step mid-ramp."""
    loss = loss_settings(ctx)
    config = ctx.cycle_config_for()
    ramp_ends = [int(loss[f"{t}_warmup_steps"]) + max(1, int(loss[f"{t}_ramp_steps"])) for t in TERMS]
    step = max(1, min(ramp_ends) - 1) if ctx.cycle_subject.spec.accepts_step else None
    batch = ctx.batch(2, seed=120)
    record = ctx.run_cycle(
        batch, config=config, step=step, draws=ctx.draws(batch, seed=120), model=model_for_settings(ctx), grad=True
    )
    record.loss = record.loss.detach()  # the graph was for what requires grad (recorded): not kept for the rest
    terms = cycle_terms(record, batch, config, step, ctx.x0_of(batch), ctx.oracle_tolerance)
    measure("config_weights", weight_schedule(loss, step, terms.weights), figure=True)
    expect_close(
        record.loss.detach().double().cpu(),
        terms.total,
        **tol(ctx.oracle_tolerance),
        problem=f"at step {step} the cycle trainer's loss is not the one its config gives: it reads a setting "
        "(a weight, warmup or ramp) from the wrong key or ignores it",
        fix="read loss.cycle_text_* and loss.cycle_latent_* each from its own key",
        details=f"weights the config gives at step {step}: {terms.weights}",
    )
    if str(loss.latent_t_mode) in FULL_T_MODES:
        for p in record.passes:
            if p.kind in (T2L, CYCLE_LATENT):
                expect(
                    torch.equal(p.timestep("latent"), torch.ones(p.batch_size)),
                    f"with loss.latent_t_mode full the cycle trainer's {p.kind} pass gets t "
                    f"{p.timestep('latent').tolist()}",
                    "give every noised pass t = 1 in full mode",
                )
    if record.has(CYCLE_TEXT) and terms.weights["cycle_text"] > 0:
        graph = record.one(CYCLE_TEXT).latents_require_grad
        expect(
            graph == (not bool(loss.cycle_stop_grad_latent)),
            f"with loss.cycle_stop_grad_latent {bool(loss.cycle_stop_grad_latent)} the x0 fed to cycle_text "
            f"{'carries' if graph else 'lacks'} an autograd graph",
            "detach x0 exactly when cycle_stop_grad_latent is true",
        )
    if step is None:
        measure(
            "trainer_takes_step",
            "no: its cycle weights stay at their base values; the ramps cannot apply",
            review=any(int(loss[f"{t}_ramp_steps"]) > 0 for t in TERMS),
        )
    measure(
        "trainer_honours_config",
        f"yes (weights at step {step}: " + ", ".join(f"{t} {terms.weights[t]:g}" for t in TERMS) + ")",
    )


CHECKS = {
    "latent_t_mode": check_latent_t_mode,
    "cycle_weights_small": check_cycle_weights_small,
    "ramps": check_ramps,
    "stop_grad": check_stop_grad,
    "trainer_honours_config": check_trainer_honours_config,
}


run_row = row_runner(CHECKS)
test_recommended_settings = row_test(CHECKS)
