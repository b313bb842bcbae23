"""Row: L2T text masking.

Stable L2T masks every token (text t = 1), keeps the latents clean (latent t = 0) and takes the
cross entropy over every position, padding included. The cycle trainer's base L2T must do the same.
Checked from the observed L2T pass of each trainer: every token is the mask id, t_text = 1 and
t_latent = 0 exactly, the latents are the batch's clean ones; the two passes' logits are
bit-identical (same model, same inputs); each trainer's loss equals the float64 oracle's CE over
every position of its own L2T logits (the cycle trainer with its other terms weighted 0).
"""

from __future__ import annotations

import pytest
import torch

from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.observe import L2T
from compat.oracle import ce_every_position, tol
from compat.outcomes import expect, expect_close

pytestmark = pytest.mark.compat_row("l2t_masking")
# The cycle loss is then exactly its base L2T term.
CYCLE_L2T_ONLY = row_settings(
    {"latent_t_mode": "full", "latent_loss_weight": 0.0, "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0}
)


def l2t_pass_ok(ctx, label: str, p, batch) -> None:
    ids = p.text_tokens.cpu()
    masked = float((ids == ctx.vocab.mask_token_id).float().mean())
    expect(
        masked == 1.0,
        f"the {label} L2T pass masks only {masked:.1%} of the text tokens",
        "replace every token (padding included) by the mask id, as stable l2t does",
    )
    for which, want in (("text", 1.0), ("latent", 0.0)):
        t = p.timestep(which)
        expect(
            torch.equal(t, torch.full_like(t, want)),
            f"the {label} L2T pass gives t_{which} = {t.tolist()}",
            f"give t_{which} = {want:g}, as stable l2t does",
        )
    expect(
        torch.equal(p.latents_2d.float().cpu(), ctx.x0_of(batch).float()),
        f"the {label} L2T pass is not conditioned on the batch's clean latents",
        "pass the clean latents (t_latent = 0) to the L2T pass",
    )


def check_l2t_loss(ctx, measure, batch_size):
    model = ctx.pretrained_or_proxy()  # the checkpoint's own L2T path
    measure(f"B{batch_size}_model", ctx.pretrained_note)
    batch = ctx.batch(batch_size, seed=20 + batch_size)
    draws = ctx.draws(batch, seed=20 + batch_size)
    stable = ctx.run_stable("l2t", batch, draws=draws, model=model, grad=False)
    cycle = ctx.run_cycle(batch, settings=CYCLE_L2T_ONLY, draws=draws, model=model, grad=False)
    s_pass, c_pass = stable.one(L2T), cycle.one(L2T)
    l2t_pass_ok(ctx, "stable l2t", s_pass, batch)
    l2t_pass_ok(ctx, "cycle", c_pass, batch)
    expect_close(
        c_pass.outputs[0],
        s_pass.outputs[0],
        **tol("bit_exact"),
        problem="the cycle trainer's L2T logits differ from stable l2t's on identical inputs",
        fix="call the model with exactly stable l2t's inputs (tokens, latents, timesteps, mask and their dtypes)",
    )
    ids = batch["input_ids"].cpu()
    for label, record, p in (("stable l2t", stable, s_pass), ("cycle", cycle, c_pass)):
        want = ce_every_position(p.outputs[0].cpu(), ids)
        expect_close(
            record.loss.detach().double().cpu(),
            want,
            **tol(ctx.oracle_tolerance),
            problem=f"the {label} L2T loss is not the cross entropy over every position",
            fix="average the CE over all B*S positions, padding included, as stable l2t does",
        )
    expect_close(
        cycle.loss.detach().cpu(),
        stable.loss.detach().cpu(),
        **tol("float32_loss"),
        problem="the cycle trainer's L2T loss differs from stable l2t's on the same batch",
        fix="compute the L2T term as stable l2t does (masked_text_ce over every position)",
    )
    measure(f"B{batch_size}_l2t_loss_stable", float(stable.loss), headline=True)
    measure(f"B{batch_size}_l2t_loss_cycle", float(cycle.loss))


CHECKS = {
    "control_sensitivity": sensitivity_control("latents"),
    "l2t_loss_batch_1": lambda ctx, measure: check_l2t_loss(ctx, measure, 1),
    "l2t_loss_batch_n": lambda ctx, measure: check_l2t_loss(ctx, measure, ctx.options.batch_size),
}


run_row = row_runner(CHECKS)
test_l2t_masking = row_test(CHECKS)
