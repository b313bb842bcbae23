"""Row: T2L latent timestep.

Stable T2L trains at latent t = 1 only, so a pretrained T2L path has only ever seen full noise.
The cycle trainer's `loss.latent_t_mode` decides what its noised passes (base T2L and
cycle_latent) see. Checked from the observed passes:

- stable t2l gives the model latent t = 1.0 exactly, text t = 0, and latents noised at t = 1 with
  the drawn noise;
- the configured cycle trainer over several steps, with its own draws (or the harness's, served):
  in `full` every noised pass gets t = 1.0 exactly (a t of 0.999 or of 500 is a shift); `random` is
  a distribution shift for pretrained reuse, reported with its statistics and failing the row;
- what `random` gives, for the report: t inside [cycle_latent_t_min, min(cycle_latent_t_max, 0.9999)],
  equal to t_min + (t_max - t_min) u for the draws u where the trainer takes them by name;
- in full mode the cycle trainer's T2L latent loss equals the stable one on the same batch and
  noise, on the checkpoint's own model.
"""

from __future__ import annotations

import pytest
import torch

from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.observe import CYCLE_LATENT, T2L
from compat.oracle import tol
from compat.outcomes import expect, expect_close
from compat.subjects import INJECTED
from compat.terms import LatentSchedule, latent_term
from latentDLM_mmdit.settings import FULL_T_MODES

pytestmark = pytest.mark.compat_row("t2l_latent_timestep")
STEPS = 6
LATENT_T_CAP = 0.9999  # upstream's clamp of random t below 1
# Both noised passes made, no ramp.
BOTH_NOISED = row_settings(
    {
        "cycle_text_weight": 0.1,
        "cycle_latent_weight": 0.1,
        "cycle_text_warmup_steps": 0,
        "cycle_text_ramp_steps": 0,
        "cycle_latent_warmup_steps": 0,
        "cycle_latent_ramp_steps": 0,
    }
)
RANDOM = row_settings(dict(BOTH_NOISED, latent_t_mode="random", cycle_latent_t_min=0.2, cycle_latent_t_max=0.7))
BASE_ONLY = row_settings({"latent_t_mode": "full", "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0})


def noised_timesteps(ctx, settings: dict, steps: int = STEPS, with_draws: bool = False) -> tuple[torch.Tensor, list]:
    """Every latent t the cycle trainer's noised passes used over `steps` steps, and the records."""
    ts, records = [], []
    for step in range(steps):
        batch = ctx.batch(ctx.options.batch_size, seed=40 + step)
        draws = ctx.draws(batch, seed=40 + step) if with_draws else None
        record = ctx.run_cycle(
            batch, settings=settings, step=10_000 + step, draws=draws, seed=40 + step, grad=False, outputs=False
        )
        noised = [p for p in record.passes if p.kind in (T2L, CYCLE_LATENT)]
        expect(
            bool(noised),
            f"the cycle step makes no noised T2L pass (its passes: {record.kinds})",
            "make the base T2L pass (clean text, latents noised at t_lat)",
        )
        ts += [p.timestep("latent") for p in noised]
        records.append((batch, draws, record.release_outputs()))  # the timesteps are inputs: kept
    return torch.cat(ts), records


def check_stable_uses_t1(ctx, measure):
    batch = ctx.batch(ctx.options.batch_size, seed=41)
    record = ctx.run_stable("t2l", batch, draws=ctx.draws(batch, seed=41))
    p = record.one(T2L)
    measure("stable_latent_t", p.timestep("latent").tolist(), figure=True)
    expect_close(
        p.timestep("latent"),
        torch.ones(batch["input_ids"].shape[0]),
        **tol("bit_exact"),
        problem="the stable reference's t2l pass does not noise the latents at t = 1",
        fix="the stable trainer under test must train T2L at latent t = 1 (upstream's stable t2l)",
    )
    expect_close(
        p.timestep("text"),
        torch.zeros(batch["input_ids"].shape[0]),
        **tol("bit_exact"),
        problem="the stable reference's t2l pass does not give the clean text t = 0",
        fix="the stable trainer under test must give the clean text t = 0 (upstream's stable t2l)",
    )
    schedule = LatentSchedule.of(ctx.stable_config_for("t2l"))
    name, _ = record.noise_of(
        p, ctx.x0_of(batch), schedule.alphas_cumprod, schedule.num_timesteps, ctx.oracle_tolerance
    )
    expect(
        name == "latent_noise",
        f"the stable reference's t2l pass noised its latents with {name}, not the latent_noise draw it was given",
        "draw the T2L noise as the stable trainer's protocol names it (latent_noise)",
    )
    measure("stable_t", 1.0)


def check_cycle_distribution(ctx, measure):
    """The configured cycle trainer's noised passes see exactly the stable point mass at 1."""
    mode = str(ctx.cycle_config_for().loss.latent_t_mode)
    ts, _ = noised_timesteps(ctx, BOTH_NOISED)
    measure("cycle_latent_t_mode", mode)
    measure("cycle_t_mean", float(ts.mean()))
    not_one = ts != 1.0
    share = float(not_one.float().mean())
    measure("cycle_t_share_not_1", share, headline=True)
    measure("cycle_latent_t", {"mode": mode, "t": ts.tolist()}, figure=True)
    full = mode in FULL_T_MODES
    expect(
        share == 0.0,
        f"the cycle trainer's noised T2L passes see latent t != 1 in {share:.0%} of samples while the pretrained "
        "stable T2L only trained at t = 1 (a distribution shift)",
        "make the cycle trainer honour loss.latent_t_mode=full (t = 1 for every noised pass)"
        if full
        else f"set loss.latent_t_mode: full (it is {mode})",
        f"mean t {float(ts.mean()):.4g}, min {float(ts.min()):.4g}, max {float(ts.max()):.4g}",
    )


def check_random_mode_is_a_shift(ctx, measure):
    """What `random` gives: t within its bounds (and from the draws, where injected), for the report."""
    ts, records = noised_timesteps(ctx, RANDOM, steps=2, with_draws=True)
    low, high = RANDOM["cycle_latent_t_min"], min(RANDOM["cycle_latent_t_max"], LATENT_T_CAP)
    measure("random_mode_t_mean", float(ts.mean()))
    measure("random_mode_latent_t", {"t": ts.tolist(), "t_min": low, "t_max": high}, figure=True)
    expect(
        float(ts.min()) >= low - 1e-6 and float(ts.max()) <= high + 1e-6,
        f"with latent_t_mode random the cycle trainer draws t from {float(ts.min()):.4g} to {float(ts.max()):.4g}, "
        f"outside loss.cycle_latent_t_min/t_max [{low}, {high}]",
        "draw t in [cycle_latent_t_min, cycle_latent_t_max] (clamped below 0.9999)",
    )
    expect(
        float((ts < 1).float().mean()) > 0.9,
        "with latent_t_mode random the cycle trainer still gives t = 1 to most samples",
        "draw t from U[cycle_latent_t_min, cycle_latent_t_max] in random mode",
    )
    for _batch, draws, record in records:
        if record.draw_mode != INJECTED:
            continue
        for kind, name in ((T2L, "latent_t"), (CYCLE_LATENT, "cycle_latent_t")):
            want = (low + (RANDOM["cycle_latent_t_max"] - low) * draws[name]).clamp(max=LATENT_T_CAP)
            expect_close(
                record.one(kind).timestep("latent"),
                ctx.as_fed(want),  # rounded to training.dtype, as the trainer feeds it (bf16 on a cluster config)
                **tol("float32_loss"),
                problem=f"in random mode the cycle trainer's {kind} pass t is not t_min + (t_max - t_min) u for its "
                f"{name} draw u",
                fix="map the uniform draw to [cycle_latent_t_min, cycle_latent_t_max] linearly",
            )


def check_full_matches_stable_loss(ctx, measure):
    batch = ctx.batch(ctx.options.batch_size, seed=42)
    draws = ctx.draws(batch, seed=42)
    model = ctx.pretrained_or_proxy()  # the checkpoint's T2L path
    measure("full_mode_model", ctx.pretrained_note)
    stable = ctx.run_stable("t2l", batch, draws=draws, model=model, grad=False)
    cycle = ctx.run_cycle(batch, settings=BASE_ONLY, draws=draws, model=model, grad=False)
    expect_close(
        cycle.one(T2L).outputs[1],
        stable.one(T2L).outputs[1],
        **tol("bit_exact"),
        problem="in full mode the cycle trainer's T2L prediction differs from stable t2l's on the same batch and noise",
        fix="call the model for T2L with exactly stable t2l's inputs (x_t in float32, t = 1, t_text = 0, the mask)",
    )
    schedule = LatentSchedule.of(ctx.cycle_config_for(BASE_ONLY))
    x0 = ctx.x0_of(batch)
    cycle_term, noise_name = latent_term(cycle, cycle.one(T2L), x0, schedule, ctx.oracle_tolerance)
    stable_term, _ = latent_term(stable, stable.one(T2L), x0, schedule, ctx.oracle_tolerance)
    expect_close(
        cycle_term,
        stable_term,
        **tol("float32_loss"),
        problem="in full mode the cycle trainer's T2L latent loss differs from stable t2l's",
        fix="compute the T2L term as stable t2l does (normalised MSE to the configured target)",
    )
    measure("t2l_latent_loss", float(stable_term))
    measure("t2l_noise", noise_name)


CHECKS = {
    "control_sensitivity": sensitivity_control("latent_t", "text_t"),
    "stable_uses_t1": check_stable_uses_t1,
    "cycle_distribution": check_cycle_distribution,
    "random_mode_is_a_shift": check_random_mode_is_a_shift,
    "full_matches_stable_loss": check_full_matches_stable_loss,
}


run_row = row_runner(CHECKS)
test_t2l_latent_timestep = row_test(CHECKS)
