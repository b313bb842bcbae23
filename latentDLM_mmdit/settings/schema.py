"""The schema: one set of dataclasses (OmegaConf structured configs) naming every key the trainers,
the model, the factory and the training loop read, with its type, its default (stated once, here)
and its range; the choices a key takes; `ConfigError`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from latentDLM_mmdit.continuous_diffusion import BETA_SCHEDULES, PARAMETERIZATIONS
from latentDLM_mmdit.precision import MIXED_PRECISION_MODES

BASE_MODES = ("l2t", "t2l", "unconditional")
STABLE_LOSS_TYPES = BASE_MODES + ("sequential", "random")
CYCLE_LOSS_TYPE = "cycle_vae"
# loss.latent_t_mode: each value and the mode it names (ones and t1 are the cycle trainer's aliases of full).
LATENT_T_MODES = {"full": "full", "random": "random", "ones": "full", "t1": "full"}
FULL_T_MODES = tuple(value for value, mode in LATENT_T_MODES.items() if mode == "full")  # t = 1 on every pass
PSEUDO_TOKEN_SAMPLINGS = ("argmax", "categorical")
NONFINITE_POLICIES = ("upstream", "raise")
DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
LR_SCHEDULES = ("cosine", "constant")
# torch.compile backends the loop accepts: inductor (upstream's, the default of torch.compile),
# aot_eager (dynamo and AOTAutograd with eager kernels: the same numerics, no code generation) and
# eager (dynamo alone).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
OPTIMIZERS = ("adamw",)
PROFILES = ("recommended", "upstream")
LATENT_KEYS = ("latent_timesteps", "latent_beta_schedule", "latent_parameterization")


class ConfigError(ValueError):
    """A config file, a key or an override that cannot be used (names the key, the source and the fix)."""


# -- checks ---------------------------------------------------------------------------------------
def _at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _finite_positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def _finite_non_negative(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def _below_one(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def setting(
    default: Any = MISSING, *, check: Callable[[Any], str | None] | None = None, choices: tuple[str, ...] | None = None
) -> Any:
    """A schema field: its default (MISSING: required by whoever reads it), a range check returning
    an error text or None, and the valid values of a string key."""
    return field(default=default, metadata={"check": check, "choices": choices})


# -- the schema -----------------------------------------------------------------------------------
@dataclass
class DataSettings:
    """Training data. token_dir/latent_dir: upstream's layout (`<stem>_tokens.npz`, `<stem>.npy`);
    empty = none (--data-tokens / --data-latents). num_workers: reader processes (upstream's key, same
    meaning). synthetic_*: used with --synthetic only."""

    token_dir: str = setting("")
    latent_dir: str = setting("")
    # DataLoader worker processes reading the files (0: read in the training process); the samples
    # and their order are the same for every value, only the speed differs.
    num_workers: int = setting(0, check=_at_least(0))
    synthetic_seq_len: int = setting(24, check=_at_least(1))
    synthetic_num_samples: int = setting(256, check=_at_least(1))


@dataclass
class ModelSettings:
    """MultimodalMMDiT sizes (no defaults: they decide the checkpoint layout) and the latent diffusion.

    qk_rmsnorm is passed to the mmdit backbone, which does not use it (as upstream); the latent_*
    keys are read by both trainers (upstream's stable trainer read them from the config root).
    """

    hidden_size: int = setting(check=_at_least(1))
    n_blocks: int = setting(check=_at_least(1))
    cond_dim: int = setting(check=_at_least(1))
    max_seq_len: int = setting(check=_at_least(1))
    latent_dim: int = setting(check=_at_least(1))
    dropout: float = setting(0.0, check=_below_one)
    num_residual_streams: int = setting(2, check=_at_least(1))
    qk_rmsnorm: bool = setting(True)
    cluster_size: int = setting(0, check=_at_least(0))
    latent_timesteps: int = setting(1000, check=_at_least(2))
    latent_beta_schedule: str = setting("cosine", choices=BETA_SCHEDULES)
    latent_parameterization: str = setting("epsilon", choices=PARAMETERIZATIONS)


@dataclass
class ScheduleItem:
    """One entry of training.sequential_schedule: a stable mode and how long it lasts (optimizer
    steps when the trainer is given the step, else epochs)."""

    type: str = setting(choices=BASE_MODES)
    steps: int = setting(1000, check=_at_least(1))
    epochs: int = setting(1, check=_at_least(1))


@dataclass
class TrainingSettings:
    """Run length, batch, precision, LR schedule and the stable trainer's mode schedules."""

    seed: int = setting(42)
    dtype: str = setting("fp32", choices=DTYPE_NAMES)
    # torch.autocast around the trainer's forward (fp16 adds a GradScaler): see latentDLM_mmdit.precision.
    mixed_precision: str = setting("no", choices=MIXED_PRECISION_MODES)
    # torch.compile of the trainer (its whole step: model passes and losses), as upstream's script did.
    compile_model: bool = setting(False)
    compile_backend: str = setting("inductor", choices=COMPILE_BACKENDS)
    train_batch_size: int = setting(check=_at_least(1))
    num_train_steps: int = setting(check=_at_least(1))
    gradient_accumulation_steps: int = setting(1, check=_at_least(1))
    lr_schedule: str = setting("cosine", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, check=_at_least(0))
    # How long a process waits for its peers (joining the process group, every collective) before
    # the run fails, under torchrun; upstream waited a fixed 30 minutes.
    ddp_timeout_minutes: float = setting(30.0, check=_finite_positive)
    sequential_schedule: list[ScheduleItem] = field(default_factory=list)
    mode_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # 3 weights, checked together


@dataclass
class LossSettings:
    """Loss type and weights. The cycle_* keys and latent_t_mode are read by the cycle trainer; their
    defaults are the review's recommendations (`profile: upstream` gives upstream's)."""

    loss_type: str = setting(choices=STABLE_LOSS_TYPES + (CYCLE_LOSS_TYPE,))
    latent_loss_weight: float = setting(0.1, check=_finite_non_negative)
    on_nonfinite: str = setting("upstream", choices=NONFINITE_POLICIES)
    latent_t_mode: str = setting("full", choices=tuple(LATENT_T_MODES))
    cycle_text_weight: float = setting(0.1, check=_finite_non_negative)
    cycle_text_warmup_steps: int = setting(0, check=_at_least(0))
    cycle_text_ramp_steps: int = setting(2000, check=_at_least(0))
    cycle_latent_weight: float = setting(0.1, check=_finite_non_negative)
    cycle_latent_warmup_steps: int = setting(0, check=_at_least(0))
    cycle_latent_ramp_steps: int = setting(2000, check=_at_least(0))
    cycle_latent_sampling: str = setting("argmax", choices=PSEUDO_TOKEN_SAMPLINGS)
    cycle_latent_t_min: float = setting(0.0)  # 0 <= t_min < t_max <= 1, checked as a pair
    cycle_latent_t_max: float = setting(0.98)
    cycle_stop_grad_latent: bool = setting(True)


@dataclass
class OptimizerSettings:
    """AdamW (torch's defaults where upstream set nothing); grad_clip_norm 0 disables clipping."""

    name: str = setting("adamw", choices=OPTIMIZERS)
    lr: float = setting(check=_finite_positive)
    weight_decay: float = setting(0.01, check=_finite_non_negative)
    beta1: float = setting(0.9, check=_below_one)
    beta2: float = setting(0.999, check=_below_one)
    eps: float = setting(1e-8, check=_finite_positive)
    grad_clip_norm: float = setting(1.0, check=_finite_non_negative)


@dataclass
class TokenizerSettings:
    """The vocabulary: explicit ids, or a local tokenizer folder (`path`, or --tokenizer DIR).
    add_mask_token: a folder that declares no mask token gets [MASK] as upstream's get_tokenizer
    added it (false: such a folder is an error)."""

    path: str | None = setting(None)
    vocab_size: int | None = setting(None, check=_at_least(2))
    mask_token_id: int | None = setting(None, check=_at_least(0))
    pad_token_id: int | None = setting(None, check=_at_least(0))
    add_mask_token: bool = setting(True)


@dataclass
class LoggingSettings:
    """Output directory `<log_dir>/<run_name>` (unless --output-dir), a log line every log_every
    optimizer steps (metrics.jsonl gets every step), a checkpoint every save_every steps (0: none
    but the last) and at the end.
    Upstream's names log_freq, save_freq and save_dir are accepted for the same settings."""

    run_name: str = setting("mmdit")
    log_dir: str = setting("outputs")
    log_every: int = setting(10, check=_at_least(1))
    save_every: int = setting(2000, check=_at_least(0))  # 0: only the final checkpoint (upstream's cycle script)


@dataclass
class RunSettings:
    """Every setting of a run. The root latent_* keys are upstream's stable trainer's spelling of
    model.latent_* (None: not given)."""

    profile: str = setting("recommended", choices=PROFILES)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    latent_timesteps: int | None = setting(None, check=_at_least(2))
    latent_beta_schedule: str | None = setting(None, choices=BETA_SCHEDULES)
    latent_parameterization: str | None = setting(None, choices=PARAMETERIZATIONS)


# Defaults of `profile: upstream`: what upstream's cycle trainer used for a key its config left out
# (cycle_vae_impl/trainers/cycle_vae_trainer.py in upstream's repository).
UPSTREAM_PROFILE = {
    "loss.latent_t_mode": "random",
    "loss.cycle_text_weight": 1.0,
    "loss.cycle_text_ramp_steps": 0,
    "loss.cycle_latent_weight": 0.0,
    "loss.cycle_latent_ramp_steps": 0,
}
