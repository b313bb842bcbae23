"""Row: determinism.

The same seed must give bit-identical losses, or no comparison between the trainers (and no resumed
or multi-process run) can be trusted. Each trainer draws from its own generator seeded from
`training.seed`, never from the global RNG: a trainer that draws from the global RNG gives other
numbers whenever anything else draws first, and differs across DDP ranks and runs.

Checked, with no injected draws (the trainers draw everything themselves), on the same batches:
- two fresh stable trainers in unconditional mode (which draws text_t, latent_t, the mask uniforms
  and the noise) give bit-identical losses, metrics and draws over 3 steps;
- two fresh cycle trainers, in random latent_t_mode with categorical pseudo tokens and both cycle
  weights > 0 (every draw the cycle trainer has is made), and in full mode, likewise;
- constructing and stepping the trainers leaves the global RNG states (torch, CUDA when used, Python
  `random`, NumPy) unchanged;
- another `training.seed` gives other losses (the seed reaches the generator).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from compat.harness import row_runner, row_test

pytestmark = pytest.mark.compat_row("determinism")

STEPS = 3
SEED = 110
BATCH = 2
CYCLE_RANDOM = dict(latent_t_mode="random", cycle_latent_sampling="categorical", cycle_text_weight=0.5,
                    cycle_latent_weight=0.5, cycle_text_warmup_steps=0, cycle_text_ramp_steps=0,
                    cycle_latent_warmup_steps=0, cycle_latent_ramp_steps=0)
CYCLE_FULL = dict(CYCLE_RANDOM, latent_t_mode="full", cycle_latent_sampling="argmax")


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


def run_steps(ctx, make_trainer, steps: int = STEPS) -> list[tuple[torch.Tensor, dict, dict]]:
    """(loss, metrics, draws) of `steps` steps of a fresh trainer, on fixed batches."""
    trainer = make_trainer()
    out = []
    with torch.no_grad():
        for step in range(steps):
            loss, metrics = trainer(ctx.batch(BATCH, seed=SEED + step), step=step)
            out.append((loss.detach().clone(), dict(metrics), {k: v.clone() for k, v in trainer.last_draws.items()}))
    return out


def assert_identical(first, second, label: str) -> None:
    for step, ((loss_a, m_a, d_a), (loss_b, m_b, d_b)) in enumerate(zip(first, second)):
        assert torch.equal(loss_a, loss_b), (f"{label}: step {step} loss {loss_a.item()!r} then {loss_b.item()!r} "
                                             "with the same seed")
        assert m_a == m_b, (f"{label}: step {step} metrics differ with the same seed: "
                            + ", ".join(f"{k} {m_a.get(k)!r} vs {m_b.get(k)!r}"
                                        for k in sorted(set(m_a) | set(m_b)) if m_a.get(k) != m_b.get(k)))
        assert d_a.keys() == d_b.keys() and all(torch.equal(d_a[k], d_b[k]) for k in d_a), (
            f"{label}: step {step} random draws differ with the same seed")


def twice(ctx, measure, label: str, make_trainer, expected_draws: tuple[str, ...]) -> None:
    before = global_rng_state(ctx)
    first = run_steps(ctx, make_trainer)
    second = run_steps(ctx, make_trainer)
    changed = changed_rngs(before, global_rng_state(ctx))
    assert not changed, (f"{label}: constructing and stepping the trainer changed the global {', '.join(changed)} RNG "
                         "state: it draws from the global RNG, so its numbers depend on everything else that draws "
                         "and differ across runs and DDP ranks; draw from the trainer's own generator")
    drawn = set(first[0][2])
    missing = sorted(set(expected_draws) - drawn)
    assert not missing, f"{label}: the step made no {', '.join(missing)} draw, so determinism was not exercised for it"
    assert_identical(first, second, label)
    measure(f"{label}_losses", ",".join(f"{loss.item():.6g}" for loss, _, _ in first))


def check_stable_unconditional(ctx, measure):
    ctx.semantic_model()
    twice(ctx, measure, "stable_unconditional", lambda: ctx.stable("unconditional"),
          ("text_t", "latent_t", "mask_uniform", "latent_noise"))


def check_cycle_random_categorical(ctx, measure):
    ctx.semantic_model()
    twice(ctx, measure, "cycle_random", lambda: ctx.cycle(**CYCLE_RANDOM),
          ("latent_t", "latent_noise", "cycle_latent_t", "cycle_latent_noise", "pseudo_token_uniform"))


def check_cycle_full(ctx, measure):
    ctx.semantic_model()
    twice(ctx, measure, "cycle_full", lambda: ctx.cycle(**CYCLE_FULL), ("latent_noise", "cycle_latent_noise"))


def check_seed_matters(ctx, measure):
    ctx.semantic_model()
    seed = int(ctx.cycle_config.training.get("seed", 42))
    other = {"training.seed": seed + 1}
    for label, make, make_other in (
            ("stable", lambda: ctx.stable("unconditional"), lambda: ctx.stable("unconditional", **other)),
            ("cycle", lambda: ctx.cycle(**CYCLE_RANDOM), lambda: ctx.cycle(**CYCLE_RANDOM, **other))):
        a = run_steps(ctx, make, steps=1)[0][0]
        b = run_steps(ctx, make_other, steps=1)[0][0]
        assert not torch.equal(a, b), (f"{label}: training.seed {seed} and {seed + 1} give the same loss {a.item()!r}: "
                                       "the seed does not reach the trainer's generator")
    measure("seed_changes_losses", "yes")


CHECKS = {
    "stable_unconditional": check_stable_unconditional,
    "cycle_random_categorical": check_cycle_random_categorical,
    "cycle_full": check_cycle_full,
    "seed_matters": check_seed_matters,
}


run_row = row_runner(CHECKS)
test_determinism = row_test(CHECKS)
