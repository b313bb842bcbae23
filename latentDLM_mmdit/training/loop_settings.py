"""The loop's own settings, read once from the validated config, and its learning-rate schedule.

`LoopSettings.from_config` is the border: the run config is validated against the schema
(`latentDLM_mmdit.settings`) there, and the loop reads only the typed object it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig

from latentDLM_mmdit.config import ConfigError
from latentDLM_mmdit.settings import RunSettings, require, reseal, validate_settings, writable_copy
from latentDLM_mmdit.tokenizer import apply_vocab, resolve_vocab


class TrainingError(ValueError):
    """A run that cannot start or continue as asked (the message says why)."""


LOOP_REQUIRED = ("training.train_batch_size", "training.num_train_steps", "optimizer.lr")
# Every config key the loop itself reads (`LoopSettings.from_config`); the trainers read the rest.
LOOP_KEYS = (
    "training.seed",
    "training.train_batch_size",
    "training.num_train_steps",
    "training.gradient_accumulation_steps",
    "training.lr_schedule",
    "training.warmup_steps",
    "training.ddp_timeout_minutes",
    "training.mixed_precision",
    "training.compile_model",
    "training.compile_backend",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
    "optimizer.grad_clip_norm",
    "data.token_dir",
    "data.latent_dir",
    "data.num_workers",
    "data.synthetic_seq_len",
    "data.synthetic_num_samples",
    "logging.run_name",
    "logging.log_dir",
    "logging.log_every",
    "logging.save_every",
    "loss.on_nonfinite",
)


def validated_config(config: Any) -> DictConfig:
    """`config` (a mapping or a DictConfig, only read) validated against the schema
    (`latentDLM_mmdit.settings`), with the vocabulary filled from `tokenizer.path` when the
    tokenizer section does not give it."""
    try:
        resolved = validate_settings(config, "the run config", shared=True)
        if resolved.config.tokenizer.path:
            resolved = writable_copy(resolved)
            apply_vocab(resolved, resolve_vocab(resolved.config, owner="the run config"))
            resolved = reseal(resolved)
    except ConfigError as exc:
        raise TrainingError(str(exc)) from exc
    return resolved.config


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own settings, read once from the validated config (ranges are the schema's)."""

    seed: int
    batch_size: int
    num_train_steps: int
    grad_accum: int
    lr_schedule: str
    warmup_steps: int
    ddp_timeout: timedelta
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip_norm: float
    token_dir: str
    latent_dir: str
    num_workers: int
    synthetic_seq_len: int
    synthetic_num_samples: int
    run_name: str
    log_dir: str
    log_every: int
    save_every: int
    on_nonfinite: str
    mixed_precision: str = "no"
    compile_backend: str | None = None  # None: eager

    @classmethod
    def from_config(cls, config: Any) -> "LoopSettings":
        """The settings of a run config (a mapping or a DictConfig, only read; validated here)."""
        return cls.from_settings(validated_config(config))

    @classmethod
    def from_settings(cls, s: RunSettings) -> "LoopSettings":
        """The settings of a config `validated_config` returned (not validated again)."""
        try:
            require(s, LOOP_REQUIRED, "the training loop")
        except ConfigError as exc:
            raise TrainingError(str(exc)) from exc
        training, optimizer, data, log = s.training, s.optimizer, s.data, s.logging
        return cls(
            seed=training.seed,
            batch_size=training.train_batch_size,
            num_train_steps=training.num_train_steps,
            grad_accum=training.gradient_accumulation_steps,
            lr_schedule=training.lr_schedule,
            warmup_steps=training.warmup_steps,
            ddp_timeout=timedelta(minutes=training.ddp_timeout_minutes),
            lr=optimizer.lr,
            weight_decay=optimizer.weight_decay,
            betas=(optimizer.beta1, optimizer.beta2),
            eps=optimizer.eps,
            grad_clip_norm=optimizer.grad_clip_norm,
            token_dir=data.token_dir,
            latent_dir=data.latent_dir,
            num_workers=data.num_workers,
            synthetic_seq_len=data.synthetic_seq_len,
            synthetic_num_samples=data.synthetic_num_samples,
            run_name=log.run_name,
            log_dir=log.log_dir,
            log_every=log.log_every,
            save_every=log.save_every if log.save_every > 0 else training.num_train_steps,  # 0: the last only
            on_nonfinite=s.loss.on_nonfinite,
            mixed_precision=training.mixed_precision,
            compile_backend=training.compile_backend if training.compile_model else None,
        )


def learning_rate(step: int, settings: LoopSettings) -> float:
    """LR of the optimizer step with 0-based index `step`: linear warmup over `warmup_steps`
    ((step+1)/warmup of the base), then cosine decay reaching 0 at `num_train_steps` (or constant)."""
    base = settings.lr
    if step < settings.warmup_steps:
        return base * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return base
    span = max(1, settings.num_train_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, settings: LoopSettings, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving the optimizer step with 0-based index k the learning rate
    `learning_rate(k, settings)` (to the last bit or one unit in it: LambdaLR multiplies the base
    by a factor). Step it after every optimizer step; its state_dict goes into the train state.

    Args:
        optimizer: its param groups' `lr` must be `settings.lr` (the base the factor scales).
        settings: the loop's settings (lr, warmup_steps, lr_schedule, num_train_steps).
        start_step: the step the first optimizer step has (0, or a later point of the schedule).
    """

    def factor(step: int) -> float:
        return learning_rate(step, settings) / settings.lr

    if start_step:  # LambdaLR's own way to start later: the base LR recorded as initial_lr
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
