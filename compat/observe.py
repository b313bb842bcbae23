"""Observing a trainer instead of asking it: every model pass a step makes, named by what it was
given, never by its position or the trainer's attributes.

`PassRecorder` wraps the model. Each call is bound to the model's forward signature (so positional
and keyword calls are alike), and its inputs and outputs are kept. `classify_passes` then names
each pass from its inputs and the batch:

    text all [MASK], latents = the batch's clean latents    -> L2T
    text all [MASK], other latents (x0 reconstructed)       -> cycle_text
    text = the batch's clean text                           -> T2L
    text partly [MASK], the rest the clean text             -> masked (stable unconditional)
    any other text (pseudo tokens)                          -> cycle_latent

A second pass whose text equals the clean text (pseudo tokens that happen to be perfect) is
cycle_latent: a step has one base T2L pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

T2L, L2T, CYCLE_TEXT, CYCLE_LATENT, MASKED = "T2L", "L2T", "cycle_text", "cycle_latent", "masked"
# What each pass must be given, in the words of the review (for messages about a missing pass).
PASS_INPUTS = {
    T2L: "the clean text, t_text = 0, the latents noised at t_lat",
    L2T: "every token [MASK], t_text = 1, the clean latents at t_latent = 0",
    CYCLE_TEXT: "every token [MASK], t_text = 1, the x0 reconstructed from the T2L prediction",
    CYCLE_LATENT: "pseudo tokens from the L2T logits, the latents noised again",
    MASKED: "the text partly [MASK] at t_text, the latents noised at t_lat",
}
FORWARD_ARGUMENTS = ("text_tokens", "latents", "text_timesteps", "latent_timesteps", "attention_mask")


@dataclass
class ModelPass:
    """One call of the model: what it was given (detached copies) and what it returned."""

    index: int
    positional: int  # arguments passed by position
    keywords: tuple[str, ...]  # arguments passed by keyword
    text_tokens: torch.Tensor  # [B, S]
    latents: torch.Tensor  # as passed: [B, 1, D] or [B, D]
    text_t: torch.Tensor | None  # [B] or None
    latent_t: torch.Tensor | None  # [B] or None
    attention_mask: torch.Tensor | None  # [B, S] or None
    latents_require_grad: bool  # the latents carried an autograd graph (no stop-grad)
    outputs: tuple[torch.Tensor, ...] = ()
    kind: str = "unknown"

    @property
    def batch_size(self) -> int:
        return int(self.text_tokens.shape[0])

    @property
    def latents_2d(self) -> torch.Tensor:
        return self.latents.reshape(self.batch_size, -1)  # [B, D]

    def timestep(self, which: str) -> torch.Tensor:
        """The text or latent timestep as the model used it: None means zeros."""
        t = self.text_t if which == "text" else self.latent_t
        return torch.zeros(self.batch_size) if t is None else t.detach().float().cpu().reshape(-1)


class PassRecorder(nn.Module):
    """Wraps a model and records every pass (see the module docstring).

    Args:
        inner: the model.
        keep_outputs: keep detached outputs (logits are [B,S,V]: a large V adds up).
    """

    def __init__(self, inner: nn.Module, keep_outputs: bool = True):
        super().__init__()
        self.inner = inner
        self.keep_outputs = keep_outputs
        self.passes: list[ModelPass] = []
        self._signature = inspect.signature(inner.forward)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments

        def get(name: str) -> Any:
            value = given.get(name)
            return value.detach().clone() if torch.is_tensor(value) else value

        latents = given.get("latents")
        record = ModelPass(
            index=len(self.passes),
            positional=len(args),
            keywords=tuple(sorted(kwargs)),
            text_tokens=get("text_tokens"),
            latents=get("latents"),
            text_t=get("text_timesteps"),
            latent_t=get("latent_timesteps"),
            attention_mask=get("attention_mask"),
            latents_require_grad=bool(torch.is_tensor(latents) and latents.requires_grad),
        )
        out = self.inner(*args, **kwargs)
        if self.keep_outputs:
            record.outputs = tuple(o.detach() for o in out)
        self.passes.append(record)
        return out

    # The trainers read these through the model (e.g. `model.vocab_size`).
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def classify_passes(passes: list[ModelPass], batch: dict[str, torch.Tensor], mask_token_id: int) -> list[ModelPass]:
    """Names each pass (in place) from its inputs and the batch; returns the passes."""
    ids = batch["input_ids"].detach().cpu()
    clean_latents = batch["latent"].detach().float().cpu().reshape(ids.shape[0], -1)
    seen_t2l = False
    for p in passes:
        tokens = p.text_tokens.detach().cpu()
        if tokens.shape != ids.shape:
            p.kind = "unknown"
            continue
        masked = tokens == mask_token_id
        latents = p.latents_2d.detach().float().cpu()
        clean = clean_latents.to(p.latents.dtype).float()  # the clean latents as fed in the pass's dtype
        if bool(masked.all()):
            p.kind = L2T if latents.shape == clean.shape and torch.equal(latents, clean) else CYCLE_TEXT
        elif torch.equal(tokens, ids):
            p.kind = CYCLE_LATENT if seen_t2l else T2L
            seen_t2l = True
        elif bool(masked.any()) and torch.equal(tokens[~masked], ids[~masked]):
            p.kind = MASKED
        else:
            p.kind = CYCLE_LATENT
    return passes


def passes_of(passes: list[ModelPass], kind: str) -> list[ModelPass]:
    return [p for p in passes if p.kind == kind]
