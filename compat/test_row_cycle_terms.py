"""Row: cycle terms.

The cycle trainer adds cycle_text (T2L2T) and cycle_latent (L2T2L) to the stable objective.
Everything is read from what the trainer gives the model and returns, never from its attributes:

- weights 0: its loss is stable L2T + latent_loss_weight x stable T2L on the same batch and draws
  (batch sizes 1 and > 1), on the checkpoint's own model; passes made for a term weighted 0 are a
  cost (REVIEW with the count), not an incompatibility;
- every pass is given what it must be: cycle_text all [MASK] at t_text = 1 with latent t = 0;
  cycle_latent the argmax pseudo tokens of the L2T logits (exactly) at t_text = 0; the total is
  the float64 oracle's `w * T2L + L2T + w_text * cycle_text + w_latent * cycle_latent`, with a
  different weight per term so that swapped weights show;
- categorical pseudo tokens: drawn from softmax(L2T logits), by a chi-square test of their
  probability integral transform at the significance level and sample size of
  `oracle.STATISTICS` (its power against sampling at temperature 2 is reported); where the trainer
  takes the uniforms by name (`pseudo_token_uniform`), exactly the inverse CDF at those uniforms;
- the warmup/ramp: the total at steps around each term's (different) warmup and ramp is the
  oracle's with `oracle.ramp` weights;
- stop-grad: with `cycle_stop_grad_latent` the x0 fed to cycle_text carries no graph and sends no
  gradient into latent_head; without it, it does (the control);
- a non-finite cycle term: the cycle_text pass's logits made NaN (the model's output for that one
  pass, found by the passes of the same step unpoisoned): under `loss.on_nonfinite: upstream` the
  step's loss is the other terms' total (upstream zeroes a non-finite term, as the stable trainer
  does) and a trainer that reports `metrics["nonfinite"]` names the term; under `raise` the trainer
  raises FloatingPointError (both policies are run). A trainer that lets the NaN reach its loss is
  REVIEW (the loop's own non-finite handling takes over); any other outcome is INCOMPATIBLE.
  `loss.on_nonfinite` is this project's setting: a trainer that never reads it (observed,
  `compat.config_reads`; upstream's trainer) is judged by upstream's behaviour only, said in the row.
"""

from __future__ import annotations

import pytest
import torch

import inspect

from torch import nn

from compat import oracle
from compat.config_reads import ReadLog, watching_reads
from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.runs import unfreeze
from compat.observe import CYCLE_LATENT, CYCLE_TEXT, L2T, T2L
from compat.oracle import STATISTICS, tol
from compat.outcomes import control_failed, expect, expect_close
from compat.subjects import CandidateError
from compat.terms import cycle_terms

pytestmark = pytest.mark.compat_row("cycle_terms")

NO_RAMP = row_settings(
    {
        "cycle_text_warmup_steps": 0,
        "cycle_text_ramp_steps": 0,
        "cycle_latent_warmup_steps": 0,
        "cycle_latent_ramp_steps": 0,
    }
)
WEIGHTS_ZERO = row_settings({"latent_t_mode": "full", "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0})
ALL_TERMS = row_settings(
    {
        "latent_t_mode": "full",
        "cycle_text_weight": 0.3,
        "cycle_latent_weight": 0.2,
        "cycle_latent_sampling": "argmax",
        **NO_RAMP,
    }
)
# The sampling check needs the L2T logits and the cycle_latent pass's input only: cycle_text off.
CATEGORICAL = row_settings(dict(ALL_TERMS, cycle_latent_sampling="categorical", cycle_text_weight=0.0))
RAMPS = row_settings(
    {
        "latent_t_mode": "full",
        "cycle_text_weight": 0.4,
        "cycle_text_warmup_steps": 3,
        "cycle_text_ramp_steps": 6,
        "cycle_latent_weight": 0.25,
        "cycle_latent_warmup_steps": 5,
        "cycle_latent_ramp_steps": 10,
        "cycle_latent_sampling": "argmax",
    }
)
RAMP_STEPS = (0, 2, 3, 6, 9, 12, 15, 100)
STOP_GRAD = row_settings(
    {
        "latent_t_mode": "full",
        "latent_loss_weight": 0.0,
        "cycle_text_weight": 1.0,
        "cycle_latent_weight": 0.0,
        **NO_RAMP,
    }
)


def check_weights_zero_equal_stable(ctx, measure, batch_size):
    model = ctx.pretrained_or_proxy()  # the checkpoint's own model: the losses a user continues from
    measure(f"B{batch_size}_model", ctx.pretrained_note)
    batch = ctx.batch(batch_size, seed=60 + batch_size)
    draws = ctx.draws(batch, seed=60 + batch_size)
    weight = float(ctx.cycle_config_for().loss.latent_loss_weight)
    l2t = ctx.run_stable("l2t", batch, draws=draws, model=model, grad=False)
    t2l = ctx.run_stable("t2l", batch, settings={"latent_loss_weight": weight}, draws=draws, model=model, grad=False)
    cycle = ctx.run_cycle(batch, settings=WEIGHTS_ZERO, step=0, draws=draws, model=model, grad=False)
    want = l2t.loss.detach() + t2l.loss.detach()
    expect_close(
        cycle.loss.detach(),
        want,
        **tol("float32_loss"),
        problem=f"with both cycle weights 0 the cycle trainer's loss is not stable l2t + latent_loss_weight x stable "
        f"t2l on the same batch (B={batch_size})",
        fix="make the base terms exactly stable l2t's and t2l's (same inputs, targets and reductions)",
    )
    measure(f"B{batch_size}_weights0_abs_diff", float((cycle.loss.detach() - want).abs()), headline=True)
    extra = [k for k in cycle.kinds if k not in (T2L, L2T)]
    if extra:
        measure(
            f"B{batch_size}_passes_at_weight_0",
            f"the cycle trainer makes {len(extra)} model pass(es) for terms weighted 0 ({', '.join(cycle.kinds)}): "
            "a cost, not a difference; skip a term's pass while its weight is 0",
            review=True,
        )


def check_terms_recomputed(ctx, measure):
    batch = ctx.batch(ctx.options.batch_size, seed=65)
    record = ctx.run_cycle(batch, settings=ALL_TERMS, step=0, draws=ctx.draws(batch, seed=65))
    expect(
        sorted(record.kinds) == sorted([T2L, L2T, CYCLE_TEXT, CYCLE_LATENT]),
        f"with every term weighted the cycle step makes the passes {record.kinds}",
        "make one pass per term: T2L, L2T, cycle_text, cycle_latent",
    )
    ct, cl, l2t = record.one(CYCLE_TEXT), record.one(CYCLE_LATENT), record.one(L2T)
    B = batch["input_ids"].shape[0]
    for label, p, text_t, latent_t in (("cycle_text", ct, 1.0, 0.0), ("cycle_latent", cl, 0.0, None)):
        expect(
            torch.equal(p.timestep("text"), torch.full((B,), text_t)),
            f"the cycle trainer's {label} pass is given text t {p.timestep('text').tolist()}",
            f"give it text t = {text_t:g}",
        )
        if latent_t is not None:
            expect(
                torch.equal(p.timestep("latent"), torch.full((B,), latent_t)),
                f"the cycle trainer's {label} pass is given latent t {p.timestep('latent').tolist()}",
                f"give it latent t = {latent_t:g} (the reconstructed x0 is clean)",
            )
    expect(
        torch.equal(cl.timestep("latent"), torch.ones(B)),
        f"with latent_t_mode full the cycle_latent pass is given latent t {cl.timestep('latent').tolist()}",
        "give the cycle_latent pass t = 1.0 (a float in [0, 1], not an index) in full mode",
    )
    pseudo = l2t.outputs[0].argmax(-1).cpu()
    expect(
        torch.equal(cl.text_tokens.cpu(), pseudo),
        "the cycle_latent pass is not given the argmax pseudo tokens of the L2T logits "
        f"({int((cl.text_tokens.cpu() != pseudo).sum())} of {pseudo.numel()} positions differ)",
        "take the pseudo tokens as argmax of the base L2T pass's logits (loss.cycle_latent_sampling argmax)",
    )
    config = ctx.cycle_config_for(ALL_TERMS)
    terms = cycle_terms(record, batch, config, 0, ctx.x0_of(batch), ctx.oracle_tolerance)
    expect_close(
        record.loss.detach().double().cpu(),
        terms.total,
        **tol(ctx.oracle_tolerance),
        problem="the cycle trainer's loss is not latent_loss_weight*T2L + L2T + w_text*cycle_text + "
        "w_latent*cycle_latent recomputed from its own passes",
        fix="sum the four terms with the config's weights, each term from its pass (see the review's formula)",
        details=f"weights {terms.weights}",
    )
    if "model_passes" in record.metrics:  # a trainer that reports its pass count must count right
        expect(
            record.metrics["model_passes"] == len(record.passes),
            f"the cycle trainer reports metrics['model_passes'] = {record.metrics['model_passes']} for a step that "
            f"made {len(record.passes)} passes",
            "count the model passes the step makes",
        )
    for name in ("t2l", "l2t", "cycle_text", "cycle_latent"):
        measure(name, float(getattr(terms, name)))
    measure("noise_used", ", ".join(f"{k}: {v}" for k, v in terms.noise.items()))


def check_categorical_sampling(ctx, measure):
    """Pseudo tokens drawn from softmax(L2T logits): a chi-square test, and the inverse CDF exactly
    where the trainer takes its uniforms by name."""
    spec = STATISTICS["categorical_sampling"]
    vocab = int(ctx.model_sizes()["vocab_size"])
    per_step = min(
        spec["batch_size"],
        -(-spec["min_draws"] // ctx.seq_len),  # about min_draws in all
        max(1, spec["max_logit_values"] // (ctx.seq_len * vocab)),  # each [B, S, V] logits tensor bounded
    )
    batch = ctx.batch(per_step, seed=66)
    B, S = batch["input_ids"].shape
    runs = -(-spec["min_draws"] // (B * S))
    # Only the PIT values are kept across steps (no step's logits): memory bounded whatever V and S.
    pit_gen, power_gen = torch.Generator().manual_seed(67), torch.Generator().manual_seed(68)
    pits, wrong_pits, draws_total = [], [], 0
    exact_checked = False
    for run in range(runs):
        draws = ctx.draws(batch, seed=1000 + run)
        record = ctx.run_cycle(batch, settings=CATEGORICAL, step=0, draws=draws, seed=1000 + run, grad=False)
        l2t_logits, pseudo = record.one(L2T).outputs[0].cpu(), record.one(CYCLE_LATENT).text_tokens.cpu()
        del record
        rows = l2t_logits.reshape(B * S, -1)
        pits.append(oracle.categorical_pit(rows, pseudo.reshape(-1), pit_gen))
        wrong_pits.append(oracle.wrong_sampler_pit(rows, spec["alternative_temperature"], power_gen))
        draws_total += pseudo.numel()
        if "pseudo_token_uniform" in ctx.cycle_subject.spec.draw_names:
            cdf = torch.softmax(l2t_logits.float(), dim=-1).cumsum(-1)
            want = torch.searchsorted(cdf, draws["pseudo_token_uniform"].cpu().unsqueeze(-1).contiguous())
            want = want.squeeze(-1).clamp(max=l2t_logits.shape[-1] - 1)
            expect(
                torch.equal(pseudo, want),
                "the categorical pseudo tokens are not the inverse CDF of softmax(L2T logits) at the injected "
                f"uniforms ({int((pseudo != want).sum())} of {pseudo.numel()} differ)",
                "sample from softmax(logits) at temperature 1 with the pseudo_token_uniform draw",
            )
            exact_checked = True
    statistic, p_value = oracle.uniformity_chi2(torch.cat(pits), spec["bins"])
    power = oracle.rejection_rate(torch.cat(wrong_pits), spec["alpha"], spec["bins"])
    measure("categorical_chi2_p", p_value)
    measure("categorical_draws", f"{draws_total} ({runs} steps of {B} samples)")
    measure("categorical_power_vs_temperature_2", power)
    measure("categorical_inverse_cdf_exact", "yes" if exact_checked else "n/a (uniforms not taken by name)")
    expect(
        p_value >= spec["alpha"],
        "the cycle trainer's categorical pseudo tokens are not distributed as softmax(L2T logits)",
        "sample them from softmax(logits) at temperature 1 (loss.cycle_latent_sampling categorical)",
        f"chi-square {statistic:.1f} on {spec['bins']} bins of the probability integral transform, p = "
        f"{p_value:.2g} < alpha {spec['alpha']} ({draws_total} draws)",
    )


def check_ramp(ctx, measure):
    """The total at steps around each term's warmup and ramp follows `oracle.ramp`."""
    if not ctx.cycle_subject.spec.accepts_step:
        loss = ctx.cycle_config_for().loss
        ramps = [
            t for t in ("cycle_text", "cycle_latent") if loss[f"{t}_warmup_steps"] > 0 or loss[f"{t}_ramp_steps"] > 0
        ]
        measure(
            "ramp",
            "the cycle trainer takes no step=, so no loop can drive its warmup/ramp"
            + (f"; the config ramps {', '.join(ramps)}, which the trainer cannot follow" if ramps else "")
            + ": take forward(batch, *, step=None) and apply the ramps by step",
            review=True,
        )
        return
    batch = ctx.batch(2, seed=67)
    draws = ctx.draws(batch, seed=67)
    config = ctx.cycle_config_for(RAMPS)
    seen = []
    applied = {"steps": list(RAMP_STEPS), "settings": dict(RAMPS), "cycle_text": [], "cycle_latent": []}
    for step in RAMP_STEPS:
        record = ctx.run_cycle(batch, config=config, step=step, draws=draws, grad=False)
        terms = cycle_terms(record, batch, config, step, ctx.x0_of(batch), ctx.oracle_tolerance)
        expect_close(
            record.loss.detach().double().cpu(),
            terms.total,
            **tol(ctx.oracle_tolerance),
            problem=f"at step {step} the cycle trainer's total does not follow the ramped weights the config gives "
            "(loss.cycle_*_weight, *_warmup_steps, *_ramp_steps)",
            fix="weight each cycle term 0 before its warmup, then linearly up to its weight over its ramp",
            details=f"weights at step {step}: {terms.weights}",
        )
        seen.append(f"{step}:{terms.weights['cycle_text']:.2g}/{terms.weights['cycle_latent']:.2g}")
        for term in ("cycle_text", "cycle_latent"):
            applied[term].append(terms.weights[term])
        if step == 0 and len(record.passes) > 2:
            measure(
                "passes_in_warmup",
                f"the cycle trainer makes {len(record.passes)} passes ({', '.join(record.kinds)}) while both cycle "
                "weights are 0 (in warmup): a cost; skip a term's pass while its weight is 0",
                review=True,
            )
    measure("ramp_weights_text/latent", " ".join(seen))
    measure("ramp_applied", applied, figure=True)


def _latent_head_grad(ctx, stop_grad: bool) -> tuple[float, bool]:
    """|grad| reaching latent_head through cycle_text alone (latent_loss_weight 0), and whether the
    x0 fed to the cycle_text pass carried an autograd graph."""
    model = ctx.semantic_model()
    unfreeze(model)
    model.zero_grad(set_to_none=True)
    batch = ctx.batch(2, seed=68)
    record = ctx.run_cycle(
        batch,
        settings=dict(STOP_GRAD, cycle_stop_grad_latent=stop_grad),
        step=0,
        draws=ctx.draws(batch, seed=68),
        grad=True,
    )
    record.loss.backward()
    grads = [
        p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("latent_head") and p.grad is not None
    ]
    model.zero_grad(set_to_none=True)
    return (float(sum(grads)) if grads else 0.0), record.one(CYCLE_TEXT).latents_require_grad


def check_stop_grad(ctx, measure):
    stopped, stopped_graph = _latent_head_grad(ctx, stop_grad=True)
    flowing, flowing_graph = _latent_head_grad(ctx, stop_grad=False)
    measure("latent_head_grad_stop_grad_on", stopped)
    measure("latent_head_grad_stop_grad_off", flowing)
    expect(
        not stopped_graph and stopped == 0.0,
        f"with loss.cycle_stop_grad_latent true the x0 fed to cycle_text {'carries' if stopped_graph else 'lacks'} an "
        f"autograd graph and cycle_text sends |grad| {stopped:.3g} into latent_head",
        "detach x0 before the cycle_text pass when cycle_stop_grad_latent is true",
    )
    if not (flowing_graph and flowing > 0.0):
        control_failed(
            "with loss.cycle_stop_grad_latent false cycle_text sends no gradient into latent_head, so the check "
            "cannot show that stop-grad is what blocks it (the trainer detaches x0 whatever the setting says)"
        )


class PoisonedPass(nn.Module):
    """The model with output `which` (0: text logits) of its `index`-th call made NaN."""

    def __init__(self, inner: nn.Module, index: int, which: int):
        super().__init__()
        self.inner, self.index, self.which, self.calls = inner, index, which, 0

        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        forward.__signature__ = inspect.signature(inner.forward)  # the model's, for the pass recorder
        self.forward = forward

    def _forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        call, self.calls = self.calls, self.calls + 1
        if call != self.index:
            return out
        out = list(out)
        out[self.which] = torch.full_like(out[self.which], float("nan"))
        return tuple(out)

    def __getattr__(self, name: str):  # the trainers read e.g. `model.vocab_size`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


NONFINITE_POLICIES = ("upstream", "raise")  # loss.on_nonfinite: both are honoured
ON_NONFINITE = "loss.on_nonfinite"


def check_nonfinite_term(ctx, measure):
    batch = ctx.batch(ctx.options.batch_size, seed=68)
    draws = ctx.draws(batch, seed=68)
    for policy in NONFINITE_POLICIES:
        # loss.on_nonfinite is this project's setting: a trainer that never reads it (upstream's) is
        # judged by upstream's behaviour only (zero the term), not by a promise it never made
        config, reads = watching_reads(ctx.cycle_config_for({**ALL_TERMS, "on_nonfinite": policy}), (ON_NONFINITE,))
        outcome = nonfinite_outcome(ctx, batch, draws, config, policy, reads)
        measure(f"nonfinite_cycle_text_{policy}", outcome, review=outcome.startswith("NaN"))


def nonfinite_outcome(ctx, batch, draws, config, policy: str, reads: ReadLog) -> str:
    """What the trainer does with NaN cycle_text logits under `policy` (asserting what it must)."""
    clean = ctx.run_cycle(batch, config=config, step=0, draws=draws, grad=False)
    terms = cycle_terms(clean, batch, config, 0, ctx.x0_of(batch), ctx.oracle_tolerance)
    poisoned_model = PoisonedPass(ctx.semantic_model(), clean.one(CYCLE_TEXT).index, 0)
    try:
        record = ctx.run_cycle(batch, config=config, step=0, draws=draws, grad=False, model=poisoned_model)
    except CandidateError as error:
        raised = isinstance(error.__cause__, FloatingPointError)
        expect(
            policy == "raise" and raised,
            f"with NaN cycle_text logits and loss.on_nonfinite={policy} the cycle trainer raised",
            "zero the non-finite term and name it in metrics['nonfinite'] (upstream's behaviour)"
            if policy == "upstream"
            else "raise FloatingPointError naming the term",
            str(error).splitlines()[0][:300],
        )
        return "raised FloatingPointError"
    loss = record.loss.detach().double().cpu()
    if not bool(torch.isfinite(loss)):  # the loop's own non-finite handling takes over
        return "NaN loss: the trainer lets the term poison the step (upstream zeroes it; the loop skips the step)"
    if policy == "raise" and not reads.was_read(ON_NONFINITE):
        return (
            f"n/a: the trainer does not read {ON_NONFINITE} (this project's setting; upstream's trainers have "
            "none), so it is judged by upstream's behaviour only"
        )
    expect(
        policy != "raise",
        "with loss.on_nonfinite=raise the cycle trainer zeroes a NaN cycle_text term silently",
        "raise FloatingPointError naming the term under on_nonfinite=raise",
    )
    want = terms.total - terms.weights["cycle_text"] * terms.cycle_text
    expect_close(
        loss,
        want,
        **tol(ctx.oracle_tolerance),
        problem="with NaN cycle_text logits the cycle trainer's loss is not the other terms' total",
        fix="replace a non-finite term by 0 and keep the others (upstream's behaviour)",
    )
    reported = record.metrics.get("nonfinite")
    if reported is not None:
        expect(
            any("cycle_text" in str(name) for name in reported),
            f"the cycle trainer's metrics['nonfinite'] is {reported}: it does not name the cycle_text term that went NaN",
            "name each zeroed term in metrics['nonfinite']",
        )
    return f"zeroed; the others' total {float(want):.6g}; reported {reported}"


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t", "latents", "text"),
    "weights0_equal_stable_batch_1": lambda ctx, measure: check_weights_zero_equal_stable(ctx, measure, 1),
    "weights0_equal_stable_batch_n": lambda ctx, measure: check_weights_zero_equal_stable(
        ctx, measure, ctx.options.batch_size
    ),
    "terms_recomputed": check_terms_recomputed,
    "categorical_sampling": check_categorical_sampling,
    "ramp": check_ramp,
    "stop_grad": check_stop_grad,
    "nonfinite_term": check_nonfinite_term,
}


run_row = row_runner(CHECKS)
test_cycle_terms = row_test(CHECKS)
