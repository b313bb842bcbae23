"""Tests of the cycle trainer (`cycle_vae_impl.trainers.cycle_vae_trainer.CycleVAETrainer`).

Every test runs the real `MultimodalMMDiT` (real mmdit backbone), tiny: hidden 32, 1-2 blocks,
2 residual streams, V=16, S=8, D=8, on padded synthetic batches. The expected numbers are
computed independently: from the stable trainer (same model, same injected draws) or with the
float64 oracle (`compat.oracle`) from the model's raw outputs, never by calling the cycle
trainer's own helpers.
"""

from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compat import oracle
from compat.oracle import tol
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer, ramp_weight
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from tests.builders import TINY_MODEL, TINY_VOCAB, sensitized, tiny_batch, tiny_draws, tiny_model

VOCAB = TINY_VOCAB
SEQ_LEN = 8
LATENT_DIM = 8
T_STEPS = 1000
MODEL = dict(TINY_MODEL, max_seq_len=16, dropout=0.0)  # max_seq_len 16 > S = 8: the position table is not all used
EXACT = dict(rtol=0.0, atol=0.0)


# -- builders ------------------------------------------------------------------------------------
def build_model(seed: int = 0, n_blocks: int = 1, cluster_size: int = 0) -> MultimodalMMDiT:
    """The seeded tiny model, sensitized: both timesteps visibly change both outputs (see
    `tests.builders.sensitized`; a local generator, the global RNG is only seeded)."""
    model = tiny_model(
        seed, vocab_size=len(VOCAB), latent_dim=LATENT_DIM, cluster_size=cluster_size, base=MODEL, n_blocks=n_blocks
    )
    return sensitized(model, seed + 1000)


def make_config(
    schedule: str = "cosine", param: str = "epsilon", seed: int = 42, loss_type: str = "cycle_vae", **loss
) -> dict:
    loss_section = {
        "loss_type": loss_type,
        "latent_loss_weight": 0.1,
        "latent_t_mode": "full",
        "cycle_text_weight": 0.0,
        "cycle_latent_weight": 0.0,
    }
    loss_section.update(loss)
    model_section = dict(
        MODEL,
        latent_dim=LATENT_DIM,
        latent_timesteps=T_STEPS,
        latent_beta_schedule=schedule,
        latent_parameterization=param,
    )
    return {
        "model": model_section,
        "loss": loss_section,
        "training": {"seed": seed},
        "tokenizer": {
            "vocab_size": len(VOCAB),
            "mask_token_id": VOCAB.mask_token_id,
            "pad_token_id": VOCAB.pad_token_id,
        },
    }


def cycle_trainer(model: nn.Module, **kwargs) -> CycleVAETrainer:
    return CycleVAETrainer(model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, make_config(**kwargs))


def stable_trainer(model: nn.Module, mode: str, **kwargs) -> MultimodalDiffusionTrainer:
    cfg = make_config(**kwargs)
    cfg["loss"] = {"loss_type": mode, "latent_loss_weight": cfg["loss"]["latent_loss_weight"]}
    return MultimodalDiffusionTrainer(model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, cfg)


def make_batch(batch_size: int, seed: int = 1) -> dict:
    # min_len 2 < S: padding in (almost) every sample; the pad id is a real target of the CE.
    return tiny_batch(batch_size, SEQ_LEN, LATENT_DIM, seed, VOCAB, min_len=2)


def draws_for(batch_size: int, seed: int = 7, names=("latent_noise",)) -> dict:
    return tiny_draws(names, batch_size, SEQ_LEN, LATENT_DIM, seed)


def enable_all_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


# -- independent reference computations (the float64 oracle, from raw model outputs) -------------
def hand_inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Smallest id i with cdf[i] >= u, i.e. the number of cdf entries below u (capped at V-1)."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    return (cdf < u.unsqueeze(-1)).sum(dim=-1).clamp(max=logits.shape[-1] - 1)


def hand_cycle_losses(
    model,
    batch,
    draws,
    schedule,
    param,
    mode,
    t_min=0.0,
    t_max=0.98,
    sampling="argmax",
    with_text=True,
    with_latent=True,
):
    """Every term of a cycle step, from raw model calls and the float64 oracle (`compat.oracle`):
    its own alphas_cumprod table, noising, targets, x0 and losses; the model gets float32 inputs."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool()
    x0 = batch["latent"].reshape(ids.shape[0], LATENT_DIM).float()
    b = ids.shape[0]
    table = oracle.alphas_cumprod(schedule, T_STEPS)  # [T] float64

    def t_from(name):
        if mode == "full":
            return torch.ones(b)
        return torch.clamp(t_min + (t_max - t_min) * draws[name], max=0.9999)  # float32, as the trainer

    def call(tokens, latents_2d, t_text, t_lat):
        out = model(
            text_tokens=tokens,
            latents=latents_2d.float().unsqueeze(1),
            text_timesteps=t_text,
            latent_timesteps=t_lat,
            attention_mask=mask,
        )
        return out[0], out[1]

    with torch.no_grad():
        t_lat = t_from("latent_t")
        ab = table[oracle.timestep_index(t_lat, T_STEPS)]  # [B]
        noise = draws["latent_noise"]
        z_t = oracle.noised(x0, noise, ab)  # [B, D] float64
        _, pred = call(ids, z_t, torch.zeros(b), t_lat)
        t2l = oracle.normalized_mse(pred, oracle.target(x0, noise, ab, param))

        masked = torch.full_like(ids, VOCAB.mask_token_id)
        l2t_logits, _ = call(masked, x0, torch.ones(b), torch.zeros(b))
        l2t = oracle.ce_every_position(l2t_logits, ids)

        zero = torch.tensor(0.0, dtype=torch.float64)
        out = {
            "base_t2l_latent_loss": t2l,
            "base_l2t_text_loss": l2t,
            "t_lat": t_lat,
            "cycle_text_loss": zero,
            "cycle_latent_loss": zero,
        }
        if with_text:
            x0_hat = oracle.x0_from_prediction(z_t, pred.reshape(b, LATENT_DIM), ab, param)
            cyc_logits, _ = call(masked, x0_hat, torch.ones(b), torch.zeros(b))
            out["cycle_text_loss"] = oracle.ce_every_position(cyc_logits, ids)
        if with_latent:
            if sampling == "argmax":
                pseudo = l2t_logits.argmax(dim=-1)
            else:
                pseudo = hand_inverse_cdf(l2t_logits, draws["pseudo_token_uniform"])
            out["pseudo"] = pseudo
            t2 = t_from("cycle_latent_t")
            ab2 = table[oracle.timestep_index(t2, T_STEPS)]
            noise2 = draws["cycle_latent_noise"]
            _, pred2 = call(pseudo, oracle.noised(x0, noise2, ab2), torch.zeros(b), t2)
            out["cycle_latent_loss"] = oracle.normalized_mse(pred2, oracle.target(x0, noise2, ab2, param))
    return out


def as_t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def test_timesteps_are_observable_in_the_test_model():
    """Guard for every hand computation below: both timesteps change both outputs."""
    model = build_model()
    batch = make_batch(2)
    ids, lat, mask = batch["input_ids"], batch["latent"], batch["attention_mask"].bool()

    def run(t_text, t_lat):
        return model(
            text_tokens=ids,
            latents=lat,
            text_timesteps=torch.full((2,), t_text),
            latent_timesteps=torch.full((2,), t_lat),
            attention_mask=mask,
        )[:2]

    with torch.no_grad():
        base = run(0.0, 1.0)
        for other in (run(1.0, 1.0), run(0.0, 0.5)):
            for a, b in zip(base, other):
                assert (a - b).abs().max() > 1e-3


# =================================================================================================
# 1. With both cycle weights 0 the cycle loss is the stable L2T + T2L losses.
# =================================================================================================
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("param", ["epsilon", "x0", "v_param"])
@pytest.mark.parametrize("batch_size", [1, 4], ids=["B1", "B4"])
def test_zero_cycle_weights_equal_stable_l2t_plus_t2l(schedule, param, batch_size):
    model = build_model()
    batch = make_batch(batch_size)
    draws = draws_for(batch_size)
    kw = dict(schedule=schedule, param=param, latent_loss_weight=0.3)

    loss_l2t, m_l2t = stable_trainer(model, "l2t", **kw)(batch)
    loss_t2l, m_t2l = stable_trainer(model, "t2l", **kw)(batch, draws=dict(draws))
    enable_all_grads(model)  # the stable trainer froze a group of the shared model
    trainer = cycle_trainer(model, **kw)
    loss, m = trainer(batch, draws=dict(draws))

    assert m["model_passes"] == 2
    assert m_t2l["latent_loss"] > 0 and m_l2t["text_loss"] > 0
    torch.testing.assert_close(as_t(m["base_l2t_text_loss"]), as_t(m_l2t["text_loss"]), **EXACT)
    torch.testing.assert_close(as_t(m["base_t2l_latent_loss"]), as_t(m_t2l["latent_loss"]), **EXACT)
    expected = loss_l2t.detach() + 0.3 * torch.tensor(m_t2l["latent_loss"])
    torch.testing.assert_close(loss.detach(), expected, **tol("float32_arithmetic"))
    # and exactly the stable totals added (the stable T2L total is latent_loss * weight)
    torch.testing.assert_close(loss.detach(), loss_l2t.detach() + loss_t2l.detach(), **EXACT)
    assert m["cycle_text_loss"] == 0.0 and m["cycle_latent_loss"] == 0.0
    assert all(p.requires_grad for p in model.parameters())  # the cycle trainer freezes nothing


@pytest.mark.parametrize(
    "w_text,w_latent,passes",
    [(0.0, 0.0, 2), (0.5, 0.0, 3), (0.0, 0.5, 3), (0.5, 0.5, 4)],
    ids=["no-cycle", "cycle_text-only", "cycle_latent-only", "both"],
)
def test_model_pass_count(w_text, w_latent, passes):
    model = build_model()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    trainer = cycle_trainer(model, cycle_text_weight=w_text, cycle_latent_weight=w_latent)
    _, m = trainer(make_batch(2))
    assert m["model_passes"] == passes
    assert len(calls) == passes


# =================================================================================================
# 2. cycle_text and cycle_latent recomputed by hand from the model's outputs.
# =================================================================================================
HAND_CASES = [
    pytest.param("epsilon", "cosine", "full", "argmax", id="eps-cosine-full-argmax"),
    pytest.param("x0", "linear", "full", "argmax", id="x0-linear-full-argmax"),
    pytest.param("v_param", "cosine", "full", "categorical", id="v-cosine-full-categorical"),
    pytest.param("epsilon", "linear", "random", "argmax", id="eps-linear-random-argmax"),
    pytest.param("v_param", "cosine", "random", "categorical", id="v-cosine-random-categorical"),
    pytest.param("x0", "cosine", "random", "categorical", id="x0-cosine-random-categorical"),
]


@pytest.mark.parametrize("param,schedule,mode,sampling", HAND_CASES)
def test_cycle_terms_match_hand_computation(param, schedule, mode, sampling):
    b = 4
    model = build_model(n_blocks=2)
    batch = make_batch(b)
    t_min, t_max = (0.5, 1.0) if mode == "random" else (0.0, 0.98)
    names = ["latent_noise", "cycle_latent_noise"]
    if mode == "random":
        names += ["latent_t", "cycle_latent_t"]
    if sampling == "categorical":
        names += ["pseudo_token_uniform"]
    draws = draws_for(b, names=names)
    if mode == "random":
        # the largest float32 uniform below 1 (torch.rand can draw it): 0.5 + 0.5 u rounds to
        # exactly 1.0, the last schedule index, unless the 0.9999 cap applies
        top = 1.0 - 2.0**-24
        draws["latent_t"][0] = top
        draws["cycle_latent_t"][1] = top
        assert float((t_min + (t_max - t_min) * draws["latent_t"])[0]) == 1.0
    w_text, w_latent, llw = 0.7, 0.3, 0.25
    trainer = cycle_trainer(
        model,
        schedule=schedule,
        param=param,
        latent_t_mode=mode,
        cycle_latent_t_min=t_min,
        cycle_latent_t_max=t_max,
        cycle_latent_sampling=sampling,
        latent_loss_weight=llw,
        cycle_text_weight=w_text,
        cycle_latent_weight=w_latent,
    )
    loss, m = trainer(batch, draws=dict(draws))
    ref = hand_cycle_losses(model, batch, draws, schedule, param, mode, t_min, t_max, sampling)

    assert m["model_passes"] == 4
    if mode == "random":
        assert float(ref["t_lat"][0]) == pytest.approx(0.9999, rel=0, abs=1e-7)
    torch.testing.assert_close(as_t(m["t_lat_mean"]), ref["t_lat"].double().mean(), **tol("float32_arithmetic"))
    for key in ("base_t2l_latent_loss", "base_l2t_text_loss", "cycle_text_loss", "cycle_latent_loss"):
        assert ref[key] > 0, key
        torch.testing.assert_close(as_t(m[key]), ref[key], **tol("float32_oracle"), msg=lambda s, k=key: f"{k}: {s}")
    total = (
        llw * ref["base_t2l_latent_loss"]
        + ref["base_l2t_text_loss"]
        + w_text * ref["cycle_text_loss"]
        + w_latent * ref["cycle_latent_loss"]
    )
    torch.testing.assert_close(loss.detach().double(), total, **tol("float32_oracle"))
    assert set(trainer.last_draws) == set(names)
    for name in names:
        torch.testing.assert_close(trainer.last_draws[name], draws[name], **EXACT)


def test_categorical_pseudo_tokens_follow_the_injected_uniforms():
    """Extreme uniforms pick the first / last id; the hand inverse CDF agrees with the term."""
    b = 2
    model = build_model()
    batch = make_batch(b)
    draws = draws_for(b, names=["latent_noise", "cycle_latent_noise", "pseudo_token_uniform"])
    draws["pseudo_token_uniform"][0] = 0.0  # -> id 0 everywhere in sample 0
    draws["pseudo_token_uniform"][1, :4] = 1.0 - 1e-7  # -> the last id (cdf may end below 1)
    trainer = cycle_trainer(model, cycle_latent_weight=1.0, cycle_latent_sampling="categorical")
    _, m = trainer(batch, draws=dict(draws))
    ref = hand_cycle_losses(model, batch, draws, "cosine", "epsilon", "full", sampling="categorical", with_text=False)
    assert ref["pseudo"][0].tolist() == [0] * SEQ_LEN
    assert ref["pseudo"][1, :4].tolist() == [len(VOCAB) - 1] * 4
    torch.testing.assert_close(as_t(m["cycle_latent_loss"]), ref["cycle_latent_loss"], **tol("float32_oracle"))


# =================================================================================================
# 3. Warmup and ramp of the cycle weights.
# =================================================================================================
@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.0), (4, 0.0), (5, 0.0), (10, 0.2), (15, 0.4), (100, 0.4), (None, 0.4)],
    ids=lambda v: f"step{v}" if isinstance(v, int) or v is None else None,
)
def test_ramp_values(step, expected):
    assert ramp_weight(step, 0.4, 5, 10) == pytest.approx(expected, rel=0, abs=1e-12)


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.0), (4, 0.0), (5, 0.4), (6, 0.4), (None, 0.4)],
    ids=["step0", "step4", "step5", "step6", "stepNone"],
)
def test_zero_ramp_jumps_to_base_after_warmup(step, expected):
    assert ramp_weight(step, 0.4, 5, 0) == expected


@pytest.mark.parametrize(
    "step,w_text,w_latent,passes",
    [
        (0, 0.0, 0.0, 2),
        (4, 0.0, 0.0, 2),
        (5, 0.0, 0.6, 3),
        (10, 0.2, 0.6, 4),
        (15, 0.4, 0.6, 4),
        (100, 0.4, 0.6, 4),
        (None, 0.4, 0.6, 4),
    ],
    ids=["step0", "step4", "step5", "step10", "step15", "step100", "stepNone"],
)
def test_ramp_in_metrics_and_skipped_passes(step, w_text, w_latent, passes):
    model = build_model()
    trainer = cycle_trainer(
        model,
        cycle_text_weight=0.4,
        cycle_text_warmup_steps=5,
        cycle_text_ramp_steps=10,
        cycle_latent_weight=0.6,
        cycle_latent_warmup_steps=5,
        cycle_latent_ramp_steps=0,
    )
    loss, m = trainer(make_batch(2), step=step)
    assert m["cycle_text_weight"] == pytest.approx(w_text, rel=0, abs=1e-12)
    assert m["cycle_latent_weight"] == pytest.approx(w_latent, rel=0, abs=1e-12)
    assert m["model_passes"] == passes
    if w_text == 0.0:
        assert m["cycle_text_loss"] == 0.0
    if w_latent == 0.0:
        assert m["cycle_latent_loss"] == 0.0
    expected = (
        0.1 * m["base_t2l_latent_loss"]
        + m["base_l2t_text_loss"]
        + w_text * m["cycle_text_loss"]
        + w_latent * m["cycle_latent_loss"]
    )
    torch.testing.assert_close(
        loss.detach().double(), torch.tensor(expected, dtype=torch.float64), **tol("float32_arithmetic")
    )


# =================================================================================================
# 4. Stop-grad of the latent, proven by gradients.
# =================================================================================================
class SplitFirstPass(nn.Module):
    """Runs the first call (the base T2L pass) on a copy of the model, later calls on the model:
    the copy's gradients are then exactly what reaches the parameters through the T2L pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.t2l_copy = copy.deepcopy(model)
        self.main = model
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return (self.t2l_copy if self.calls == 1 else self.main)(**kwargs)


def _grad_abs_sum(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["full", "random"])
@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop-grad", "no-stop-grad"])
def test_stop_grad_blocks_cycle_text_gradient_into_t2l_pass(stop_grad, mode):
    b = 2
    names = ["latent_noise"] + (["latent_t"] if mode == "random" else [])
    draws = draws_for(b, names=names)
    kw = dict(
        param="v_param",
        latent_t_mode=mode,
        latent_loss_weight=0.0,
        cycle_text_weight=0.5,
        cycle_latent_weight=0.0,
        cycle_stop_grad_latent=stop_grad,
    )
    batch = make_batch(b)

    # (a) on the shared model: L2T passes never use latent_pred, latent_loss_weight is 0, so
    #     latent_head's gradient comes from cycle_text through x0, or from nothing.
    model = build_model()
    loss, _ = cycle_trainer(model, **kw)(batch, draws=dict(draws))
    loss.backward()
    head = _grad_abs_sum(model.latent_head)
    # (b) the T2L pass on its own copy of the weights
    wrapped = SplitFirstPass(build_model())
    loss2, _ = cycle_trainer(wrapped, **kw)(batch, draws=dict(draws))
    loss2.backward()
    torch.testing.assert_close(loss2.detach(), loss.detach(), **EXACT)
    via_t2l_head = _grad_abs_sum(wrapped.t2l_copy.latent_head)
    via_t2l_encoder = _grad_abs_sum(wrapped.t2l_copy.latent_encoder)
    via_t2l_all = _grad_abs_sum(wrapped.t2l_copy)
    if stop_grad:
        assert head == 0.0
        assert via_t2l_head == 0.0 and via_t2l_encoder == 0.0 and via_t2l_all == 0.0
    else:
        assert head > 0.0
        assert via_t2l_head > 0.0 and via_t2l_encoder > 0.0
    # the L2T passes train latent_encoder either way
    assert _grad_abs_sum(wrapped.main.latent_encoder) > 0.0


# =================================================================================================
# 5. Any batch size: per-sample runs average to the batch; shapes of latents and predictions.
# =================================================================================================
class FlatLatentPred(nn.Module):
    """Returns latent_pred as [B, D] (what upstream's smoke-test stub returned)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        return (out[0], out[1].squeeze(1)) + tuple(out[2:])


def _slice_batch(batch, i):
    return {k: v[i : i + 1].clone() for k, v in batch.items()}


@pytest.mark.parametrize("mode", ["full", "random"])
def test_per_sample_runs_average_to_the_batch(mode):
    b = 4
    model = build_model(n_blocks=2)
    batch = make_batch(b)
    names = ["latent_noise", "cycle_latent_noise"] + (["latent_t", "cycle_latent_t"] if mode == "random" else [])
    draws = draws_for(b, names=names)
    kw = dict(param="v_param", latent_t_mode=mode, cycle_text_weight=1.0, cycle_latent_weight=1.0)
    _, m = cycle_trainer(model, **kw)(batch, draws=dict(draws))

    per = []
    for i in range(b):
        _, mi = cycle_trainer(model, **kw)(_slice_batch(batch, i), draws={k: v[i : i + 1] for k, v in draws.items()})
        per.append(mi)
    tokens = torch.full((b,), float(SEQ_LEN), dtype=torch.float64)  # CE over all positions: S tokens per sample
    for key in ("base_l2t_text_loss", "cycle_text_loss"):
        vals = torch.tensor([mi[key] for mi in per], dtype=torch.float64)
        torch.testing.assert_close(as_t(m[key]), (vals * tokens).sum() / tokens.sum(), **tol("float32_batching"))
    for key in ("base_t2l_latent_loss", "cycle_latent_loss"):  # MSE mean over B*D, D per sample
        vals = torch.tensor([mi[key] for mi in per], dtype=torch.float64)
        torch.testing.assert_close(as_t(m[key]), vals.mean(), **tol("float32_batching"))


@pytest.mark.parametrize("batch_size", [1, 3], ids=["B1", "B3"])
def test_flat_latent_pred_and_flat_latents_give_identical_losses(batch_size):
    batch = make_batch(batch_size)
    draws = draws_for(batch_size, names=["latent_noise", "cycle_latent_noise"])
    kw = dict(param="epsilon", schedule="linear", cycle_text_weight=1.0, cycle_latent_weight=1.0)
    model = build_model()
    ref_loss, ref = cycle_trainer(model, **kw)(batch, draws=dict(draws))
    flat_loss, flat = cycle_trainer(FlatLatentPred(model), **kw)(batch, draws=dict(draws))
    batch_2d = dict(batch, latent=batch["latent"].reshape(batch_size, LATENT_DIM))
    b2d_loss, b2d = cycle_trainer(model, **kw)(batch_2d, draws=dict(draws))
    keys = ("base_t2l_latent_loss", "base_l2t_text_loss", "cycle_text_loss", "cycle_latent_loss")
    for other_loss, other in ((flat_loss, flat), (b2d_loss, b2d)):
        torch.testing.assert_close(other_loss.detach(), ref_loss.detach(), **EXACT)
        for key in keys:
            assert other[key] == ref[key], key


def test_cluster_head_model_works_and_matches_plain_model():
    b = 3
    batch = make_batch(b)
    draws = draws_for(b, names=["latent_noise", "cycle_latent_noise"])
    kw = dict(cycle_text_weight=1.0, cycle_latent_weight=1.0)
    cluster = build_model(cluster_size=4)
    assert (
        len(
            cluster(
                text_tokens=batch["input_ids"],
                latents=batch["latent"],
                text_timesteps=torch.zeros(b),
                latent_timesteps=torch.zeros(b),
            )
        )
        == 3
    )
    plain = build_model()
    state = {k: v for k, v in cluster.state_dict().items() if not k.startswith("text_head_clusters")}
    plain.load_state_dict(state, strict=True)
    c_loss, c = cycle_trainer(cluster, **kw)(batch, draws=dict(draws))
    p_loss, p = cycle_trainer(plain, **kw)(batch, draws=dict(draws))
    assert c["model_passes"] == 4 and "nonfinite" not in c
    torch.testing.assert_close(c_loss.detach(), p_loss.detach(), **EXACT)
    c_loss.backward()


def test_upstream_broadcast_defect_is_caught_but_trainer_does_not_trigger_it():
    pred, target = torch.randn(4, 1, LATENT_DIM), torch.randn(4, LATENT_DIM)
    with warnings.catch_warnings():
        # the project's pytest filter, restated so the test holds when run without the ini
        warnings.filterwarnings("error", message="Using a target size", category=UserWarning)
        with pytest.raises(UserWarning, match="target size"):
            F.mse_loss(pred, target)
        model = build_model()
        loss, m = cycle_trainer(model, cycle_text_weight=1.0, cycle_latent_weight=1.0)(make_batch(4))
    assert math.isfinite(m["loss"]) and "nonfinite" not in m
    # and the broadcast number would have differed from the per-sample one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broadcast = F.mse_loss(pred, target)
    assert not torch.allclose(broadcast, F.mse_loss(pred.squeeze(1), target))


# =================================================================================================
# 6. Validation.
# =================================================================================================
def test_unknown_latent_t_mode():
    with pytest.raises(ValueError, match="latent_t_mode"):
        cycle_trainer(build_model(), latent_t_mode="sometimes")


@pytest.mark.parametrize(
    "t_min,t_max", [(0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.2, 1.5)], ids=["equal", "reversed", "negative", "above-one"]
)
def test_invalid_t_range(t_min, t_max):
    with pytest.raises(ValueError, match="cycle_latent_t_min") as info:
        cycle_trainer(build_model(), latent_t_mode="random", cycle_latent_t_min=t_min, cycle_latent_t_max=t_max)
    assert "cycle_latent_t_max" in str(info.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("cycle_text_weight", -0.1),
        ("cycle_latent_weight", -1.0),
        ("cycle_text_warmup_steps", -1),
        ("cycle_latent_warmup_steps", -5),
        ("cycle_text_ramp_steps", -1),
        ("cycle_latent_ramp_steps", -2),
        ("cycle_text_weight", float("nan")),
        ("cycle_latent_weight", float("inf")),
    ],
    ids=[
        "text-weight",
        "latent-weight",
        "text-warmup",
        "latent-warmup",
        "text-ramp",
        "latent-ramp",
        "text-weight-nan",
        "latent-weight-inf",
    ],
)
def test_invalid_weights_warmup_ramp(key, value):
    with pytest.raises(ValueError, match=key):
        cycle_trainer(build_model(), **{key: value})


@pytest.mark.parametrize("loss_type", ["l2t", "t2l", "unconditional", "cycle"])
def test_loss_type_must_be_cycle_vae(loss_type):
    with pytest.raises(ValueError, match="cycle_vae"):
        cycle_trainer(build_model(), loss_type=loss_type)


def test_unknown_sampling_and_nonfinite_policy():
    with pytest.raises(ValueError, match="cycle_latent_sampling"):
        cycle_trainer(build_model(), cycle_latent_sampling="topk")
    with pytest.raises(ValueError, match="on_nonfinite"):
        cycle_trainer(build_model(), on_nonfinite="ignore")


@pytest.mark.parametrize(
    "draws,kw,exc,name",
    [
        ({"latent_noise": torch.zeros(2, LATENT_DIM + 1)}, {}, ValueError, "latent_noise"),
        ({"latent_t": torch.zeros(3)}, {"latent_t_mode": "random"}, ValueError, "latent_t"),
        (
            {"pseudo_token_uniform": torch.zeros(2, SEQ_LEN - 1)},
            {"cycle_latent_weight": 1.0, "cycle_latent_sampling": "categorical"},
            ValueError,
            "pseudo_token_uniform",
        ),
        ({"text_t": torch.zeros(2)}, {}, KeyError, "text_t"),
    ],
    ids=["wrong-shape-noise", "wrong-shape-t", "wrong-shape-uniform", "unknown-name"],
)
def test_bad_injected_draws_name_the_draw(draws, kw, exc, name):
    trainer = cycle_trainer(build_model(), **kw)
    with pytest.raises(exc, match=name):
        trainer(make_batch(2), draws=draws)


@pytest.mark.parametrize(
    "draws,kw,name",
    [
        ({"latent_t": torch.zeros(2)}, {"latent_t_mode": "full"}, "latent_t"),
        ({"cycle_latent_noise": torch.zeros(2, LATENT_DIM)}, {"cycle_latent_weight": 0.0}, "cycle_latent_noise"),
        ({"pseudo_token_uniform": torch.zeros(2, SEQ_LEN)}, {"cycle_latent_weight": 1.0}, "pseudo_token_uniform"),
    ],
    ids=["t-in-full-mode", "cycle-noise-with-weight-0", "uniform-with-argmax"],
)
def test_unused_injected_draws_are_reported(draws, kw, name):
    trainer = cycle_trainer(build_model(), **kw)
    trainer(make_batch(2), draws=draws)
    assert trainer.unused_draws == [name]
    assert name not in trainer.last_draws


# =================================================================================================
# 7. Determinism and RNG hygiene.
# =================================================================================================
DET_KW = dict(
    latent_t_mode="random", cycle_text_weight=0.5, cycle_latent_weight=0.5, cycle_latent_sampling="categorical"
)


def _two_steps(seed: int):
    trainer = cycle_trainer(build_model(), seed=seed, **DET_KW)
    batch = make_batch(2)
    return [trainer(batch, step=s)[0].detach() for s in range(2)]


def test_same_seed_bit_identical_other_seed_differs():
    a, b, c = _two_steps(3), _two_steps(3), _two_steps(4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **EXACT)
    assert not torch.equal(a[0], a[1])  # the generator advances between steps
    assert not torch.equal(a[0], c[0])


def test_step_leaves_global_rng_untouched():
    trainer = cycle_trainer(build_model(), **DET_KW)
    batch = make_batch(2)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy())
    loss, _ = trainer(batch, step=0)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


@pytest.mark.parametrize("param", ["epsilon", "v_param", "x0"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_full_mode_x0_error_gain_and_t(schedule, param):
    """In full mode t = 1 everywhere, i.e. the last index, where sqrt(alphas_cumprod) is tiny:
    the metric reports how much an error of the model's output is amplified in x0."""
    trainer = cycle_trainer(build_model(), schedule=schedule, param=param)
    _, m = trainer(make_batch(3))
    ab = oracle.alphas_cumprod(schedule, T_STEPS)  # [T] float64
    torch.testing.assert_close(trainer.latent_diffusion.alphas_cumprod.double(), ab, **tol("float32_schedule_table"))
    last = ab[-1]
    expected = {
        "epsilon": (1 - last).sqrt() / last.sqrt(),
        "v_param": (1 - last).sqrt(),
        "x0": torch.tensor(1.0, dtype=torch.float64),
    }[param]
    torch.testing.assert_close(as_t(m["x0_error_gain_max"]), expected, **tol("float32_schedule_table"))
    if param == "epsilon":
        # 1/sqrt(ab[T-1]) up to sqrt(1-ab) ~ 1: large for both schedules, huge for cosine
        torch.testing.assert_close(as_t(m["x0_error_gain_max"]), 1.0 / last.sqrt(), **tol("leading_order"))
        assert m["x0_error_gain_max"] > (1e4 if schedule == "cosine" else 10)
    assert m["t_lat_mean"] == 1.0


# =================================================================================================
# 8. Non-finite handling.
# =================================================================================================
class NaNLatentPred(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        text_logits, latent_pred = self.model(**kwargs)[:2]
        return text_logits, torch.full_like(latent_pred, float("nan"))


def _clone_batch(batch):
    return {k: v.clone() for k, v in batch.items()}


def test_nan_latent_pred_is_reported_and_replaced_upstream_style():
    batch = make_batch(2)
    before = _clone_batch(batch)
    trainer = cycle_trainer(NaNLatentPred(build_model()), cycle_text_weight=1.0, cycle_latent_weight=1.0)
    loss, m = trainer(batch)
    # T2L prediction NaN -> T2L loss 0; x0 NaN -> cycle_text CE NaN -> 0; cycle T2L prediction NaN -> 0
    assert m["nonfinite"] == ["latent_pred", "cycle_text_loss", "latent_pred2"]
    assert m["base_t2l_latent_loss"] == 0.0 and m["cycle_text_loss"] == 0.0 and m["cycle_latent_loss"] == 0.0
    assert m["base_l2t_text_loss"] > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(m["base_l2t_text_loss"]), **EXACT)
    for k in batch:
        torch.testing.assert_close(batch[k], before[k], **EXACT)
    loss.backward()  # the replaced terms leave a usable graph


def test_nonfinite_raise_policy():
    batch = make_batch(2)
    before = _clone_batch(batch)
    trainer = cycle_trainer(NaNLatentPred(build_model()), on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="latent_pred"):
        trainer(batch)
    for k in batch:
        torch.testing.assert_close(batch[k], before[k], **EXACT)


def test_finite_step_does_not_modify_the_batch():
    batch = make_batch(3)
    before = _clone_batch(batch)
    loss, m = cycle_trainer(build_model(), cycle_text_weight=1.0, cycle_latent_weight=1.0)(batch)
    loss.backward()
    assert "nonfinite" not in m
    for k in batch:
        assert batch[k].dtype == before[k].dtype
        torch.testing.assert_close(batch[k], before[k], **EXACT)
