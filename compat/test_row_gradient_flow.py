"""Row: gradient flow.

Which parameter groups (text / latent / shared, by upstream's name substrings:
`improved_trainer_stable.parameter_group`) each trainer's loss terms update. The stable trainer
freezes a group per mode: l2t freezes the latent group (its parameters get no gradient at all), t2l
the text group. The cycle trainer freezes nothing, and its four terms each reach their own set of
modules. For pretrained reuse that matters: a term that updates a group the stable mode kept frozen
moves weights that the pretrained checkpoint never trained in that direction.

Measured on the shared model, with the same batch and noise for every run:
- stable l2t and t2l: the groups with a non-zero gradient (l2t -> {shared, text}, t2l -> {latent,
  shared}) and that the frozen group has no gradient;
- each cycle term in isolation. L2T alone is the cycle loss with latent_loss_weight 0 and both cycle
  weights 0 (a term weighted 0 sends exact zeros). T2L, cycle_text and cycle_latent are isolated by
  differences of gradients on identical draws: grad(loss with that term's weight 1) - grad(loss
  with it 0); a parameter the term does not reach gets the identical L2T gradient in both runs, so
  its difference is exactly 0;
- the configured cycle step's total gradient.

Fails when: the stable modes do not freeze as upstream did; the cycle step's total gradient misses
a group or a top-level module that the stable modes together train (silently frozen); the L2T term
reaches latent_head; cycle_text with `cycle_stop_grad_latent` reaches latent_head; cycle_latent
reaches text_head. The terms' reach beyond the stable modes (T2L also trains the text encoder that
stable t2l froze; L2T also trains the latent encoder that stable l2t froze) is a behaviour
difference, not a crash: measured with review.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from compat.figure_data import parameter_reach
from compat.harness import row_runner, row_test, sensitivity_control
from compat.runs import unfreeze
from compat.outcomes import expect
from latentDLM_mmdit.improved_trainer_stable import frozen_groups, parameter_group

pytestmark = pytest.mark.compat_row("gradient_flow")

SEED = 90
BATCH = 2  # reach, not values: two padded samples suffice


@contextlib.contextmanager
def _grad_scope(model: torch.nn.Module):
    """Unfreezes `model`, clears its gradients, and restores requires_grad and empty grads after."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    unfreeze(model)
    model.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def _grads(model, run) -> dict[str, torch.Tensor | None]:
    """Gradients of one backward of `run()` (None where the parameter got none)."""
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    out = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _minus(a: dict, b: dict) -> dict:
    def value(g, like):
        return g if g is not None else torch.zeros_like(like)

    out = {}
    for n in a:
        if a[n] is None and b[n] is None:
            out[n] = None
        else:
            like = a[n] if a[n] is not None else b[n]
            out[n] = value(a[n], like) - value(b[n], like)
    return out


def _reached(grads: dict) -> set[str]:
    """Parameter names with a non-zero gradient."""
    return {n for n, g in grads.items() if g is not None and bool((g != 0).any())}


def _groups(names: set[str]) -> set[str]:
    return {parameter_group(n) for n in names}


def _modules(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def _fmt(items: set[str]) -> str:
    return ",".join(sorted(items)) or "none"


def _inputs(ctx):
    batch = ctx.batch(BATCH, seed=SEED)
    return batch, ctx.draws(batch, seed=SEED)


def stable_reach(ctx, mode: str) -> tuple[set[str], dict]:
    model = ctx.semantic_model()
    batch, draws = _inputs(ctx)
    grads = _grads(model, lambda: ctx.run_stable(mode, batch, draws=draws, grad=True).loss)
    return _reached(grads), grads


def cycle_term_grads(ctx, latent_loss_weight: float, w_text: float, w_latent: float, stop_grad: bool = True) -> dict:
    """Gradients of the cycle loss with these weights (full mode, argmax pseudo tokens, no ramp)."""
    model = ctx.semantic_model()
    batch, draws = _inputs(ctx)
    settings = dict(
        latent_t_mode="full",
        cycle_latent_sampling="argmax",
        latent_loss_weight=latent_loss_weight,
        cycle_text_weight=w_text,
        cycle_latent_weight=w_latent,
        cycle_text_warmup_steps=0,
        cycle_text_ramp_steps=0,
        cycle_latent_warmup_steps=0,
        cycle_latent_ramp_steps=0,
        cycle_stop_grad_latent=stop_grad,
    )
    return _grads(model, lambda: ctx.run_cycle(batch, settings=settings, step=0, draws=draws, grad=True).loss)


def cycle_term_reach(ctx) -> dict[str, set[str]]:
    """Parameter names each cycle term reaches, each term isolated (see the module docstring)."""
    base = cycle_term_grads(ctx, 0.0, 0.0, 0.0)  # L2T only (T2L weighted 0 sends exact zeros)
    return {
        "base_L2T": _reached(base),
        "base_T2L": _reached(_minus(cycle_term_grads(ctx, 1.0, 0.0, 0.0), base)),
        "cycle_text": _reached(_minus(cycle_term_grads(ctx, 0.0, 1.0, 0.0, stop_grad=True), base)),
        "cycle_latent": _reached(_minus(cycle_term_grads(ctx, 0.0, 0.0, 1.0), base)),
    }


def check_stable_modes(ctx, measure):
    """Stable l2t trains {shared, text} and gives the latent group no gradient; t2l the mirror."""
    model = ctx.semantic_model()
    expected = {"l2t": {"text", "shared"}, "t2l": {"latent", "shared"}}
    with _grad_scope(model):
        for mode, want in expected.items():
            reached, grads = stable_reach(ctx, mode)
            got = _groups(reached)
            measure(f"stable_{mode}_groups", _fmt(got))
            measure(f"reach_stable_{mode}", parameter_reach(reached, model), figure=True)
            leaked = sorted(n for n, g in grads.items() if parameter_group(n) in frozen_groups(mode) and g is not None)
            expect(
                not leaked,
                f"the stable reference's {mode} mode sends gradient to {len(leaked)} parameters of the "
                f"{'/'.join(frozen_groups(mode))} group upstream's {mode} freezes ({', '.join(leaked[:3])})",
                f"freeze the {'/'.join(frozen_groups(mode))} group in {mode} mode, as upstream's stable trainer does",
            )
            expect(
                got == want,
                f"the stable reference's {mode} mode updates the groups {_fmt(got)} where upstream's updates {_fmt(want)}",
                f"train exactly the {_fmt(want)} groups in {mode} mode",
            )


def check_cycle_terms(ctx, measure):
    """Each cycle term's reach, against what it must never reach and against the stable modes."""
    model = ctx.semantic_model()
    with _grad_scope(model):
        reach = cycle_term_reach(ctx)
    measure("reach_cycle", {term: parameter_reach(names, model) for term, names in reach.items()}, figure=True)
    for term, names in reach.items():
        measure(f"{term}_groups", _fmt(_groups(names)))
    for term in reach:
        expect(
            bool(reach[term]),
            f"the cycle trainer's {term} term sends no gradient anywhere (it trains nothing)",
            f"keep the {term} term in the autograd graph of the loss",
        )
    forbidden = {"base_L2T": "latent_head", "cycle_text": "latent_head", "cycle_latent": "text_head"}
    why = {
        "base_L2T": "the L2T loss is a text loss: latent_head must not be in its graph",
        "cycle_text": "cycle_stop_grad_latent=true must detach the x0 estimate from the T2L prediction",
        "cycle_latent": "pseudo tokens must be detached from the L2T logits",
    }
    for term, module in forbidden.items():
        hit = sorted(n for n in reach[term] if n.split(".")[0] == module)
        expect(
            not hit,
            f"the cycle trainer's {term} term sends gradient into {module} ({', '.join(hit[:3])})",
            why[term],
        )
    measure("forbidden_paths", "none (" + ", ".join(f"{t}->{m}" for t, m in forbidden.items()) + ")")
    # Behaviour differences from the stable modes (pretrained reuse), reported, not failing.
    for term, mode in (("base_T2L", "t2l"), ("base_L2T", "l2t")):
        beyond = {n for n in reach[term] if parameter_group(n) in frozen_groups(mode)}
        if beyond:
            measure(
                f"{term}_beyond_stable_{mode}",
                f"the cycle trainer's {term} term also updates {_fmt(_groups(beyond))} ({_fmt(_modules(beyond))}), "
                f"which stable {mode} froze: the pretrained {_fmt(_groups(beyond))} path moves during fine-tuning; "
                "freeze it in the cycle trainer if it must stay as pretrained",
                review=True,
            )


def check_cycle_total(ctx, measure):
    """The configured cycle step reaches every group and top-level module the stable modes train."""
    model = ctx.semantic_model()
    batch = ctx.batch(BATCH, seed=SEED)
    with _grad_scope(model):
        stable = set().union(*(stable_reach(ctx, mode)[0] for mode in ("l2t", "t2l")))
        draws = ctx.draws(batch, seed=SEED)
        reached = _reached(_grads(model, lambda: ctx.run_cycle(batch, draws=draws, grad=True).loss))
        frozen_now = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    measure("cycle_total_groups", _fmt(_groups(reached)))
    missing_groups = _groups(stable) - _groups(reached)
    missing_modules = _modules(stable) - _modules(reached)
    missing = ([f"group(s) {_fmt(missing_groups)}"] if missing_groups else []) + (
        [f"module(s) {_fmt(missing_modules)}"] if missing_modules else []
    )
    expect(
        not missing,
        f"the configured cycle step sends no gradient to {' and '.join(missing)} that the stable modes train: "
        "those weights are silently frozen",
        "do not freeze parameter groups in the cycle step (every group trains through some term)",
    )
    expect(
        not frozen_now,
        f"a cycle trainer step leaves parameters frozen after it returns ({', '.join(frozen_now[:3])})",
        "restore requires_grad on every parameter the step froze",
    )


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t", "latents", "text"),
    "stable_modes": check_stable_modes,
    "cycle_terms": check_cycle_terms,
    "cycle_total": check_cycle_total,
}


run_row = row_runner(CHECKS)
test_gradient_flow = row_test(CHECKS)
