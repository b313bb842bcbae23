"""The trainer protocol the gate judges any trainer by: upstream's.

A trainer class needs no adapter and no base class. Required:

    class MyCycleTrainer(torch.nn.Module):          # or any class with forward()
        def __init__(self, model, tokenizer, text_noise_schedule, dtype, config): ...
        def forward(self, batch) -> tuple[torch.Tensor, dict]: ...

- `model`: a `MultimodalMMDiT` (wrapped by the harness in a recorder that behaves like it); call it
  with its arguments, by keyword or by position.
- `tokenizer`: anything with `mask_token_id`, `pad_token_id` and `len()`.
- `text_noise_schedule`: a `MaskedDiffusion` over that tokenizer.
- `dtype`: the dtype of latents and timesteps it feeds the model (`training.dtype`).
- `config`: the validated run config (an OmegaConf DictConfig; every `loss.*`, `model.*` key is
  present, with the schema's defaults), a copy of the trainer's own that it may write to.
- `batch`: `input_ids` [B,S] int64, `attention_mask` [B,S], `latent` [B,1,D].
- returns the scalar loss (with its autograd graph) and a dict of metrics (any names).

Optional, found by inspection (never by the class name):

- a `step=` keyword of `forward`: the global step, for warmups and ramps. Without it no loop can
  drive a ramp, and the gate says so.
- a `draws=` keyword of `forward` with a class attribute `DRAW_NAMES`: the named random draws the
  trainer takes instead of drawing (`latent_noise` [B,D], `cycle_latent_noise` [B,D], `latent_t`
  [B], `cycle_latent_t` [B] and `pseudo_token_uniform` [B,S] uniforms, ...). Without it, its draws
  from torch / Python `random` / NumPy are captured and served the same numbers
  (`compat.draw_capture`), and the determinism row reports that it uses the global RNG.
- a `.model` attribute holding the model: the training loop wraps it in DDP (the DDP row needs it).
- a class attribute `READS_CONFIG_ONLY = True`: the trainer never writes to its config, so it is
  handed the sealed (read-only) validated config itself instead of a copy
  (`latentDLM_mmdit.trainer_base.config_for`); this project's trainers declare it.

Everything the rows check they observe (`compat.observe`, `compat.subjects`): the model passes and
what each was given, the returned loss, its gradients; never attributes or metric names.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class CompatTrainer(Protocol):
    """What the gate needs of a trainer (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        text_noise_schedule: torch.nn.Module,
        dtype: torch.dtype,
        config: Any,
    ) -> None: ...

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Mapping[str, Any]]: ...
