"""Loss terms of the no_stopgrad_cycle trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised MSE; pred [B, 1, D] given target's [B, D] shape."""
    pred = F.normalize(pred.reshape(target.shape), dim=-1, eps=1e-8)
    return F.mse_loss(pred, F.normalize(target, dim=-1, eps=1e-8)).clamp(0.0, 10.0)


def text_term(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CE over every position of logits [B, S, V] against ids [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten()).clamp(0.0, 100.0)


def warm_ramp(base: float, warmup: int, ramp: int, step: int | None) -> float:
    if step is None:
        return base
    if base <= 0.0 or step < warmup:
        return 0.0
    return base if ramp <= 0 else base * min(1.0, (step - warmup) / ramp)


def categorical_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per position from softmax(logits) at global-RNG uniforms [B, S]."""
    u = torch.rand(logits.shape[:2], device=logits.device)
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp(max=logits.shape[-1] - 1)
