"""Helpers of the uniform_t_cycle trainer (a plain sibling module: `import helpers`). A different
file from raises_cycle/helpers.py under the same module name, as two users' repositories would have."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


class Draws:
    """Named random draws: injected tensors where given, otherwise from `generator`.

    Args:
        generator: the trainer's CPU torch.Generator.
        injected: optional name -> tensor; names outside `allowed` are refused.
        allowed: the draw names the trainer knows.
    """

    def __init__(
        self, generator: torch.Generator, injected: Mapping[str, torch.Tensor] | None, allowed: tuple[str, ...]
    ):
        self.generator = generator
        self.injected = dict(injected or {})
        unknown = sorted(set(self.injected) - set(allowed))
        if unknown:
            raise KeyError(f"unknown draw name(s) {unknown}; this trainer draws {list(allowed)}")

    def take(self, name: str, shape: tuple[int, ...], normal: bool) -> torch.Tensor:
        if name in self.injected:
            value = self.injected[name]
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"injected draw {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
            return value.float()
        fn = torch.randn if normal else torch.rand
        return fn(shape, generator=self.generator)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred [B, 1, D] reshaped to target [B, D]; MSE of unit vectors clamped to [0, 10]."""
    pred = F.normalize(pred.reshape(target.shape), p=2, dim=-1, eps=1e-8)
    target = F.normalize(target, p=2, dim=-1, eps=1e-8)
    return F.mse_loss(pred, target).clamp(0.0, 10.0)


def full_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean CE over every position (padding included), clamped to [0, 100]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).clamp(0.0, 100.0)
