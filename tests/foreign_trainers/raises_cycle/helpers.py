"""Small helpers of the raises_cycle trainer (imported as a plain sibling module: `import helpers`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latents_2d(latent: torch.Tensor) -> torch.Tensor:
    """[B, 1, D] -> [B, D]."""
    return latent.squeeze(1) if latent.dim() == 3 else latent


def unit_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of the L2-normalised vectors, prediction given the target's shape first."""
    pred = F.normalize(pred.reshape(target.shape), dim=-1, eps=1e-8)
    return F.mse_loss(pred, F.normalize(target, dim=-1, eps=1e-8)).clamp(0.0, 10.0)


def ce_all(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CE over every position. logits [B, S, V], ids [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten()).clamp(0.0, 100.0)
