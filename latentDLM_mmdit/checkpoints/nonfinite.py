"""NaN/Inf weights found one tensor at a time, in bounded chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from latentDLM_mmdit.checkpoints.source import _as_source, CheckpointSource

NON_FINITE_CHUNK = 1 << 24  # elements counted per step (bounds the temporary masks)


@dataclass(frozen=True)
class NonFiniteTensor:
    name: str
    nan: int
    posinf: int
    neginf: int
    numel: int


def _count_non_finite(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(NaN, +Inf, -Inf) counts, NON_FINITE_CHUNK values at a time."""
    flat = tensor.reshape(-1)
    nan = posinf = neginf = 0
    for start in range(0, flat.numel(), NON_FINITE_CHUNK):
        chunk = flat[start : start + NON_FINITE_CHUNK]
        nan += int(torch.isnan(chunk).sum())
        if not chunk.is_complex():
            posinf += int(torch.isposinf(chunk).sum())
            neginf += int(torch.isneginf(chunk).sum())
    return nan, posinf, neginf


def find_non_finite(checkpoint: CheckpointSource | str | Path) -> list[NonFiniteTensor]:
    """The model tensors holding NaN or +-Inf, with counts; one tensor in memory at a time (each
    is released before the next is read), counted in chunks of NON_FINITE_CHUNK values.

    Args:
        checkpoint: an opened CheckpointSource (left open) or a path (opened and closed here)."""
    source, owned = _as_source(checkpoint)
    found = []
    try:
        for key in source.mapping:
            if source.dtypes[key].is_floating_point or source.dtypes[key].is_complex:
                nan, posinf, neginf = _count_non_finite(source.tensor(key))
                if nan or posinf or neginf:
                    found.append(NonFiniteTensor(key, nan, posinf, neginf, torch.Size(source.shapes[key]).numel()))
    finally:
        if owned:
            source.close()
    return found
