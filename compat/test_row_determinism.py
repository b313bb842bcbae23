"""Row: determinism.

The same seed must give bit-identical losses, or no comparison between the trainers (and no resumed
or multi-process run) can be trusted. Checked with no draws given (each trainer draws for itself),
on the same batches, by observing what the model is given:

- two fresh stable trainers in unconditional mode (which draws text t, latent t, the mask uniforms
  and the noise), and two fresh cycle trainers in random latent_t_mode with categorical pseudo
  tokens and both cycle weights > 0 (every draw the cycle trainer has), and in full mode, each over
  3 steps: bit-identical losses and bit-identical model inputs (tokens, latents, timesteps);
- a trainer that draws from its own generator leaves the global RNG states (torch, CUDA when used,
  Python `random`, NumPy) unchanged; one that draws from the global RNG is judged through the draws
  the harness captures and serves it (then it is deterministic by construction), and the row says so
  (REVIEW): on a cluster its numbers depend on everything else that draws;
- another `training.seed` gives other losses (the seed reaches the trainer's generator).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.observe import T2L
from compat.outcomes import control_failed, expect
from compat.subjects import CAPTURED

pytestmark = pytest.mark.compat_row("determinism")

STEPS = 3
SEED = 110
BATCH = 2
CYCLE_RANDOM = row_settings(
    dict(
        latent_t_mode="random",
        cycle_latent_sampling="categorical",
        cycle_text_weight=0.5,
        cycle_latent_weight=0.5,
        cycle_text_warmup_steps=0,
        cycle_text_ramp_steps=0,
        cycle_latent_warmup_steps=0,
        cycle_latent_ramp_steps=0,
        cycle_latent_t_min=0.1,
        cycle_latent_t_max=0.9,
    )
)
CYCLE_FULL = row_settings(dict(CYCLE_RANDOM, latent_t_mode="full", cycle_latent_sampling="argmax"))


def global_rng_state(ctx) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def changed_rngs(before: dict, after: dict) -> list[str]:
    changed = []
    for name in before:
        a, b = before[name], after[name]
        if name == "numpy":
            same = a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])
        elif torch.is_tensor(a):
            same = torch.equal(a, b)
        else:
            same = a == b
        if not same:
            changed.append(name)
    return changed


def run_steps(ctx, run, steps: int = STEPS) -> list:
    """The records of `steps` steps of ONE fresh trainer (its state carried from step to step)."""
    records, previous = [], None
    for step in range(steps):
        record = run(ctx.batch(BATCH, seed=SEED + step), step, previous)
        records.append(record.release_outputs())  # losses and inputs are compared, not outputs
        previous = record
    return records


def inputs_of(record) -> list[torch.Tensor]:
    out = []
    for p in record.passes:
        out += [p.text_tokens, p.latents] + [t for t in (p.text_t, p.latent_t) if t is not None]
    return out


def trainer_of(label: str) -> str:
    return "stable trainer" if label.startswith("stable") else "cycle trainer"


def twice(ctx, measure, label: str, run) -> list:
    before = global_rng_state(ctx)
    first = run_steps(ctx, run)
    second = run_steps(ctx, run)
    changed = changed_rngs(before, global_rng_state(ctx))
    for step, (a, b) in enumerate(zip(first, second)):
        expect(
            torch.equal(a.loss, b.loss),
            f"the {trainer_of(label)} is not deterministic: with the same seed its step {step} loss is "
            f"{a.loss.item()!r} then {b.loss.item()!r} ({label})",
            "draw every random number from the trainer's own generator seeded by training.seed",
        )
        expect(
            a.kinds == b.kinds and all(torch.equal(x, y) for x, y in zip(inputs_of(a), inputs_of(b))),
            f"the {trainer_of(label)} is not deterministic: with the same seed its step {step} gives the model "
            f"other inputs (passes {a.kinds} / {b.kinds}; {label})",
            "draw every random number from the trainer's own generator seeded by training.seed",
        )
    if first[0].draw_mode == CAPTURED:
        measure(
            f"{label}_draws",
            "the trainer draws from the global RNG (captured and served by the harness, so deterministic here); "
            "on a cluster its draws depend on everything else that draws and differ across ranks: draw from "
            "the trainer's own generator",
            review=True,
        )
    else:
        expect(
            not changed,
            f"the {trainer_of(label)} draws from the global {', '.join(changed)} RNG, so its numbers depend on "
            f"everything else that draws and differ across runs and DDP ranks ({label})",
            "draw from the trainer's own torch.Generator (self.generator, seeded by training.seed)",
        )
        measure(f"{label}_draws", first[0].draw_mode if first[0].draws else "its own generator")
    measure(f"{label}_losses", ",".join(f"{r.loss.item():.6g}" for r in first))
    return first


def check_stable_unconditional(ctx, measure):
    ctx.semantic_model()
    records = twice(
        ctx,
        measure,
        "stable_unconditional",
        lambda batch, step, after: ctx.run_stable(
            "unconditional", batch, step=step, grad=False, outputs=False, seed=SEED + step, after=after
        ),
    )
    ts = torch.stack([r.passes[0].timestep("text") for r in records])
    if bool((ts == ts[0, 0]).all()):
        control_failed("the stable unconditional steps drew no varying text timesteps: determinism was not exercised")


def check_cycle_random_categorical(ctx, measure):
    ctx.semantic_model()
    records = twice(
        ctx,
        measure,
        "cycle_random",
        lambda batch, step, after: ctx.run_cycle(
            batch, settings=CYCLE_RANDOM, step=step, grad=False, outputs=False, seed=SEED + step, after=after
        ),
    )
    ts = torch.stack([r.one(T2L).timestep("latent") for r in records])
    if bool((ts == 1).any()) or ts.unique().numel() <= 1:
        control_failed(
            f"the cycle trainer in random mode drew no varying latent t ({ts.flatten().tolist()}): determinism "
            "was not exercised"
        )


def check_cycle_full(ctx, measure):
    ctx.semantic_model()
    twice(
        ctx,
        measure,
        "cycle_full",
        lambda batch, step, after: ctx.run_cycle(
            batch, settings=CYCLE_FULL, step=step, grad=False, outputs=False, seed=SEED + step, after=after
        ),
    )


def check_seed_matters(ctx, measure):
    ctx.semantic_model()
    seed = int(ctx.cycle_config.training.get("seed", 42))
    other = {"training.seed": seed + 1}
    batch = ctx.batch(BATCH, seed=SEED)
    for label, _subject, run in (
        (
            "stable",
            ctx.stable_subject,
            lambda extra: ctx.run_stable("unconditional", batch, settings=extra, outputs=False),
        ),
        (
            "cycle",
            ctx.cycle_subject,
            lambda extra: ctx.run_cycle(batch, settings={**CYCLE_RANDOM, **extra}, outputs=False),
        ),
    ):
        a, b = run({}), run(other)
        if a.draw_mode == CAPTURED:
            measure(f"{label}_seed", "n/a: the trainer draws from the global RNG, which the harness serves")
            continue
        expect(
            not torch.equal(a.loss, b.loss),
            f"the {label} trainer gives the same loss {a.loss.item()!r} with training.seed {seed} and {seed + 1}: "
            "the seed does not reach its generator",
            "seed the trainer's generator from training.seed",
        )
    measure("seed_changes_losses", "yes")


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t", "latents", "text"),
    "stable_unconditional": check_stable_unconditional,
    "cycle_random_categorical": check_cycle_random_categorical,
    "cycle_full": check_cycle_full,
    "seed_matters": check_seed_matters,
}


run_row = row_runner(CHECKS)
test_determinism = row_test(CHECKS)
