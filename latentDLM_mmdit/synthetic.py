"""Seeded synthetic batches in the upstream batch layout (nothing is downloaded)."""

from __future__ import annotations

import torch

from latentDLM_mmdit.tokenizer import VocabSpec


def synthetic_batch(
    vocab: VocabSpec,
    batch_size: int,
    seq_len: int,
    latent_dim: int,
    generator: torch.Generator,
    min_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch like the upstream data loader yields.

    Args:
        vocab: the vocabulary spec; real tokens avoid its mask and pad ids.
        batch_size: B.
        seq_len: S; each sample has a random real length in [min_len, S], the tail is padding.
        latent_dim: D.
        generator: torch.Generator for every draw.
        min_len: shortest real length (default: half of S, at least 1).

    Returns `input_ids` [B,S] int64 (pad id in the tail), `attention_mask` [B,S] int64 (1 = real),
    `latent` [B,1,D] float32.
    """
    if batch_size < 1 or seq_len < 1 or latent_dim < 1:
        raise ValueError(f"batch_size, seq_len and latent_dim must be >= 1, got {batch_size}, {seq_len}, {latent_dim}")
    special = {int(vocab.mask_token_id), int(vocab.pad_token_id)}
    allowed = torch.tensor([i for i in range(len(vocab)) if i not in special])
    ids = allowed[torch.randint(len(allowed), (batch_size, seq_len), generator=generator)]
    min_len = max(1, seq_len // 2) if min_len is None else min_len
    lengths = torch.randint(min_len, seq_len + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = torch.where(attention_mask.bool(), ids, torch.full_like(ids, int(vocab.pad_token_id)))
    latent = torch.randn(batch_size, 1, latent_dim, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "latent": latent}
