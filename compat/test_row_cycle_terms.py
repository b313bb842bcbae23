"""Row: cycle terms.

The cycle trainer adds cycle_text (T2L2T) and cycle_latent (L2T2L) to the stable objective.
Checked: with both weights 0 its loss is exactly stable L2T + latent_loss_weight x stable T2L on
the same batch and noise (batch sizes 1 and > 1); with weights > 0 every term is recomputed from
the model's own outputs by the oracle; the warmup/ramp gives the expected weights; and
`loss.cycle_stop_grad_latent` is shown by gradients (none reach latent_head through cycle_text).
"""
from __future__ import annotations

import pytest
import torch

from compat import oracle
from compat.harness import CallRecorder, row_runner, row_test, unfreeze
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("cycle_terms")


def check_weights_zero_equal_stable(ctx, measure, batch_size):
    model = ctx.require_model()  # the checkpoint's own model: these are the losses a user continues from
    batch = ctx.batch(batch_size, seed=60 + batch_size)
    noise = ctx.noise(batch, seed=60 + batch_size)
    with torch.no_grad():  # values only: no autograd graph of a full-size model kept alive
        l2t, _ = ctx.stable("l2t", model=model)(batch)
        _, t2l = ctx.stable("t2l", model=model)(batch, draws={"latent_noise": noise})
        trainer = ctx.cycle(model=model, latent_t_mode="full", cycle_text_weight=0.0, cycle_latent_weight=0.0)
        cycle, metrics = trainer(batch, step=0, draws={"latent_noise": noise})
    want = l2t.detach() + trainer.latent_loss_weight * t2l["latent_loss"]
    torch.testing.assert_close(cycle.detach(), want, **tol("float32_loss"),
                               msg=lambda m: f"B={batch_size}: cycle loss with weights 0 != stable L2T + w * T2L\n{m}")
    assert metrics["model_passes"] == 2, f"weights 0 still cost {metrics['model_passes']} model passes (2 needed)"
    measure(f"B{batch_size}_weights0_abs_diff", float((cycle.detach() - want).abs()))


def check_terms_recomputed(ctx, measure):
    model = ctx.semantic_model()
    batch = ctx.batch(ctx.options.batch_size, seed=65)
    noise, noise2 = ctx.noise(batch, seed=65), ctx.noise(batch, seed=66)
    w_text, w_latent = 0.3, 0.2
    spy = CallRecorder(model)
    trainer = ctx.cycle(model=spy, latent_t_mode="full", cycle_text_weight=w_text, cycle_latent_weight=w_latent,
                        cycle_latent_sampling="argmax", cycle_text_ramp_steps=0, cycle_latent_ramp_steps=0,
                        cycle_text_warmup_steps=0, cycle_latent_warmup_steps=0)
    loss, m = trainer(batch, step=0, draws={"latent_noise": noise, "cycle_latent_noise": noise2})
    assert len(spy.calls) == 4, f"expected 4 model passes (T2L, L2T, cycle_text, cycle_latent), got {len(spy.calls)}"
    (_, t2l_kw), (_, l2t_kw), (_, ct_kw), (_, cl_kw) = spy.calls
    ids = batch["input_ids"]
    B = ids.shape[0]
    x0 = ctx.as_fed(batch["latent"].reshape(B, -1))
    noise, noise2 = ctx.as_fed(noise), ctx.as_fed(noise2)
    T = trainer.latent_diffusion.num_timesteps
    ab1 = oracle.alphas_cumprod(trainer.latent_diffusion.beta_schedule, T)[[T - 1] * B]
    param = trainer.latent_diffusion.parameterization
    # cycle_text: CE over every position of the third pass's logits, to the original tokens.
    want_ct = oracle.ce_every_position(spy.outputs[2][0].cpu(), ids.cpu())
    # cycle_latent: argmax pseudo tokens of the L2T logits; normalised MSE to the second noise's target.
    pseudo = spy.outputs[1][0].argmax(-1)
    assert torch.equal(cl_kw["text_tokens"], pseudo), "cycle_latent pass is not conditioned on argmax pseudo tokens"
    want_cl = oracle.normalized_mse(spy.outputs[3][1].cpu(), oracle.target(x0, noise2.cpu(), ab1, param))
    want_t2l = oracle.normalized_mse(spy.outputs[0][1].cpu(), oracle.target(x0, noise.cpu(), ab1, param))
    want_l2t = oracle.ce_every_position(spy.outputs[1][0].cpu(), ids.cpu())
    for name, want in (("cycle_text_loss", want_ct), ("cycle_latent_loss", want_cl),
                       ("base_t2l_latent_loss", want_t2l), ("base_l2t_text_loss", want_l2t)):
        torch.testing.assert_close(torch.tensor(m[name], dtype=torch.float64), want, **tol(ctx.oracle_tolerance),
                                   msg=lambda msg, n=name: f"{n} does not match its recomputation\n{msg}")
        measure(name, m[name])
    total = trainer.latent_loss_weight * want_t2l + want_l2t + w_text * want_ct + w_latent * want_cl
    torch.testing.assert_close(loss.detach().double().cpu(), total, **tol(ctx.oracle_tolerance),
                               msg=lambda msg: f"total is not w*T2L + L2T + w_text*cycle_text + w_latent*cycle_latent\n{msg}")


def check_ramp(ctx, measure):
    base, warmup, ramp = 0.4, 5, 10
    trainer = ctx.cycle(cycle_text_weight=base, cycle_text_warmup_steps=warmup, cycle_text_ramp_steps=ramp,
                        cycle_latent_weight=base, cycle_latent_warmup_steps=warmup, cycle_latent_ramp_steps=ramp)
    for step in (0, 4, 5, 10, 15, 100):
        want = oracle.ramp(step, base, warmup, ramp)
        for term in ("cycle_text", "cycle_latent"):
            got = trainer.term_weight(term, step)
            assert abs(got - want) < 1e-12, f"{term} weight at step {step} is {got}, expected {want}"
    batch = ctx.batch(2, seed=67)
    _, m = trainer(batch, step=10)
    assert abs(m["cycle_text_weight"] - 0.2) < 1e-12 and abs(m["cycle_latent_weight"] - 0.2) < 1e-12, (
        f"metrics report weights {m['cycle_text_weight']}, {m['cycle_latent_weight']} at step 10, expected 0.2")
    _, m0 = trainer(batch, step=2)
    assert m0["model_passes"] == 2, f"weights in warmup still cost {m0['model_passes']} passes"
    measure("ramp_weight_step10", m["cycle_text_weight"])


def _latent_head_grad_from_cycle_text(ctx, stop_grad: bool) -> float:
    model = ctx.semantic_model()
    unfreeze(model)
    model.zero_grad(set_to_none=True)
    trainer = ctx.cycle(latent_t_mode="full", latent_loss_weight=0.0, cycle_text_weight=1.0, cycle_latent_weight=0.0,
                        cycle_text_warmup_steps=0, cycle_text_ramp_steps=0, cycle_stop_grad_latent=stop_grad)
    batch = ctx.batch(2, seed=68)
    loss, _ = trainer(batch, step=0, draws={"latent_noise": ctx.noise(batch, seed=68)})
    loss.backward()
    # With latent_loss_weight 0 only cycle_text can reach latent_head (via x0 from the T2L output).
    grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("latent_head") and p.grad is not None]
    value = float(sum(grads)) if grads else 0.0
    model.zero_grad(set_to_none=True)
    return value


def check_stop_grad(ctx, measure):
    stopped = _latent_head_grad_from_cycle_text(ctx, stop_grad=True)
    flowing = _latent_head_grad_from_cycle_text(ctx, stop_grad=False)
    measure("latent_head_grad_stop_grad_on", stopped)
    measure("latent_head_grad_stop_grad_off", flowing)
    assert stopped == 0.0, f"cycle_stop_grad_latent=true, yet cycle_text sends |grad| {stopped:.3g} into latent_head"
    assert flowing > 0.0, "cycle_stop_grad_latent=false sends no gradient into latent_head: the check has no power"


CHECKS = {
    "weights0_equal_stable_batch_1": lambda ctx, measure: check_weights_zero_equal_stable(ctx, measure, 1),
    "weights0_equal_stable_batch_n": lambda ctx, measure: check_weights_zero_equal_stable(ctx, measure, ctx.options.batch_size),
    "terms_recomputed": check_terms_recomputed,
    "ramp": check_ramp,
    "stop_grad": check_stop_grad,
}


run_row = row_runner(CHECKS)
test_cycle_terms = row_test(CHECKS)
