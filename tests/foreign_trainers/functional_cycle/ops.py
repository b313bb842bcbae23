"""Stateless pieces of the cycle objective. Every random number comes from torch's global RNG."""

from __future__ import annotations

import torch
import torch.nn.functional as F

T_CEILING = 0.9999  # random-mode latent t stays below 1
UNIT_EPS = 1e-8  # L2-normalisation epsilon of the latent loss


def flat_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, 1, D] or [B, D] -> [B, D]."""
    if latent.dim() == 3 and latent.shape[1] == 1:
        return latent[:, 0]
    if latent.dim() != 2:
        raise ValueError(f"batch['latent'] must be [B, D] or [B, 1, D], got {tuple(latent.shape)}")
    return latent


def latent_times(mode: str, lo: float, hi: float, n: int, device) -> torch.Tensor:
    """Latent diffusion times [n]: all ones for "full", U[lo, hi) capped below 1 for "random"."""
    if mode == "full":
        return torch.ones(n, device=device)
    u = torch.rand(n, device=device)
    return (lo + (hi - lo) * u).clamp(max=T_CEILING)


def ramped(base: float, warmup: int, ramp: int, iteration: int | None) -> float:
    """Cycle weight at `iteration`: 0 during warmup, then a linear ramp to `base`."""
    if iteration is None:
        return base
    if base <= 0.0 or iteration < warmup:
        return 0.0
    return base if ramp <= 0 else base * min(1.0, (iteration - warmup) / float(ramp))


def every_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean CE over every position (padding too), clamped to [0, 100]. logits [B, S, V], ids [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten()).clamp(0.0, 100.0)


def direction_mse(guess: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """MSE of the unit vectors, clamped to [0, 10]; `guess` is given `goal`'s shape first."""
    guess = guess.reshape(goal.shape)  # [B, 1, D] -> [B, D]
    unit_guess = F.normalize(guess, dim=-1, eps=UNIT_EPS)
    unit_goal = F.normalize(goal, dim=-1, eps=UNIT_EPS)
    return F.mse_loss(unit_guess, unit_goal).clamp(0.0, 10.0)


def recover_x0(diffusion, noisy: torch.Tensor, t: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """x0 estimate [B, D] from the model's output under the diffusion's parameterization."""
    guess = guess.reshape(noisy.shape)  # [B, 1, D] -> [B, D]
    kind = diffusion.parameterization
    if kind == "epsilon":
        return diffusion.predict_x0_from_eps(noisy, t, guess)
    if kind == "v_param":
        return diffusion.predict_x0_from_v(noisy, t, guess)
    if kind == "x0":
        return guess
    raise ValueError(f"unknown latent parameterization {kind!r}")


def pseudo_labels(logits: torch.Tensor, how: str) -> torch.Tensor:
    """Token ids [B, S] from logits [B, S, V]: argmax, or a categorical draw (inverse CDF at
    uniforms from the global RNG)."""
    if how == "argmax":
        return logits.argmax(-1)
    if how == "categorical":
        u = torch.rand(logits.shape[:2], device=logits.device)  # [B, S]
        cdf = logits.float().softmax(-1).cumsum(-1)  # [B, S, V]
        return (cdf < u[..., None]).sum(-1).clamp(max=logits.shape[-1] - 1)
    raise ValueError(f"unknown pseudo-token sampling {how!r}; use argmax or categorical")
