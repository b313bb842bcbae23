"""The stable trainer: modes, mode schedules, freezing, draws, determinism, latent settings,
non-finite handling and batch handling, on tiny real models."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from compat import oracle
from compat.oracle import tol
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.improved_trainer_stable import (
    LATENT_GROUP_KEYS,
    TEXT_GROUP_KEYS,
    MultimodalDiffusionTrainer,
    parameter_group,
)
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.tokenizer import SyntheticVocab
from tests.builders import perturbed, tiny_batch, tiny_draws, tiny_model

# Sizes of their own (V 24, S 12, D 6), distinct from the other tiny sizes so a swapped one shows.
V, MASK_ID, PAD_ID = 24, 23, 0
B, S, D = 3, 12, 6
VOCAB = SyntheticVocab(V, MASK_ID, PAD_ID)
ALL_DRAWS = ("text_t", "latent_t", "mask_uniform", "latent_noise")
DRAWS_BY_MODE = {"l2t": (), "t2l": ("latent_noise",), "unconditional": ALL_DRAWS}


def make_model(seed: int = 0, cluster_size: int = 0, n_blocks: int = 1) -> MultimodalMMDiT:
    model = tiny_model(seed, vocab_size=V, latent_dim=D, cluster_size=cluster_size, max_seq_len=S, n_blocks=n_blocks)
    return perturbed(model, seed + 1000)  # lift the backbone's zero-initialised gates so every path carries gradient


def make_trainer(
    model=None, loss_type: str = "unconditional", *, loss=None, training=None, root=None, model_cfg=None
) -> MultimodalDiffusionTrainer:
    config = {
        "loss": dict({"loss_type": loss_type}, **(loss or {})),
        "training": dict(training or {}),
        "model": dict(model_cfg or {}),
    }
    config.update(root or {})
    return MultimodalDiffusionTrainer(
        model if model is not None else make_model(), VOCAB, MaskedDiffusion(VOCAB), torch.float32, config
    )


def make_batch(seed: int = 0, batch_size: int = B) -> dict:
    return tiny_batch(batch_size, S, D, seed, VOCAB)


def make_draws(names, seed: int = 0, batch_size: int = B) -> dict:
    return tiny_draws(names, batch_size, S, D, seed)


class Spy(nn.Module):
    """Wraps a model and records the keyword arguments of every call (cloned)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, **kwargs):
        self.calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
        return self.inner(**kwargs)


class NaNOutputs(nn.Module):
    """Wraps a model and replaces the chosen outputs by NaN (keeping them in the autograd graph)."""

    def __init__(self, inner: nn.Module, text: bool = False, latent: bool = False):
        super().__init__()
        self.inner, self.text, self.latent = inner, text, latent

    def forward(self, **kwargs):
        text_logits, latent_pred = self.inner(**kwargs)[:2]
        if self.text:
            text_logits = text_logits * float("nan")
        if self.latent:
            latent_pred = latent_pred * float("nan")
        return text_logits, latent_pred


@pytest.fixture(scope="module")
def batch() -> dict:
    return make_batch()


# -- the three base modes --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["l2t", "t2l", "unconditional"])
def test_base_mode_step(batch, mode):
    trainer = make_trainer(loss_type=mode)
    loss, metrics = trainer(batch, step=0)
    assert metrics["training_mode"] == mode
    assert loss.dim() == 0 and loss.requires_grad and bool(torch.isfinite(loss))
    assert sorted(trainer.last_draws) == sorted(DRAWS_BY_MODE[mode])
    assert "nonfinite" not in metrics
    if mode == "l2t":
        assert metrics["latent_loss"] == 0.0 and metrics["text_loss"] > 0
        torch.testing.assert_close(loss.detach(), torch.tensor(metrics["text_loss"]), rtol=0, atol=0)
    elif mode == "t2l":
        assert metrics["text_loss"] == 0.0 and metrics["latent_loss"] > 0
        torch.testing.assert_close(
            loss.detach(), torch.tensor(metrics["latent_loss"] * 0.1), **tol("float32_arithmetic")
        )
    else:
        assert metrics["text_loss"] > 0 and metrics["latent_loss"] > 0
        torch.testing.assert_close(
            loss.detach(),
            torch.tensor(metrics["text_loss"] + 0.1 * metrics["latent_loss"]),
            **tol("float32_arithmetic"),
        )
    loss.backward()


def test_l2t_feeds_all_masks_and_clean_latents(batch):
    spy = Spy(make_model())
    make_trainer(spy, "l2t")(batch)
    call = spy.calls[-1]
    torch.testing.assert_close(call["text_tokens"], torch.full((B, S), MASK_ID), rtol=0, atol=0)
    torch.testing.assert_close(call["latents"], batch["latent"], rtol=0, atol=0)  # [B, 1, D], clean
    torch.testing.assert_close(call["text_timesteps"], torch.ones(B), rtol=0, atol=0)
    torch.testing.assert_close(call["latent_timesteps"], torch.zeros(B), rtol=0, atol=0)
    torch.testing.assert_close(call["attention_mask"], batch["attention_mask"].bool(), rtol=0, atol=0)


def test_t2l_feeds_clean_text_and_fully_noised_latents(batch):
    spy = Spy(make_model())
    trainer = make_trainer(spy, "t2l", model_cfg={"latent_beta_schedule": "linear"})
    noise = make_draws(["latent_noise"])["latent_noise"]
    trainer(batch, draws={"latent_noise": noise})
    call = spy.calls[-1]
    torch.testing.assert_close(call["text_tokens"], batch["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(call["text_timesteps"], torch.zeros(B), rtol=0, atol=0)
    torch.testing.assert_close(call["latent_timesteps"], torch.ones(B), rtol=0, atol=0)
    ab = trainer.latent_diffusion.alphas_cumprod[-1:].double()  # [1]: t = 1 is the last index
    expected = oracle.noised(batch["latent"][:, 0], noise, ab)  # [B, D] float64
    assert call["latents"].shape == (B, 1, D)
    torch.testing.assert_close(call["latents"][:, 0].double(), expected, **tol("float32_arithmetic"))


def test_unconditional_masks_with_the_injected_uniforms(batch):
    spy = Spy(make_model())
    trainer = make_trainer(spy, "unconditional")
    draws = make_draws(ALL_DRAWS, seed=4)
    trainer(batch, draws=draws)
    call = spy.calls[-1]
    expected_ids = MaskedDiffusion(VOCAB).sample_zt(batch["input_ids"], draws["text_t"], uniform=draws["mask_uniform"])
    torch.testing.assert_close(call["text_tokens"], expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(call["text_timesteps"], draws["text_t"], rtol=0, atol=0)
    torch.testing.assert_close(call["latent_timesteps"], draws["latent_t"], rtol=0, atol=0)
    expected_latents, _ = trainer.latent_diffusion.add_noise(
        batch["latent"][:, 0], draws["latent_t"], draws["latent_noise"]
    )
    torch.testing.assert_close(call["latents"][:, 0], expected_latents, rtol=0, atol=0)


# -- mode schedules --------------------------------------------------------------------------------
SEQUENTIAL = [
    {"type": "l2t", "steps": 2, "epochs": 2},
    {"type": "t2l", "steps": 3, "epochs": 1},
    {"type": "unconditional", "steps": 1, "epochs": 1},
]


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, "l2t"),
        (1, "l2t"),
        (2, "t2l"),
        (4, "t2l"),
        (5, "unconditional"),
        (6, "l2t"),
        (8, "t2l"),
        (6 * 100 + 5, "unconditional"),
    ],
)
def test_sequential_schedule_by_step(step, expected):
    trainer = make_trainer(loss_type="sequential", training={"sequential_schedule": SEQUENTIAL})
    assert trainer.training_mode(step) == expected


@pytest.mark.parametrize("epoch, expected", [(0, "l2t"), (1, "l2t"), (2, "t2l"), (3, "unconditional"), (4, "l2t")])
def test_sequential_schedule_falls_back_to_epochs(epoch, expected):
    trainer = make_trainer(loss_type="sequential", training={"sequential_schedule": SEQUENTIAL})
    trainer.current_epoch = epoch
    assert trainer.training_mode(None) == expected


def test_sequential_step_selects_the_mode_of_the_step(batch):
    trainer = make_trainer(loss_type="sequential", training={"sequential_schedule": SEQUENTIAL})
    modes = [trainer(batch, step=s)[1]["training_mode"] for s in (1, 2, 5)]
    assert modes == ["l2t", "t2l", "unconditional"]
    assert trainer.current_step == 5
    trainer.current_epoch = 2
    assert trainer(batch)[1]["training_mode"] == "t2l", "step None: the epoch decides"
    assert trainer.current_step == 5, "a step of None keeps the last step"


def test_sequential_schedule_rejects_unknown_types():
    with pytest.raises(ValueError, match=r"sequential_schedule\[1\]\.type='cycle'"):
        make_trainer(loss_type="sequential", training={"sequential_schedule": [{"type": "l2t"}, {"type": "cycle"}]})


def test_empty_sequential_schedule_is_unconditional():
    assert make_trainer(loss_type="sequential").training_mode(3) == "unconditional"


def random_modes(seed: int, n: int = 24, weights=(1.0, 1.0, 1.0)) -> list[str]:
    trainer = make_trainer(loss_type="random", training={"seed": seed, "mode_weights": list(weights)})
    return [trainer.training_mode(step) for step in range(n)]


def test_random_mode_comes_from_the_trainer_generator():
    trainers = [
        make_trainer(loss_type="random", training={"seed": seed, "mode_weights": [1.0, 1.0, 1.0]}) for seed in (5, 5, 6)
    ]
    before = torch.get_rng_state()  # taken after model init, which does use the global RNG
    first, again, other = ([t.training_mode(step) for step in range(24)] for t in trainers)
    assert torch.equal(torch.get_rng_state(), before), "random mode selection touched the global RNG"
    assert first == again
    assert first != other
    assert set(first) == {"unconditional", "l2t", "t2l"}


def test_random_mode_respects_weights():
    assert set(random_modes(0, weights=(0.0, 1.0, 0.0))) == {"l2t"}
    assert set(random_modes(0, weights=(0.0, 0.0, 2.0))) == {"t2l"}


@pytest.mark.parametrize(
    "weights", [[1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]], ids=["two-weights", "negative", "all-zero"]
)
def test_random_mode_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="mode_weights"):
        make_trainer(loss_type="random", training={"mode_weights": weights})


def test_random_mode_step_leaves_global_rng(batch):
    trainer = make_trainer(loss_type="random", training={"seed": 1})
    before = torch.get_rng_state()
    modes = {trainer(batch)[1]["training_mode"] for _ in range(3)}
    assert torch.equal(torch.get_rng_state(), before)
    assert modes <= {"unconditional", "l2t", "t2l"}


# -- freezing --------------------------------------------------------------------------------------
def test_parameter_groups_by_upstream_substrings():
    names = dict(make_model(cluster_size=2).named_parameters())
    groups = {n: parameter_group(n) for n in names}
    assert groups["text_encoder.token_embed.weight"] == "text"
    assert groups["text_head.weight"] == groups["text_head_clusters.weight"] == "text"
    assert groups["latent_encoder.projection.0.weight"] == groups["latent_head.3.bias"] == "latent"
    assert groups["conditioning.text_sigma_map.mlp.0.weight"] == "shared"
    assert groups["conditioning.latent_sigma_map.mlp.0.weight"] == "shared"
    assert all(g == "shared" for n, g in groups.items() if n.startswith("mmdit."))
    assert all(any(k in n for k in TEXT_GROUP_KEYS) for n, g in groups.items() if g == "text")
    assert all(any(k in n for k in LATENT_GROUP_KEYS) for n, g in groups.items() if g == "latent")


@pytest.mark.parametrize("mode, frozen", [("l2t", "latent"), ("t2l", "text"), ("unconditional", None)])
def test_freezing_by_group(batch, mode, frozen):
    model = make_model()
    trainer = make_trainer(model, "unconditional")
    loss, _ = trainer(batch, draws=make_draws(ALL_DRAWS))  # every parameter gets a gradient first
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    trainer.loss_type = mode
    loss, _ = trainer(batch)
    model.zero_grad(set_to_none=False)  # keep stale (zeroed) grads on trainable params only
    loss.backward()
    for name, param in model.named_parameters():
        group = parameter_group(name)
        if group == frozen:
            assert not param.requires_grad, f"{mode}: {name} should be frozen"
            assert param.grad is None, f"{mode}: frozen {name} still holds a gradient"
        else:
            assert param.requires_grad, f"{mode}: {name} should be trainable"
    trainable = trainer.trainable_parameter_names(mode)
    assert trainable == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # The shared backbone and the non-frozen side receive gradient.
    side = {"l2t": "text_head.weight", "t2l": "latent_head.3.weight", "unconditional": "text_head.weight"}[mode]
    grads = dict(model.named_parameters())
    assert grads[side].grad is not None and bool(grads[side].grad.ne(0).any())
    assert any(p.grad is not None and bool(p.grad.ne(0).any()) for n, p in grads.items() if n.startswith("mmdit.")), (
        "the shared backbone got no gradient"
    )


@pytest.mark.parametrize("mode", ["l2t", "t2l", "unconditional"])
def test_cluster_head_model_works(batch, mode):
    model = make_model(cluster_size=4)
    trainer = make_trainer(model, mode)
    loss, metrics = trainer(batch)
    loss.backward()
    assert bool(torch.isfinite(loss)) and metrics["training_mode"] == mode
    assert "nonfinite" not in metrics
    # Upstream trains the cluster head nowhere in the stable trainer: its output is unused.
    assert model.text_head_clusters.weight.grad is None


def test_cluster_head_loss_equals_two_output_loss(batch):
    """The cluster head adds parameters but does not change the other outputs' loss."""
    draws = make_draws(ALL_DRAWS, seed=8)
    with_cluster = make_model(seed=3, cluster_size=4)
    without = make_model(seed=3, cluster_size=0)
    without.load_state_dict(
        {k: v for k, v in with_cluster.state_dict().items() if not k.startswith("text_head_clusters")}
    )
    loss_a, _ = make_trainer(with_cluster)(batch, draws=draws)
    loss_b, _ = make_trainer(without)(batch, draws=draws)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)


# -- draws -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["t2l", "unconditional"])
def test_injected_draws_are_used_exactly(batch, mode):
    trainer = make_trainer(loss_type=mode)
    draws = make_draws(DRAWS_BY_MODE[mode], seed=2)
    trainer(batch, draws=draws)
    assert sorted(trainer.last_draws) == sorted(draws)
    for name, value in draws.items():
        torch.testing.assert_close(trainer.last_draws[name], value, rtol=0, atol=0)


def test_injected_draws_decide_the_loss(batch):
    model = make_model()
    draws = make_draws(ALL_DRAWS, seed=3)
    loss_a, _ = make_trainer(model, training={"seed": 1})(batch, draws=draws)
    loss_b, _ = make_trainer(model, training={"seed": 2})(batch, draws=draws)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)


def test_unknown_draw_name_is_a_key_error(batch):
    with pytest.raises(KeyError, match="latent_nosie"):
        make_trainer(loss_type="t2l")(batch, draws={"latent_nosie": torch.zeros(B, D)})


@pytest.mark.parametrize("name, shape", [("latent_noise", (B, 1, D)), ("text_t", (B, 1)), ("mask_uniform", (B, S + 1))])
def test_wrong_draw_shape_is_a_value_error(batch, name, shape):
    draws = make_draws(ALL_DRAWS)
    draws[name] = torch.rand(shape)
    with pytest.raises(ValueError, match=f"injected draw '{name}' has shape"):
        make_trainer(loss_type="unconditional")(batch, draws=draws)


@pytest.mark.parametrize("mode, extra", [("t2l", "text_t"), ("l2t", "latent_noise"), ("l2t", "mask_uniform")])
def test_injected_but_unused_draw_is_reported_and_changes_nothing(batch, mode, extra):
    draws = make_draws(DRAWS_BY_MODE[mode] + (extra,))
    trainer = make_trainer(loss_type=mode)
    loss, _ = trainer(batch, draws=draws)
    assert trainer.unused_draws == [extra]
    assert extra not in trainer.last_draws
    exact, _ = make_trainer(loss_type=mode)(batch, draws=make_draws(DRAWS_BY_MODE[mode]))
    torch.testing.assert_close(loss, exact, rtol=0, atol=0)


def test_non_tensor_draw_is_a_type_error(batch):
    with pytest.raises(TypeError, match="latent_noise"):
        make_trainer(loss_type="t2l")(batch, draws={"latent_noise": [[0.0] * D] * B})


def test_same_seed_gives_bit_identical_losses_and_leaves_global_rng():
    batches = [make_batch(seed) for seed in range(3)]
    trainers = [make_trainer(make_model(seed=7), training={"seed": 11}) for _ in range(2)]
    before = torch.get_rng_state()
    losses = [[float(trainer(b)[0].detach()) for b in batches] for trainer in trainers]
    assert torch.equal(torch.get_rng_state(), before), "a step drew from the global torch RNG"
    assert losses[0] == losses[1]
    first = make_trainer(make_model(seed=7), training={"seed": 11})
    other = make_trainer(make_model(seed=7), training={"seed": 12})
    first(batches[0])
    other(batches[0])
    assert not torch.equal(other.last_draws["latent_noise"], first.last_draws["latent_noise"]), (
        "a different training.seed must give different draws"
    )


# -- latent settings -------------------------------------------------------------------------------
def test_latent_settings_read_from_model_section():
    trainer = make_trainer(
        model_cfg={"latent_timesteps": 50, "latent_beta_schedule": "linear", "latent_parameterization": "v_param"}
    )
    diffusion = trainer.latent_diffusion
    assert (diffusion.num_timesteps, diffusion.beta_schedule, diffusion.parameterization) == (50, "linear", "v_param")
    assert trainer.latent_settings.sources["latent_beta_schedule"] == "model.latent_beta_schedule"


def test_latent_settings_root_spelling_accepted_and_defaults():
    trainer = make_trainer(root={"latent_beta_schedule": "sigmoid"})
    assert trainer.latent_diffusion.beta_schedule == "sigmoid"
    assert trainer.latent_settings.sources["latent_beta_schedule"] == "latent_beta_schedule"
    assert (trainer.latent_diffusion.num_timesteps, trainer.latent_diffusion.parameterization) == (1000, "epsilon")
    assert trainer.latent_settings.sources["latent_timesteps"] == "default"
    agreeing = make_trainer(root={"latent_timesteps": 200}, model_cfg={"latent_timesteps": 200})
    assert agreeing.latent_diffusion.num_timesteps == 200


def test_latent_settings_disagreement_names_both_keys():
    with pytest.raises(ValueError) as info:
        make_trainer(root={"latent_parameterization": "epsilon"}, model_cfg={"latent_parameterization": "v_param"})
    message = str(info.value)
    assert "model.latent_parameterization='v_param'" in message
    assert "root latent_parameterization='epsilon'" in message


@pytest.mark.parametrize(
    "loss_cfg, match",
    [({"loss_type": "cycle_vae"}, "loss_type='cycle_vae'"), ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore'")],
    ids=["bad-loss-type", "bad-on-nonfinite"],
)
def test_bad_loss_config_raises(loss_cfg, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(loss=loss_cfg)


# -- non-finite handling ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "nan_text, nan_latent, expected",
    [
        (False, True, ["latent_pred"]),
        (True, False, ["text_loss"]),
        (True, True, ["text_loss", "latent_pred"]),
    ],
    ids=["latent-nan", "text-nan", "both-nan"],
)
def test_nonfinite_terms_are_replaced_as_upstream(batch, caplog, nan_text, nan_latent, expected):
    draws = make_draws(ALL_DRAWS, seed=6)
    base = make_model()
    _, reference = make_trainer(base)(batch, draws=draws)
    trainer = make_trainer(NaNOutputs(base, text=nan_text, latent=nan_latent))
    with caplog.at_level(logging.WARNING, logger="latentDLM_mmdit.improved_trainer_stable"):
        loss, metrics = trainer(batch, draws=draws)
    assert metrics["nonfinite"] == expected
    assert bool(torch.isfinite(loss))
    # A non-finite term is replaced by 0; the other term is kept unchanged.
    text = 0.0 if nan_text else reference["text_loss"]
    latent = 0.0 if nan_latent else reference["latent_loss"]
    assert metrics["text_loss"] == text and metrics["latent_loss"] == latent
    torch.testing.assert_close(loss.detach(), torch.tensor(text + 0.1 * latent), **tol("float32_arithmetic"))
    assert any("non-finite" in r.getMessage() for r in caplog.records)
    assert "nonfinite" not in reference


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -0.1], ids=["nan", "inf", "negative"])
def test_bad_latent_loss_weight_is_rejected(weight):
    with pytest.raises(ValueError, match="latent_loss_weight"):
        make_trainer(loss={"latent_loss_weight": weight})


def test_nonfinite_total_becomes_upstream_constant(batch):
    """Finite terms but a non-finite total (a finite weight that overflows float32) -> the constant 0.01."""
    trainer = make_trainer(loss_type="t2l", loss={"latent_loss_weight": 1e39})
    loss, metrics = trainer(batch)
    assert metrics["nonfinite"] == ["loss"]
    torch.testing.assert_close(loss, torch.tensor(0.01), rtol=0, atol=0)
    assert metrics["loss"] == pytest.approx(0.01, rel=0, abs=1e-9)


@pytest.mark.parametrize(
    "nan_text, nan_latent, name",
    [(False, True, "latent_pred"), (True, False, "text_loss")],
    ids=["latent-nan", "text-nan"],
)
def test_on_nonfinite_raise(batch, nan_text, nan_latent, name):
    trainer = make_trainer(NaNOutputs(make_model(), text=nan_text, latent=nan_latent), loss={"on_nonfinite": "raise"})
    with pytest.raises(FloatingPointError, match=name):
        trainer(batch)


# -- batch handling --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["l2t", "t2l", "unconditional"])
def test_batch_is_not_modified(mode):
    batch = make_batch(seed=1)
    batch["attention_mask"] = batch["attention_mask"].float()
    before = {k: v.clone() for k, v in batch.items()}
    loss, _ = make_trainer(loss_type=mode)(batch)
    loss.backward()
    assert sorted(batch) == sorted(before)
    for key, value in batch.items():
        assert value.dtype == before[key].dtype and value.shape == before[key].shape
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("missing", ["latent", "input_ids"])
def test_missing_batch_key_is_a_key_error(batch, missing):
    broken = {k: v for k, v in batch.items() if k != missing}
    with pytest.raises(KeyError, match=missing):
        make_trainer()(broken)


@pytest.mark.parametrize("mode", ["t2l", "unconditional"])
def test_latent_layouts_give_identical_losses(batch, mode):
    model = make_model()
    draws = make_draws(DRAWS_BY_MODE[mode], seed=9)
    loss_3d, metrics_3d = make_trainer(model, mode)(batch, draws=draws)
    loss_2d, metrics_2d = make_trainer(model, mode)(dict(batch, latent=batch["latent"][:, 0]), draws=draws)
    torch.testing.assert_close(loss_2d, loss_3d, rtol=0, atol=0)
    assert metrics_2d == metrics_3d


def test_attention_mask_dtypes_give_identical_losses(batch):
    model = make_model()
    draws = make_draws(ALL_DRAWS, seed=10)
    losses = [
        make_trainer(model)(dict(batch, attention_mask=batch["attention_mask"].to(dtype)), draws=draws)[0]
        for dtype in (torch.long, torch.float32, torch.bool, torch.uint8)
    ]
    for other in losses[1:]:
        torch.testing.assert_close(other, losses[0], rtol=0, atol=0)
    # ... and the mask matters: without it the padded tails are attended to.
    unmasked, _ = make_trainer(model)({k: v for k, v in batch.items() if k != "attention_mask"}, draws=draws)
    assert not torch.equal(unmasked, losses[0])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("attention_mask", torch.ones(B, S - 1), r"attention_mask'\] must be \[B, S\]"),
        ("latent", torch.randn(B + 1, D), r"latent'\] must be \[B, D\] or \[B, 1, D\]"),
        ("latent", torch.randn(B, 2, D), r"latent'\] must be"),
        ("input_ids", torch.zeros(B, S, 1, dtype=torch.long), r"input_ids'\] must be \[B, S\]"),
    ],
    ids=["mask-length", "latent-batch", "latent-two-tokens", "ids-three-dims"],
)
def test_bad_batch_shapes_raise(batch, key, value, match):
    with pytest.raises(ValueError, match=match):
        make_trainer()(dict(batch, **{key: value}))
