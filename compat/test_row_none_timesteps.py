"""Row: None timesteps.

The stable trainer's reference convention (upstream: `MultimodalConditioning` maps None to zeros)
against the cycle trainer, which passes zero tensors for clean modalities. Compatible only if the
model's None path equals explicit zeros bit for bit in float32, and if each trainer's clean
modality really is given t = 0.
"""
from __future__ import annotations

import pytest
import torch

from compat.harness import CallRecorder, row_runner, row_test
from compat.outcomes import not_applicable
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("none_timesteps")


def check_none_equals_zeros(ctx, measure):
    model = ctx.require_model()
    if next(model.parameters()).dtype != torch.float32:
        not_applicable("bit-exact comparison is defined for a float32 model")
    batch = ctx.batch(ctx.options.batch_size, seed=11)
    B = batch["input_ids"].shape[0]
    zeros = torch.zeros(B, device=ctx.device)
    probe = torch.rand(B, generator=torch.Generator().manual_seed(11)).to(ctx.device)
    args = dict(text_tokens=batch["input_ids"], latents=batch["latent"], attention_mask=batch["attention_mask"])
    cases = ((None, None, "both"), (None, probe, "text"), (probe, None, "latent"))
    with torch.no_grad():
        for text_t, latent_t, label in cases[:1] if ctx.large else cases:
            got = model(**args, text_timesteps=text_t, latent_timesteps=latent_t)
            want = model(**args, text_timesteps=zeros if text_t is None else text_t,
                         latent_timesteps=zeros if latent_t is None else latent_t)
            for name, g, w in zip(("text_logits", "latent_pred", "cluster_logits"), got, want):
                torch.testing.assert_close(g, w, **tol("bit_exact"),
                                           msg=lambda m, n=name, l=label: f"None {l} timestep(s) != zeros in {n}\n{m}")
    measure("none_vs_zeros_max_abs", 0.0)


def check_clean_modalities_get_zero(ctx, measure):
    """Stable l2t/t2l and the cycle T2L/L2T passes give the clean modality t = 0, the noised t = 1."""
    model = ctx.semantic_model()
    batch = ctx.batch(2, seed=12)
    noise = ctx.noise(batch, seed=12)
    expectations = []
    spy = CallRecorder(model)
    ctx.stable("l2t", model=spy)(batch)
    expectations.append(("stable l2t", spy.calls[-1][1], 1.0, 0.0))
    spy = CallRecorder(model)
    ctx.stable("t2l", model=spy)(batch, draws={"latent_noise": noise})
    expectations.append(("stable t2l", spy.calls[-1][1], 0.0, 1.0))
    spy = CallRecorder(model)
    ctx.cycle(model=spy, latent_t_mode="full", cycle_text_weight=0.0, cycle_latent_weight=0.0)(
        batch, draws={"latent_noise": noise})
    expectations.append(("cycle T2L", spy.calls[0][1], 0.0, 1.0))
    expectations.append(("cycle L2T", spy.calls[1][1], 1.0, 0.0))
    for label, kwargs, text_t, latent_t in expectations:
        for key, want in (("text_timesteps", text_t), ("latent_timesteps", latent_t)):
            value = kwargs[key]
            value = torch.zeros(2) if value is None else value.detach().float().cpu()
            torch.testing.assert_close(value, torch.full((2,), want), **tol("bit_exact"),
                                       msg=lambda m, l=label, k=key: f"{l}: {k} is not {want}\n{m}")
    measure("clean_t", "0 in both trainers")


CHECKS = {"none_equals_zeros": check_none_equals_zeros, "clean_modalities_get_zero": check_clean_modalities_get_zero}


run_row = row_runner(CHECKS)
test_none_timesteps = row_test(CHECKS)
