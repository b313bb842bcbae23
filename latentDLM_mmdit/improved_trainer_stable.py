"""The stable L2T / T2L / unconditional trainer (upstream's `MultimodalDiffusionTrainer_new`).

On finite inputs its losses equal upstream's. Differences, all deliberate:
- every random draw comes from the trainer's own generator or from the caller (`draws=`);
- the config is validated against the schema (`latentDLM_mmdit.settings`): a typo, a wrong type or
  a value out of range is an error, and a key the config lacks takes the schema's stated default;
- latent diffusion settings resolve from `model.*` (root accepted; disagreement is an error);
- a cluster-head model (three outputs) works (upstream defect 3);
- a non-finite term is reported in the metrics, and `loss.on_nonfinite: raise` raises.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn

from latentDLM_mmdit.draws import DrawSource
from latentDLM_mmdit.losses import is_finite, masked_text_ce, normalized_latent_mse, token_accuracy
from latentDLM_mmdit.settings import BASE_MODES, STABLE_LOSS_TYPES, require
from latentDLM_mmdit.trainer_base import (  # noqa: F401  (as_config, prepare_batch: upstream's names)
    FALLBACK_TOTAL_LOSS,
    DiffusionTrainerBase,
    as_config,
    prepare_batch,
    split_model_outputs,
)

logger = logging.getLogger(__name__)

TEXT_GROUP_KEYS = (
    "text_embed",
    "text_head",
    "vocab",
    "token_embed",
    "text_proj",
    "text_norm",
    "text_out",
    "text_encoder",
)
LATENT_GROUP_KEYS = (
    "latent_proj",
    "latent_head",
    "latent_embed",
    "latent_norm",
    "latent_out",
    "latent_linear",
    "latent_encoder",
)
LOSS_TYPES = STABLE_LOSS_TYPES


def parameter_group(name: str) -> str:
    """'text', 'latent' or 'shared', by upstream's name substrings."""
    lowered = name.lower()
    if any(key in lowered for key in TEXT_GROUP_KEYS):
        return "text"
    if any(key in lowered for key in LATENT_GROUP_KEYS):
        return "latent"
    return "shared"


def frozen_groups(mode: str) -> tuple[str, ...]:
    """Parameter groups a stable mode freezes."""
    if mode == "l2t":
        return ("latent",)
    if mode == "t2l":
        return ("text",)
    if mode == "unconditional":
        return ()
    raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(BASE_MODES)}")


class MultimodalDiffusionTrainer(DiffusionTrainerBase):
    """Stable trainer.

    Args:
        model: a `MultimodalMMDiT` (or anything with its forward contract).
        tokenizer: anything with `mask_token_id`, `pad_token_id`, `__len__`.
        text_noise_schedule: a `MaskedDiffusion` (its buffers are saved as `text_noise_schedule.*`).
        dtype: dtype of latents and timesteps fed to the model.
        config: the run config (mapping or DictConfig), validated against the schema
            (`latentDLM_mmdit.settings`, where the defaults are stated); reads `loss.loss_type`
            (l2t | t2l | unconditional | sequential | random; required), `loss.latent_loss_weight`,
            `loss.on_nonfinite` (upstream | raise), `training.seed`, `training.sequential_schedule`,
            `training.mode_weights` and `model.latent_*` (see `latent_settings`).
    """

    DRAW_NAMES = ("text_t", "latent_t", "mask_uniform", "latent_noise")

    def __init__(
        self, model: nn.Module, tokenizer: Any, text_noise_schedule: nn.Module, dtype: torch.dtype, config: Any
    ):
        super().__init__(model, tokenizer, text_noise_schedule, dtype, config)
        require(self.settings, ["loss.loss_type"], type(self).__name__)
        self.loss_type = self.settings.loss.loss_type
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type={self.loss_type!r} is not a stable mode; valid: {', '.join(LOSS_TYPES)}")
        self.sequential_schedule = list(self.settings.training.sequential_schedule)  # [ScheduleItem]
        self.mode_weights = list(self.settings.training.mode_weights)
        self.current_step = 0
        self.current_epoch = 0
        self.param_groups = {name: parameter_group(name) for name, _ in model.named_parameters()}

    # -- mode selection and freezing ------------------------------------------------------------
    def training_mode(self, step: int | None = None) -> str:
        if self.loss_type in BASE_MODES:
            return self.loss_type
        if self.loss_type == "sequential":
            schedule = self.sequential_schedule
            if not schedule:
                return "unconditional"
            if step is not None:
                lengths = [item.steps for item in schedule]
                position = step % sum(lengths)
            else:
                lengths = [item.epochs for item in schedule]
                position = self.current_epoch % sum(lengths)
            cumulative = 0
            for item, length in zip(schedule, lengths):
                cumulative += length
                if position < cumulative:
                    return item.type
            return "unconditional"
        weights = torch.tensor(self.mode_weights, dtype=torch.float64)
        choice = int(torch.multinomial(weights / weights.sum(), 1, generator=self.generator))
        return ("unconditional", "l2t", "t2l")[choice]

    def apply_freezing(self, mode: str) -> None:
        """requires_grad per upstream's groups; frozen parameters lose their .grad."""
        frozen = frozen_groups(mode)
        for name, param in self.model.named_parameters():
            trainable = self.param_groups.get(name, parameter_group(name)) not in frozen
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None

    def trainable_parameter_names(self, mode: str) -> list[str]:
        frozen = frozen_groups(mode)
        return sorted(n for n, g in self.param_groups.items() if g not in frozen)

    # -- the step -------------------------------------------------------------------------------
    # Under torch.compile (training.compile_model) dynamo skips this frame but traces what it calls:
    # the mode and the freezing are host-side Python (a per-step int never becomes a graph constant),
    # `stable_step` is the traced tensor program.
    @torch.compiler.disable(recursive=False)
    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        step: int | None = None,
        draws: Mapping[str, torch.Tensor] | None = None,
    ):
        """One stable step. Returns (loss, metrics).

        Args:
            batch: `input_ids` [B,S] int, `latent` [B,D] or [B,1,D], optional `attention_mask` [B,S].
            step: the global step (selects the sequential mode; stored as `current_step`).
            draws: optional injected random draws: `text_t` [B], `latent_t` [B],
                `mask_uniform` [B,S], `latent_noise` [B,D]; missing ones come from the generator.
        """
        self.current_step = step if step is not None else self.current_step
        mode = self.training_mode(step)
        self.apply_freezing(mode)
        return self.stable_step(batch, mode, draws)

    def stable_step(self, batch: Mapping[str, torch.Tensor], mode: str, draws: Mapping[str, torch.Tensor] | None):
        """The step in `mode` (unconditional | l2t | t2l) with the groups already frozen: (loss, metrics)."""
        source = DrawSource(self.generator, draws, self.DRAW_NAMES, "stable trainer")
        input_ids, attention_mask, latents = prepare_batch(batch, self.dtype, "stable trainer")
        batch_size, seq_len = input_ids.shape
        device = input_ids.device

        text_target = text_mask = latent_target = None
        if mode == "unconditional":
            text_t = source.uniform("text_t", (batch_size,), device)
            latent_t = source.uniform("latent_t", (batch_size,), device)
            uniform = source.uniform("mask_uniform", (batch_size, seq_len), device)
            noisy_ids = self.text_noise_schedule.sample_zt(input_ids, text_t, uniform=uniform)
            text_target, text_mask = input_ids, noisy_ids == self.mask_token_id
            noise = source.normal("latent_noise", tuple(latents.shape), device).to(latents.dtype)
            model_latents, latent_target = self.latent_diffusion.add_noise(latents, latent_t, noise)
        elif mode == "l2t":
            text_t = torch.ones(batch_size, device=device)
            latent_t = torch.zeros(batch_size, device=device)
            noisy_ids = torch.full_like(input_ids, self.mask_token_id)
            text_target, text_mask = input_ids, torch.ones_like(input_ids, dtype=torch.bool)
            model_latents = latents
        else:  # t2l
            text_t = torch.zeros(batch_size, device=device)
            latent_t = torch.ones(batch_size, device=device)
            noisy_ids = input_ids
            noise = source.normal("latent_noise", tuple(latents.shape), device).to(latents.dtype)
            model_latents, latent_target = self.latent_diffusion.add_noise(latents, latent_t, noise)
        self.unused_draws = source.unused()
        self.last_draws = source.used

        text_logits, latent_pred = split_model_outputs(
            self.model(
                text_tokens=noisy_ids,
                latents=model_latents.unsqueeze(1),  # [B, 1, D]
                text_timesteps=text_t.to(self.dtype),
                latent_timesteps=latent_t.to(self.dtype),
                attention_mask=attention_mask,
            )
        )
        return self._loss_and_metrics(
            mode, text_logits, latent_pred, text_target, text_mask, latent_target, latents, device
        )

    def _loss_and_metrics(self, mode, text_logits, latent_pred, text_target, text_mask, latent_target, latents, device):
        zero = torch.tensor(0.0, device=device, dtype=self.dtype)
        total = zero
        nonfinite: list[str] = []

        text_loss = zero
        if text_target is not None and bool(text_mask.any()):
            text_loss = masked_text_ce(text_logits, text_target, text_mask)
            if is_finite(text_loss):
                total = total + text_loss
            else:
                nonfinite.append("text_loss")
                text_loss = zero

        latent_loss = zero
        if latent_target is not None:
            if not is_finite(latent_pred):
                nonfinite.append("latent_pred")
            elif not is_finite(latent_target):
                nonfinite.append("latent_target")
            else:
                latent_loss = normalized_latent_mse(latent_pred, latent_target)
                if is_finite(latent_loss):
                    total = total + latent_loss * self.latent_loss_weight
                else:
                    nonfinite.append("latent_loss")
                    latent_loss = zero

        if not is_finite(total):
            nonfinite.append("loss")
            total = torch.tensor(FALLBACK_TOTAL_LOSS, device=device, dtype=self.dtype)
        if nonfinite:
            message = f"stable trainer ({mode}): non-finite {', '.join(nonfinite)}"
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message)
            logger.warning("%s; replaced as upstream does (loss.on_nonfinite=upstream)", message)

        return total, self._metrics(
            mode,
            total,
            text_loss,
            latent_loss,
            text_logits,
            text_target,
            text_mask,
            latent_pred,
            latent_target,
            latents,
            nonfinite,
        )

    @torch.compiler.disable  # Python floats for the log: outside a compiled step's graph
    def _metrics(
        self,
        mode,
        total,
        text_loss,
        latent_loss,
        text_logits,
        text_target,
        text_mask,
        latent_pred,
        latent_target,
        latents,
        nonfinite,
    ) -> dict[str, Any]:
        with torch.no_grad():
            metrics: dict[str, Any] = {
                "loss": float(total.item()),
                "text_loss": float(text_loss.item()),
                "latent_loss": float(latent_loss.item()),
                "text_accuracy": token_accuracy(text_logits, text_target, text_mask)
                if text_target is not None
                else 0.0,
                "training_mode": mode,
                "latent_norm": float(latents.norm(dim=-1).mean().item()),
            }
            if latent_target is not None:
                metrics["latent_pred_norm"] = float(latent_pred.norm(dim=-1).mean().item())
            if nonfinite:
                metrics["nonfinite"] = list(nonfinite)
        return metrics
