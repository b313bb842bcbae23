"""Row: L2T text masking.

Stable L2T masks every token (text_t = 1) and takes the cross entropy over every position,
padding included; the cycle trainer's base L2T must do the same, so the two losses are equal on
the same batch. Each loss is also recomputed from the model's logits by an independent oracle.
"""
from __future__ import annotations

import pytest
import torch

from compat.harness import CallRecorder, row_runner, row_test
from compat.oracle import ce_every_position, tol

pytestmark = pytest.mark.compat_row("l2t_masking")


def _l2t_inputs_ok(ctx, label, kwargs, batch, mask_id):
    ids = kwargs["text_tokens"]
    masked = float((ids == mask_id).float().mean())
    assert masked == 1.0, f"{label}: only {masked:.1%} of the text tokens are [MASK] in the L2T pass"
    B = batch["latent"].shape[0]
    assert torch.equal(ctx.as_fed(kwargs["latents"].reshape(B, -1)), ctx.as_fed(batch["latent"].reshape(B, -1))), (
        f"{label}: the L2T pass is not conditioned on the clean latents")
    return masked


def check_l2t_loss(ctx, measure, batch_size):
    model = ctx.require_model()
    batch = ctx.batch(batch_size, seed=20 + batch_size)
    noise = ctx.noise(batch, seed=20 + batch_size)
    mask_id = ctx.vocab.mask_token_id

    spy = CallRecorder(model)
    with torch.no_grad():  # values only: no autograd graph of a full-size model kept alive
        _, stable_metrics = ctx.stable("l2t", model=spy)(batch)
    _l2t_inputs_ok(ctx, "stable l2t", spy.calls[-1][1], batch, mask_id)
    stable_oracle = ce_every_position(spy.outputs[-1][0], batch["input_ids"])

    spy = CallRecorder(model)
    with torch.no_grad():
        _, cycle_metrics = ctx.cycle(model=spy, latent_t_mode="full", cycle_text_weight=0.0,
                                     cycle_latent_weight=0.0)(batch, draws={"latent_noise": noise})
    l2t_call = next(i for i, (_, kw) in enumerate(spy.calls) if bool((kw["text_tokens"] == mask_id).any()))
    _l2t_inputs_ok(ctx, "cycle L2T", spy.calls[l2t_call][1], batch, mask_id)
    cycle_oracle = ce_every_position(spy.outputs[l2t_call][0], batch["input_ids"])

    stable_loss = torch.tensor(stable_metrics["text_loss"], dtype=torch.float64)
    cycle_loss = torch.tensor(cycle_metrics["base_l2t_text_loss"], dtype=torch.float64)
    torch.testing.assert_close(stable_loss, stable_oracle.cpu(), **tol(ctx.oracle_tolerance),
                               msg=lambda m: f"stable l2t text_loss is not CE over every position\n{m}")
    torch.testing.assert_close(cycle_loss, cycle_oracle.cpu(), **tol(ctx.oracle_tolerance),
                               msg=lambda m: f"cycle base_l2t_text_loss is not CE over every position\n{m}")
    torch.testing.assert_close(cycle_loss, stable_loss, **tol("float32_loss"),
                               msg=lambda m: f"L2T loss differs between the trainers on the same batch\n{m}")
    measure(f"B{batch_size}_l2t_loss_stable", float(stable_loss))
    measure(f"B{batch_size}_l2t_loss_cycle", float(cycle_loss))


CHECKS = {
    "l2t_loss_batch_1": lambda ctx, measure: check_l2t_loss(ctx, measure, 1),
    "l2t_loss_batch_n": lambda ctx, measure: check_l2t_loss(ctx, measure, ctx.options.batch_size),
}


run_row = row_runner(CHECKS)
test_l2t_masking = row_test(CHECKS)
