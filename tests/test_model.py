"""MultimodalMMDiT: input validation, output shapes, latent layouts, None timesteps, the upstream
state-dict names, and purity (no prints, inputs untouched)."""

from __future__ import annotations

import pytest
import torch

from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import seed_everything
from tests.builders import TINY_MODEL, perturbed, tiny_model

# Sizes of their own: every one distinct (V 20, D 6, S_MAX 10, H 32, C 24), so a swapped size shows.
V, D, S_MAX, H, C = 20, 6, 10, 32, 24
BASE = dict(TINY_MODEL, hidden_size=H, cond_dim=C, max_seq_len=S_MAX)


def make_model(cluster_size: int = 0, seed: int = 0, **overrides) -> MultimodalMMDiT:
    return tiny_model(seed, vocab_size=V, latent_dim=D, cluster_size=cluster_size, base=BASE, **overrides).eval()


@pytest.fixture(scope="module")
def model() -> MultimodalMMDiT:
    return perturbed(make_model(), seed=100)  # time must matter, or the timestep comparisons are vacuous


@pytest.fixture(scope="module")
def cluster_model() -> MultimodalMMDiT:
    return perturbed(make_model(cluster_size=5, seed=1), seed=100)


def inputs(batch: int = 3, seq_len: int = 7, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[0, seq_len - 2 :] = 0  # padding in the first row's tail
    return {
        "text_tokens": torch.randint(0, V, (batch, seq_len), generator=gen),
        "latents": torch.randn(batch, 1, D, generator=gen),
        "text_timesteps": torch.rand(batch, generator=gen),
        "latent_timesteps": torch.rand(batch, generator=gen),
        "attention_mask": mask,
    }


def run(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


# -- bad inputs ------------------------------------------------------------------------------------
def _with(**changes):
    def build():
        kwargs = inputs()
        for key, value in changes.items():
            kwargs[key] = value(kwargs) if callable(value) else value
        return kwargs

    return build


def _set_token(value):
    def change(kwargs):
        ids = kwargs["text_tokens"].clone()
        ids[1, 2] = value
        return ids

    return change


BAD_INPUTS = [
    pytest.param(
        _with(text_tokens=lambda kw: torch.zeros(3, S_MAX + 1, dtype=torch.long), attention_mask=None),
        "longer than max_seq_len=10",
        id="sequence-too-long",
    ),
    pytest.param(_with(text_tokens=_set_token(-1)), r"outside the vocabulary \[0, 20\)", id="negative-token-id"),
    pytest.param(_with(text_tokens=_set_token(V)), r"ids in \[.*, 20\], outside the vocabulary", id="token-id-equal-V"),
    pytest.param(_with(text_tokens=_set_token(V + 100)), "outside the vocabulary", id="token-id-far-above-V"),
    pytest.param(_with(text_tokens=lambda kw: kw["text_tokens"].float()), "integer token ids", id="float-token-ids"),
    pytest.param(_with(text_tokens=lambda kw: kw["text_tokens"][0]), r"\[B, S\] tensor", id="one-dim-tokens"),
    pytest.param(_with(latents=lambda kw: torch.randn(3, 1, D + 1)), r"D=6, got \(3, 1, 7\)", id="latent-wrong-width"),
    pytest.param(_with(latents=lambda kw: torch.randn(4, 1, D)), r"B=3 .* got \(4, 1, 6\)", id="latent-wrong-batch"),
    pytest.param(_with(latents=lambda kw: torch.randn(3, 1, 1, D)), r"got \(3, 1, 1, 6\)", id="latent-four-dims"),
    pytest.param(_with(latents=None), "latents is required", id="latents-none"),
    pytest.param(
        _with(text_timesteps=torch.rand(2)),
        r"text_timesteps must have shape \[B\]=\[3\], got \(2,\)",
        id="text-timesteps-wrong-batch",
    ),
    pytest.param(
        _with(latent_timesteps=torch.rand(4)),
        r"latent_timesteps must have shape \[B\]=\[3\], got \(4,\)",
        id="latent-timesteps-wrong-batch",
    ),
    pytest.param(
        _with(latent_timesteps=torch.rand(3, 1)),
        r"latent_timesteps must have shape \[B\]",
        id="latent-timesteps-two-dims",
    ),
    pytest.param(
        _with(attention_mask=torch.ones(3, 6)),
        r"attention_mask must have shape \[B, S\]=\[3, 7\], got \(3, 6\)",
        id="mask-wrong-length",
    ),
    pytest.param(_with(attention_mask=torch.ones(7)), r"attention_mask must have shape", id="mask-one-dim"),
]


@pytest.mark.parametrize("build, match", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_problem(model, build, match):
    with pytest.raises(ValueError, match=match):
        run(model, **build())


@pytest.mark.parametrize(
    "config, match",
    [
        pytest.param({k: v for k, v in BASE.items() if k != "cond_dim"}, "cond_dim", id="missing-cond_dim"),
        pytest.param({"n_blocks": 1}, "hidden_size, cond_dim, max_seq_len", id="missing-several"),
    ],
)
def test_config_missing_keys_raise(config, match):
    with pytest.raises(ValueError, match=match):
        MultimodalMMDiT(config, vocab_size=V, latent_dim=D)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(vocab_size=0, latent_dim=D),
        dict(vocab_size=V, latent_dim=0),
        dict(vocab_size=V, latent_dim=D, cluster_size=-1),
    ],
    ids=["vocab-zero", "latent-zero", "cluster-negative"],
)
def test_invalid_sizes_raise(sizes):
    with pytest.raises(ValueError, match="invalid sizes"):
        MultimodalMMDiT(BASE, **sizes)


# -- outputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
def test_output_shapes(model, batch):
    outputs = run(model, **inputs(batch=batch, seq_len=S_MAX))
    assert isinstance(outputs, tuple) and len(outputs) == 2
    text_logits, latent_pred = outputs
    assert text_logits.shape == (batch, S_MAX, V)
    assert latent_pred.shape == (batch, 1, D), "latent_pred keeps its token axis, as upstream"
    assert text_logits.dtype == latent_pred.dtype == torch.float32
    assert bool(torch.isfinite(text_logits).all()) and bool(torch.isfinite(latent_pred).all())


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
def test_cluster_head_returns_three_outputs(cluster_model, batch):
    outputs = run(cluster_model, **inputs(batch=batch))
    assert len(outputs) == 3
    text_logits, latent_pred, cluster_logits = outputs
    assert text_logits.shape == cluster_logits.shape == (batch, 7, V)
    assert latent_pred.shape == (batch, 1, D)
    assert not torch.equal(text_logits, cluster_logits), "the cluster head is a separate Linear"


def test_latent_layouts_are_equivalent(model):
    """[B, D] equals [B, 1, D] exactly; [B, S, D] is averaged over S first."""
    kwargs = inputs()
    reference = run(model, **kwargs)
    flat = run(model, **dict(kwargs, latents=kwargs["latents"][:, 0]))
    for a, b in zip(reference, flat):
        torch.testing.assert_close(b, a, rtol=0, atol=0)

    many = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(5))
    averaged = run(model, **dict(kwargs, latents=many.mean(dim=1, keepdim=True)))
    from_many = run(model, **dict(kwargs, latents=many))
    for a, b in zip(averaged, from_many):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.equal(averaged[1], reference[1]), "a different latent must change latent_pred"


@pytest.mark.parametrize("which", ["both", "text", "latent"])
def test_none_timesteps_equal_zeros_bit_exactly(model, which):
    kwargs = inputs()
    zeros = torch.zeros(3)
    given = dict(kwargs, text_timesteps=zeros, latent_timesteps=zeros)
    omitted = dict(given)
    if which in ("both", "text"):
        omitted["text_timesteps"] = None
    if which in ("both", "latent"):
        omitted["latent_timesteps"] = None
    for a, b in zip(run(model, **given), run(model, **omitted)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # ... and zeros really differ from other times, so the comparison is not vacuous.
    other = run(model, **dict(given, text_timesteps=torch.ones(3), latent_timesteps=torch.ones(3)))
    reference = run(model, **given)
    assert not torch.equal(other[0], reference[0]) and not torch.equal(other[1], reference[1])


def test_attention_mask_none_equals_all_ones(model):
    kwargs = inputs()
    ones = run(model, **dict(kwargs, attention_mask=torch.ones(3, 7)))
    none = run(model, **dict(kwargs, attention_mask=None))
    for a, b in zip(ones, none):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    masked = run(model, **kwargs)  # row 0 has padding
    assert not torch.equal(masked[0][0], none[0][0]), "the mask must change the padded row"


def test_model_does_not_modify_inputs(model):
    kwargs = inputs()
    kwargs["attention_mask"] = kwargs["attention_mask"].float()
    before = {k: v.clone() for k, v in kwargs.items()}
    run(model, **kwargs)
    with torch.enable_grad():
        train_model = make_model(seed=3).train()
        text_logits, latent_pred = train_model(**kwargs)
        (text_logits.sum() + latent_pred.sum()).backward()
    for key, value in kwargs.items():
        assert value.dtype == before[key].dtype
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


# -- construction ----------------------------------------------------------------------------------
def test_constructor_prints_nothing(capsys):
    make_model(cluster_size=2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def expected_upstream_layout(hidden, cond, max_seq_len, cluster_size):
    """Names and shapes of every non-backbone tensor of an upstream checkpoint."""
    layout = {
        "text_encoder.token_embed.weight": (V, hidden),
        "text_encoder.position_embed": (1, max_seq_len, hidden),
        "latent_encoder.projection.0.weight": (2 * hidden, D),
        "latent_encoder.projection.0.bias": (2 * hidden,),
        "latent_encoder.projection.1.weight": (2 * hidden,),
        "latent_encoder.projection.1.bias": (2 * hidden,),
        "latent_encoder.projection.3.weight": (hidden, 2 * hidden),
        "latent_encoder.projection.3.bias": (hidden,),
        "latent_encoder.position_embed": (1, 1, hidden),
        "conditioning.combine.0.weight": (4 * cond, 2 * cond),
        "conditioning.combine.0.bias": (4 * cond,),
        "conditioning.combine.2.weight": (cond, 4 * cond),
        "conditioning.combine.2.bias": (cond,),
        "text_head.weight": (V, hidden),
        "text_head.bias": (V,),
        "latent_head.0.weight": (2 * hidden, hidden),
        "latent_head.0.bias": (2 * hidden,),
        "latent_head.3.weight": (D, 2 * hidden),
        "latent_head.3.bias": (D,),
    }
    for side in ("text", "latent"):
        layout.update(
            {
                f"conditioning.{side}_sigma_map.mlp.0.weight": (cond, 256),
                f"conditioning.{side}_sigma_map.mlp.0.bias": (cond,),
                f"conditioning.{side}_sigma_map.mlp.2.weight": (cond, cond),
                f"conditioning.{side}_sigma_map.mlp.2.bias": (cond,),
            }
        )
    if cluster_size > 0:
        layout["text_head_clusters.weight"] = (V, hidden)
        layout["text_head_clusters.bias"] = (V,)
    return layout


LAYOUT_CONFIGS = [
    pytest.param(
        dict(hidden_size=32, cond_dim=24, n_blocks=1, num_residual_streams=1, max_seq_len=10),
        0,
        id="h32-1block-1stream",
    ),
    pytest.param(
        dict(hidden_size=32, cond_dim=32, n_blocks=2, num_residual_streams=2, max_seq_len=16),
        0,
        id="h32-2blocks-2streams",
    ),
    pytest.param(
        dict(hidden_size=64, cond_dim=48, n_blocks=1, num_residual_streams=2, max_seq_len=12), 4, id="h64-cluster4"
    ),
    pytest.param(
        dict(hidden_size=32, cond_dim=16, n_blocks=3, num_residual_streams=1, max_seq_len=8),
        7,
        id="h32-3blocks-cluster7",
    ),
]


@pytest.mark.parametrize("config, cluster_size", LAYOUT_CONFIGS)
def test_state_dict_uses_upstream_names(config, cluster_size):
    seed_everything(0)
    model = MultimodalMMDiT(config, vocab_size=V, latent_dim=D, cluster_size=cluster_size)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    outside_backbone = {k: v for k, v in state.items() if not k.startswith("mmdit.")}
    assert outside_backbone == expected_upstream_layout(
        config["hidden_size"], config["cond_dim"], config["max_seq_len"], cluster_size
    )
    backbone = [k for k in state if k.startswith("mmdit.")]
    blocks = {int(k.split(".")[2]) for k in backbone if k.startswith("mmdit.blocks.")}
    assert blocks == set(range(config["n_blocks"]))
    has_streams = any("residual_fns" in k for k in backbone)
    assert has_streams == (config["num_residual_streams"] > 1)
    if has_streams:  # mmdit 0.3.x: ManifoldConstrainedHyperConnections parameter names
        assert any(k.endswith("h_post_scale") for k in backbone)
        assert not any(k.endswith("dynamic_alpha_scale") for k in backbone)
    # Position embeddings are Parameters (trained, saved), not buffers.
    params = dict(model.named_parameters())
    assert "text_encoder.position_embed" in params and "latent_encoder.position_embed" in params


def test_heads_are_initialised_as_upstream():
    model = make_model(cluster_size=3)
    for head in (model.text_head, model.latent_head[3], model.text_head_clusters):
        torch.testing.assert_close(head.bias, torch.zeros_like(head.bias), rtol=0, atol=0)
        assert 0.01 < float(head.weight.detach().std()) < 0.03, "weights ~ N(0, 0.02)"
    assert model.text_head_clusters is not None and make_model().text_head_clusters is None


def test_n_heads_and_qk_rmsnorm_change_nothing():
    """Upstream's backbone ignores n_heads and never passes qk_rmsnorm on."""
    reference = make_model(seed=4)
    variant = make_model(seed=4, n_heads=2, qk_rmsnorm=False)
    ref_state, var_state = reference.state_dict(), variant.state_dict()
    assert list(ref_state) == list(var_state)
    for key in ref_state:
        torch.testing.assert_close(var_state[key], ref_state[key], rtol=0, atol=0)
    kwargs = inputs()
    for a, b in zip(run(reference, **kwargs), run(variant, **kwargs)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
