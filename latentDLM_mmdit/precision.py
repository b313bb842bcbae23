"""Mixed precision as a cluster run uses it: `torch.autocast` around the trainer's forward, and a
gradient scaler for float16.

`training.mixed_precision` (the settings schema):
    no    float32 everywhere (the reference numerics);
    bf16  forward under `torch.autocast(dtype=torch.bfloat16)`: matmuls and attention in bfloat16,
          reductions and losses in float32 as autocast decides; no scaler (bfloat16 has float32's
          exponent range);
    fp16  forward under `torch.autocast(dtype=torch.float16)` with `torch.amp.GradScaler`: the loss
          is scaled before backward, gradients unscaled before clipping, and a step whose gradients
          overflow is skipped by the scaler (counted in the metrics as `amp_skipped`).

The weights, the optimizer and the gradients stay float32 (autocast never changes parameters);
`training.dtype` is a different thing (it casts the trainers' inputs) and the two are independent.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

MIXED_PRECISION_MODES = ("no", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a `training.mixed_precision` value (None for "no")."""
    if mixed_precision == "no":
        return None
    if mixed_precision in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[mixed_precision]
    raise ValueError(f"training.mixed_precision={mixed_precision!r}; valid: {', '.join(MIXED_PRECISION_MODES)}")


def autocast(mixed_precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a trainer's forward runs in.

    Args:
        mixed_precision: "no", "bf16" or "fp16".
        device: the device the forward runs on (its type picks CPU or CUDA autocast).
    """
    dtype = autocast_dtype(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class LossScaler:
    """`torch.amp.GradScaler` for fp16, a pass-through otherwise, with one interface for the loop.

    Args:
        mixed_precision: "no", "bf16" or "fp16".
        device: the training device.
    """

    def __init__(self, mixed_precision: str, device: torch.device | str):
        autocast_dtype(mixed_precision)  # validates
        self.enabled = mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if self.enabled else None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Steps the optimizer (the scaler skips a step with inf/NaN gradients); True if it stepped."""
        if not self.enabled:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale_before

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
