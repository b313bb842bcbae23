"""What the stable and the cycle trainer share: the trainer base (model, text side, the validated
settings, latent diffusion, latent loss weight, non-finite policy, the trainer's own generator),
batch preparation and the splitting of the model's outputs."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion
from latentDLM_mmdit.draws import make_generator
from latentDLM_mmdit.latent_settings import latent_settings_of
from latentDLM_mmdit.settings import (  # noqa: F401
    NONFINITE_POLICIES,
    RunSettings,
    sealed_resolution,
    validate_settings,
    writable_copy,
)

logger = logging.getLogger(__name__)

FALLBACK_TOTAL_LOSS = 0.01


def as_config(config: Any) -> DictConfig:
    if isinstance(config, DictConfig):
        return config
    if isinstance(config, Mapping):
        return OmegaConf.create(dict(config))
    raise TypeError(f"config must be a mapping or an OmegaConf DictConfig, got {type(config).__name__}")


def config_for(trainer_cls: type, config: Any) -> Any:
    """The config to hand a new `trainer_cls`. A sealed validated config (read-only, see
    `latentDLM_mmdit.settings`) goes as it is to a class that declares `READS_CONFIG_ONLY = True`
    (this project's trainers: they take it as validated, at no cost); any other class gets a
    writable copy of its own, as upstream's protocol hands a trainer its Hydra config (it may write
    to it). A config that is not sealed is handed over as it is."""
    if getattr(trainer_cls, "READS_CONFIG_ONLY", False) is True:
        return config
    sealed = sealed_resolution(config, "the trainer's config")
    return config if sealed is None else writable_copy(sealed).config


def trainer_settings(config: Any, owner: str):
    """The validated settings of a trainer's config (a mapping or a DictConfig, only read); a
    `ResolvedConfig` whose `.config` reads as `RunSettings`."""
    if not isinstance(config, (Mapping, DictConfig)):
        raise TypeError(f"{owner}: config must be a mapping or an OmegaConf DictConfig, got {type(config).__name__}")
    resolved = validate_settings(config, f"the config given to {owner}", shared=True)
    if logger.isEnabledFor(logging.DEBUG):
        for line in resolved.summary():
            logger.debug("%s: %s", owner, line)
    return resolved


def split_model_outputs(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_logits, latent_pred) from a 2-tuple or a cluster-head 3-tuple."""
    if not isinstance(outputs, (tuple, list)) or len(outputs) not in (2, 3):
        raise ValueError(
            "model must return (text_logits, latent_pred) or (text_logits, latent_pred, "
            f"text_cluster_logits), got {type(outputs).__name__} of length {len(outputs) if isinstance(outputs, (tuple, list)) else '-'}"
        )
    return outputs[0], outputs[1]


def prepare_batch(batch: Mapping[str, torch.Tensor], dtype: torch.dtype, owner: str):
    """Validated (input_ids [B,S], attention_mask bool [B,S] or None, latents [B,D] in dtype)."""
    for key in ("input_ids", "latent"):
        if key not in batch or batch[key] is None:
            raise KeyError(f"{owner}: batch is missing {key!r} (keys: {sorted(batch)})")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"{owner}: batch['input_ids'] must be [B, S], got {tuple(input_ids.shape)}")
    batch_size, seq_len = input_ids.shape
    device = input_ids.device
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch_size, seq_len):
            raise ValueError(
                f"{owner}: batch['attention_mask'] must be [B, S]={[batch_size, seq_len]}, "
                f"got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(device).bool()
    latents = batch["latent"]
    if latents.dim() == 3 and latents.shape[1] == 1:
        latents = latents.squeeze(1)
    if latents.dim() != 2 or latents.shape[0] != batch_size:
        raise ValueError(
            f"{owner}: batch['latent'] must be [B, D] or [B, 1, D] with B={batch_size}, got {tuple(batch['latent'].shape)}"
        )
    latents = latents.to(device=device, dtype=dtype)
    return input_ids, attention_mask, latents


class DiffusionTrainerBase(nn.Module):
    """What both trainers share: the model and text side, the config validated against the schema
    (`self.settings`, read as `RunSettings`; `self.config` is the same object), the latent diffusion
    of `model.latent_*`, `loss.latent_loss_weight`, `loss.on_nonfinite` and the trainer's own
    generator (seeded from `training.seed`)."""

    # The trainer protocol's declaration (compat/protocol.py): these trainers never write to their
    # config, so they may be handed the sealed one (`config_for`), validated once where it entered.
    READS_CONFIG_ONLY = True

    def __init__(
        self, model: nn.Module, tokenizer: Any, text_noise_schedule: nn.Module, dtype: torch.dtype, config: Any
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.text_noise_schedule = text_noise_schedule
        self.dtype = dtype
        resolved = trainer_settings(config, type(self).__name__)
        self.settings: RunSettings = resolved.config
        self.config = self.settings
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.latent_settings = latent_settings_of(resolved)
        self.latent_diffusion = ContinuousDiffusion(
            num_timesteps=self.latent_settings.num_timesteps,
            beta_schedule=self.latent_settings.beta_schedule,
            parameterization=self.latent_settings.parameterization,
        )
        self.latent_loss_weight = self.settings.loss.latent_loss_weight
        self.on_nonfinite = self.settings.loss.on_nonfinite
        self.generator = make_generator(self.settings.training.seed)
        self.last_draws: dict[str, torch.Tensor] = {}  # every draw the last step used
        self.unused_draws: list[str] = []  # injected draws the last step did not use

    def report_nonfinite(self, owner: str, nonfinite: list[str]) -> None:
        """Raises under `loss.on_nonfinite: raise`; otherwise logs upstream's replacement."""
        if not nonfinite:
            return
        message = f"{owner}: non-finite {', '.join(nonfinite)}"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        logger.warning("%s; replaced as upstream does (loss.on_nonfinite=upstream)", message)
