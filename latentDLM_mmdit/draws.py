"""Random draws a trainer step makes, injectable so that two trainers see identical numbers.

A step asks a `DrawSource` for each named draw. When the caller injected a tensor under that name
it is used (after a shape check); otherwise it comes from the trainer's own `torch.Generator`,
never from the global RNG. The generator lives on the CPU so that a CUDA run draws exactly the
numbers a CPU run draws. Every draw used is recorded in `used`.
"""

from __future__ import annotations

from typing import Mapping

import logging

import torch

logger = logging.getLogger(__name__)


class DrawSource:
    """Args:
    generator: the trainer's CPU generator.
    injected: optional mapping name -> tensor supplied by the caller.
    allowed: the names this trainer understands; any other injected name is an error.
    owner: the trainer's name, for error messages.
    """

    def __init__(
        self,
        generator: torch.Generator,
        injected: Mapping[str, torch.Tensor] | None,
        allowed: tuple[str, ...],
        owner: str,
    ):
        injected = dict(injected or {})
        unknown = sorted(set(injected) - set(allowed))
        if unknown:
            raise KeyError(f"{owner} does not use draw(s) {unknown}; it accepts {list(allowed)}")
        for name, value in injected.items():
            if not torch.is_tensor(value):
                raise TypeError(f"injected draw {name!r} must be a tensor, got {type(value).__name__}")
        self.generator = generator
        self.injected = injected
        self.owner = owner
        self.used: dict[str, torch.Tensor] = {}

    @torch.compiler.disable  # a generator draw (or an injected tensor) enters a compiled step as an input
    def _take(self, name: str, shape: tuple[int, ...], device, kind: str) -> torch.Tensor:
        if name in self.injected:
            value = self.injected[name]
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"injected draw {name!r} has shape {tuple(value.shape)}, {self.owner} needs {tuple(shape)}"
                )
            value = value.to(device=device, dtype=torch.float32)
        else:
            fn = torch.rand if kind == "uniform" else torch.randn
            value = fn(shape, generator=self.generator, dtype=torch.float32).to(device)
        self.used[name] = value
        return value

    def unused(self) -> list[str]:
        """Injected draws this step did not consume (a term whose weight is 0, t = 1 in full mode,
        a mode that draws nothing): allowed, so one set of draws can serve every setting, and
        reported so that a caller can tell."""
        names = sorted(set(self.injected) - set(self.used))
        if names:
            logger.info(
                "%s: injected draw(s) %s not used by this step (it drew %s)", self.owner, names, sorted(self.used)
            )
        return names

    def uniform(self, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
        """U[0, 1) float32 draws."""
        return self._take(name, shape, device, "uniform")

    def normal(self, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
        """N(0, 1) float32 draws."""
        return self._take(name, shape, device, "normal")


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen
