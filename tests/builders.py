"""The tiny models, vocabulary, batches and draws the unit tests build, in one place.

Every model here is the real `MultimodalMMDiT` on the real mmdit backbone, only small. A test file
that needs other sizes passes them to these builders and says why in one line beside them;
`tests/test_hygiene.py` fails when a file constructs its own model outside a test function.
Import as `from tests.builders import ...` (tests/conftest.py exposes some as fixtures).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from types import MappingProxyType

import torch

from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import seed_everything
from latentDLM_mmdit.synthetic import synthetic_batch
from latentDLM_mmdit.tokenizer import SyntheticVocab

# The model section of the tiny model: one block, two residual streams (upstream's value, not
# mmdit's default 4). Read-only: a file that needs other sizes makes `dict(TINY_MODEL, key=value)`.
TINY_MODEL = MappingProxyType(
    {"hidden_size": 32, "n_blocks": 1, "cond_dim": 32, "max_seq_len": 8, "num_residual_streams": 2}
)
# V = 16 with the mask id last and the pad id first, as a BERT-style vocabulary has them.
TINY_VOCAB = SyntheticVocab(16, mask_token_id=15, pad_token_id=0)
# The same shrinking as config overrides, for the packaged configs (stable.yaml, cycle.yaml).
TINY_OVERRIDES = ["model.n_blocks=1", "model.hidden_size=32", "model.cond_dim=32"]


def tiny_model(
    seed: int | None = 0,
    *,
    vocab_size: int = len(TINY_VOCAB),
    latent_dim: int = 4,
    cluster_size: int = 0,
    base: Mapping = TINY_MODEL,
    device: str | torch.device | None = None,
    **config,
) -> MultimodalMMDiT:
    """A MultimodalMMDiT at the sizes of `base` (TINY_MODEL unless given) updated by `config`.

    Args:
        seed: seeds torch, Python's `random` and NumPy first (`seed_everything`: the residual
            streams' init draws from Python's `random`); None seeds nothing (weights loaded after,
            or a meta-device model).
        vocab_size, latent_dim, cluster_size: the model's constructor arguments (V, D, clusters).
        base: the model section the overrides start from; `config`: keys of it to change.
        device: where the parameters are created ("meta": shapes only, nothing allocated).
    """
    if seed is not None:
        seed_everything(seed)
    with torch.device(device) if device is not None else nullcontext():
        return MultimodalMMDiT(
            dict(base, **config), vocab_size=vocab_size, latent_dim=latent_dim, cluster_size=cluster_size
        )


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Adds scale * N(0, 1) (from a generator seeded with `seed`) to every parameter, in place.

    mmdit zero-initialises its conditioning gates: unperturbed, two seeds can share those weights
    and the timesteps barely matter, which would make round trips and time comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


def sensitized(model: torch.nn.Module, seed: int, fill_std: float = 0.2, time_gain: float = 30.0) -> torch.nn.Module:
    """Makes both timesteps visibly change both outputs, in place.

    At init they barely do: mmdit zero-initialises the time-conditioning projections
    (`*.to_cond.2.weight`), the post-branch gammas and the hyper-connection dynamics, and the
    sinusoidal embedding of a t in [0, 1] (upstream's convention) moves only its few highest
    frequencies. So every all-zero parameter is filled with N(0, fill_std) values (a generator
    seeded with `seed`) and the first layers of the two timestep MLPs are scaled by `time_gain`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=gen) * fill_std)
            if name.startswith("conditioning.") and name.endswith("sigma_map.mlp.0.weight"):
                param.mul_(time_gain)
    return model


def tiny_batch(
    batch_size: int,
    seq_len: int,
    latent_dim: int,
    seed: int,
    vocab: SyntheticVocab = TINY_VOCAB,
    min_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """`synthetic_batch` from a generator seeded with `seed`: input_ids [B, S], attention_mask
    [B, S] (real lengths in [min_len, S], default S // 2), latent [B, 1, D]."""
    return synthetic_batch(vocab, batch_size, seq_len, latent_dim, torch.Generator().manual_seed(seed), min_len=min_len)


def draw_shapes(batch_size: int, seq_len: int, latent_dim: int) -> dict[str, tuple[int, ...]]:
    """The shape of every draw a trainer takes, by the trainers' draw names."""
    b, s, d = batch_size, seq_len, latent_dim
    return {
        "text_t": (b,),
        "latent_t": (b,),
        "cycle_latent_t": (b,),
        "mask_uniform": (b, s),
        "pseudo_token_uniform": (b, s),
        "latent_noise": (b, d),
        "cycle_latent_noise": (b, d),
    }


def tiny_draws(names, batch_size: int, seq_len: int, latent_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Draws to inject, in the order of `names` from one generator seeded with `seed`: the
    `*_noise` draws N(0, 1), the others (timesteps, uniforms) U[0, 1)."""
    shapes = draw_shapes(batch_size, seq_len, latent_dim)
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise KeyError(f"tiny_draws: unknown draw names {unknown}; known: {sorted(shapes)}")
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn if name.endswith("_noise") else torch.rand)(shapes[name], generator=gen) for name in names
    }
