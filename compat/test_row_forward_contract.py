"""Row: model forward contract.

The review calls it OK. Checked here on the real model: the keywords both trainers use, the output
shapes (latent_pred keeps its token axis: [B,1,D]; a cluster head adds a third output), and that
each trainer's loss terms for a batch equal those of its samples run one at a time. That last
check is what catches upstream's [B,1,D] vs [B,D] broadcast (defect 1), which averages B*B pairs.
It also checks that padding content cannot leak into the latent prediction (attention mask).
"""
from __future__ import annotations

import pytest
import torch

from compat.harness import CallRecorder, row_runner, row_test, slice_batch
from compat.outcomes import cannot_check
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("forward_contract")

FORWARD_KEYWORDS = {"text_tokens", "latents", "text_timesteps", "latent_timesteps", "attention_mask"}
# Loss terms per trainer setting whose batch value is the mean of the per-sample values.
TERMS = {
    "stable_l2t": ("text_loss",),
    "stable_t2l": ("latent_loss",),
    "cycle": ("base_t2l_latent_loss", "base_l2t_text_loss", "cycle_text_loss", "cycle_latent_loss"),
}


def _step(ctx, setting: str, batch, noise, model=None):
    if setting == "stable_l2t":
        return ctx.stable("l2t", model=model)(batch)
    if setting == "stable_t2l":
        return ctx.stable("t2l", model=model)(batch, draws={"latent_noise": noise})
    trainer = ctx.cycle(model=model, latent_t_mode="full", cycle_text_weight=0.1, cycle_latent_weight=0.1,
                        cycle_latent_sampling="argmax")
    return trainer(batch, step=None, draws={"latent_noise": noise, "cycle_latent_noise": noise})


def check_keywords_and_shapes(ctx, measure):
    """Both trainers call the model with the five keywords only, latents [B,1,D], the mask passed."""
    model = ctx.require_model()
    batch = ctx.batch(ctx.options.batch_size, seed=1)
    B, S = batch["input_ids"].shape
    noise = ctx.noise(batch, seed=1)
    for setting in TERMS:
        spy = CallRecorder(ctx.semantic_model())
        _step(ctx, setting, batch, noise, model=spy)
        assert spy.calls, f"{setting}: the model was never called"
        for args, kwargs in spy.calls:
            assert not args, f"{setting}: model called with {len(args)} positional argument(s)"
            assert set(kwargs) == FORWARD_KEYWORDS, f"{setting}: model called with keywords {sorted(kwargs)}"
            assert tuple(kwargs["latents"].shape) == (B, 1, ctx.latent_dim), (
                f"{setting}: latents passed as {tuple(kwargs['latents'].shape)}, expected [B,1,D]")
            mask = kwargs["attention_mask"]
            assert mask is not None and torch.equal(mask.bool(), batch["attention_mask"].bool()), (
                f"{setting}: the batch's attention mask was not passed to the model")
    with torch.no_grad():
        out = model(text_tokens=batch["input_ids"], latents=batch["latent"], text_timesteps=None,
                    latent_timesteps=None, attention_mask=batch["attention_mask"])
    expected = [(B, S, model.vocab_size), (B, 1, ctx.latent_dim)] + ([(B, S, model.vocab_size)] if model.cluster_size else [])
    assert [tuple(o.shape) for o in out] == expected, f"model outputs {[tuple(o.shape) for o in out]}, expected {expected}"
    measure("latent_pred", "[B,1,D]")


def check_cluster_head(ctx, measure):
    """A cluster-head model returns three outputs; both trainers run on it (upstream defect 3)."""
    cluster = ctx.proxy_model(cluster_size=4)  # the trainers' handling of three outputs, at any scale
    batch = ctx.batch(2, seed=2)
    with torch.no_grad():
        out = cluster(text_tokens=batch["input_ids"], latents=batch["latent"], text_timesteps=None,
                      latent_timesteps=None, attention_mask=batch["attention_mask"])
    assert len(out) == 3, f"cluster-head model returned {len(out)} outputs"
    noise = ctx.noise(batch, seed=2)
    for setting in TERMS:
        loss, _ = _step(ctx, setting, batch, noise, model=cluster)
        assert torch.isfinite(loss), f"{setting} on a cluster-head model gave loss {loss}"
    measure("cluster_head", "3 outputs, both trainers run")


def _batching(ctx, measure, setting):
    batch = ctx.batch(ctx.options.batch_size, seed=3)
    noise = ctx.noise(batch, seed=3)
    B = batch["input_ids"].shape[0]
    _, batched = _step(ctx, setting, batch, noise)
    singles = [_step(ctx, setting, slice_batch(batch, i), noise[i:i + 1])[1] for i in range(B)]
    worst = 0.0
    for term in TERMS[setting]:
        per_sample = torch.tensor([m[term] for m in singles], dtype=torch.float64)
        got = torch.tensor(batched[term], dtype=torch.float64)
        worst = max(worst, float((got - per_sample.mean()).abs()))
        torch.testing.assert_close(got, per_sample.mean(), **tol("float32_batching"),
                                   msg=lambda m, term=term: f"{setting}: batch {term} differs from the mean of its "
                                                            f"{B} samples run one at a time\n{m}")
    measure(f"{setting}_batch_vs_samples_max_abs", worst)


def check_batching_stable_l2t(ctx, measure):
    _batching(ctx, measure, "stable_l2t")


def check_batching_stable_t2l(ctx, measure):
    _batching(ctx, measure, "stable_t2l")


def check_batching_cycle(ctx, measure):
    _batching(ctx, measure, "cycle")


def check_padding_does_not_leak(ctx, measure):
    """Changing the token ids at padded positions leaves every latent loss term unchanged."""
    batch = ctx.batch(ctx.options.batch_size, seed=4)
    noise = ctx.noise(batch, seed=4)
    other = dict(batch)
    pad = ~batch["attention_mask"].bool()
    if not pad.any():
        if ctx.options.data_tokens:
            cannot_check("the data batch has no padded position, so padding cannot be checked on it")
        raise AssertionError("the synthetic compat batch has no padding")
    scrambled = (batch["input_ids"] + 7) % ctx.vocab.vocab_size
    other["input_ids"] = torch.where(pad, scrambled, batch["input_ids"])
    for setting, term in (("stable_t2l", "latent_loss"), ("cycle", "base_t2l_latent_loss")):
        a = torch.tensor(_step(ctx, setting, batch, noise)[1][term])
        b = torch.tensor(_step(ctx, setting, other, noise)[1][term])
        torch.testing.assert_close(b, a, **tol("float32_loss"),
                                   msg=lambda m, s=setting: f"{s}: padding content changed the T2L latent loss "
                                                           f"(attention mask not applied)\n{m}")
    measure("padding_leak", "none")


CHECKS = {
    "keywords_and_shapes": check_keywords_and_shapes,
    "cluster_head": check_cluster_head,
    "batching_stable_l2t": check_batching_stable_l2t,
    "batching_stable_t2l": check_batching_stable_t2l,
    "batching_cycle": check_batching_cycle,
    "padding_does_not_leak": check_padding_does_not_leak,
}


run_row = row_runner(CHECKS)
test_forward_contract = row_test(CHECKS)
