"""Building the model, the vocabulary and the text noise process from a run config."""

from __future__ import annotations

from typing import Any

import torch

from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import seed_everything
from latentDLM_mmdit.settings import require, validate_settings
from latentDLM_mmdit.tokenizer import SyntheticVocab, vocab_from_config

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def dtype_from_config(config: Any) -> torch.dtype:
    """The torch dtype of `training.dtype` (validated against the schema)."""
    return DTYPES[validate_settings(config, "config", shared=True).config.training.dtype]


def build_model(config: Any, seed: int | None = None) -> MultimodalMMDiT:
    """MultimodalMMDiT from `model.*` (hidden_size, n_blocks, cond_dim, max_seq_len, latent_dim,
    cluster_size, ...) and the vocabulary (`tokenizer.*`, see `tokenizer.resolve_vocab`). Seeds
    Python, NumPy and torch first when `seed` is given (the residual-stream init draws from Python's
    `random`)."""
    settings = validate_settings(config, "config", shared=True).config
    require(settings, ["model.latent_dim"], "build_model")
    vocab = vocab_from_config(settings)
    if seed is not None:
        seed_everything(seed)
    return MultimodalMMDiT(
        settings.model,
        vocab_size=vocab.vocab_size,
        latent_dim=settings.model.latent_dim,
        cluster_size=settings.model.cluster_size,
    )


def build_text_side(config: Any) -> tuple[SyntheticVocab, MaskedDiffusion]:
    vocab = vocab_from_config(config)
    return vocab, MaskedDiffusion(vocab)


def build_model_uninitialized(
    model_config: Any, vocab_size: int, latent_dim: int, cluster_size: int = 0, device: str | torch.device = "cpu"
) -> MultimodalMMDiT:
    """A model whose parameters are allocated but not initialised (built on the meta device), for
    loading a checkpoint into: no time spent on random init, no second copy of the weights.
    Every parameter and persistent buffer must then be loaded (a strict load does that); the
    non-persistent buffers (the backbone's `dummy` device markers) are zeroed."""
    with torch.device("meta"):
        model = MultimodalMMDiT(model_config, vocab_size=vocab_size, latent_dim=latent_dim, cluster_size=cluster_size)
    model = model.to_empty(device=device)
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in persistent:
                buffer.zero_()
    return model
