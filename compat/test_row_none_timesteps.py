"""Row: None timesteps.

The stable trainer's reference convention (upstream: `MultimodalConditioning` maps None to zeros)
against the cycle trainer, which passes zero tensors for clean modalities. Compatible only if the
model's None path equals explicit zeros bit for bit in float32, and if each trainer's clean
modality really is given t = 0.
"""

from __future__ import annotations

import pytest
import torch

from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.observe import L2T, T2L
from compat.outcomes import expect_close, not_applicable
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("none_timesteps")
CYCLE_BASE_ONLY = row_settings({"latent_t_mode": "full", "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0})


def check_none_equals_zeros(ctx, measure):
    model = ctx.pretrained_or_proxy()
    measure("model", ctx.pretrained_note)
    if next(model.parameters()).dtype != torch.float32:
        not_applicable("bit-exact comparison is defined for a float32 model")
    batch = ctx.batch(ctx.options.batch_size, seed=11)
    B = batch["input_ids"].shape[0]
    zeros = torch.zeros(B, device=ctx.device)
    probe = torch.rand(B, generator=torch.Generator().manual_seed(11)).to(ctx.device)
    args = dict(text_tokens=batch["input_ids"], latents=batch["latent"], attention_mask=batch["attention_mask"])
    cases = ((None, None, "both"), (None, probe, "text"), (probe, None, "latent"))
    with torch.no_grad():
        for text_t, latent_t, label in cases:
            got = model(**args, text_timesteps=text_t, latent_timesteps=latent_t)
            want = model(
                **args,
                text_timesteps=zeros if text_t is None else text_t,
                latent_timesteps=zeros if latent_t is None else latent_t,
            )
            for name, g, w in zip(("text_logits", "latent_pred", "cluster_logits"), got, want):
                expect_close(
                    g,
                    w,
                    **tol("bit_exact"),
                    problem=f"the model treats a None {label} timestep differently from zeros ({name} differ)",
                    fix="map a None timestep to torch.zeros(B) of the model's dtype, as upstream's model does",
                )
    measure("none_vs_zeros_max_abs", 0.0, headline=True)


def check_clean_modalities_get_zero(ctx, measure):
    """Each trainer gives the clean modality t = 0 (or None, which is zeros) and the noised one
    t = 1: stable l2t / t2l, and the cycle trainer's T2L / L2T passes (full mode), as observed."""
    batch = ctx.batch(2, seed=12)
    draws = ctx.draws(batch, seed=12)
    records = {
        "stable l2t": ctx.run_stable("l2t", batch, draws=draws, outputs=False),
        "stable t2l": ctx.run_stable("t2l", batch, draws=draws, outputs=False),
        "cycle": ctx.run_cycle(batch, settings=CYCLE_BASE_ONLY, draws=draws, outputs=False),
    }
    expectations = [
        ("stable l2t", L2T, 1.0, 0.0),
        ("stable t2l", T2L, 0.0, 1.0),
        ("cycle", T2L, 0.0, 1.0),
        ("cycle", L2T, 1.0, 0.0),
    ]
    for label, kind, text_t, latent_t in expectations:
        p = records[label].one(kind)
        for which, want in (("text", text_t), ("latent", latent_t)):
            expect_close(
                p.timestep(which),
                torch.full((2,), want),
                **tol("bit_exact"),
                problem=f"the {label} trainer's {kind} pass gives the {which} modality t = "
                f"{p.timestep(which).tolist()} where the stable trainer's protocol has {want:g}",
                fix=f"give the {which} timestep {want:g} in the {kind} pass ({'clean' if want == 0 else 'fully noised'})",
            )
    measure("clean_t", "0 in both trainers")


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t"),
    "none_equals_zeros": check_none_equals_zeros,
    "clean_modalities_get_zero": check_clean_modalities_get_zero,
}


run_row = row_runner(CHECKS)
test_none_timesteps = row_test(CHECKS)
