"""The schema of every setting, and its validation.

One set of dataclasses (OmegaConf structured configs) names every key the trainers, the model,
the factory and the training loop read, with its type, its default (stated once, here) and its
range. `validate_settings(config, source)` applies it to a mapping or a DictConfig and returns a
`ResolvedConfig`: the validated config (a typed, struct-mode DictConfig read as `RunSettings`),
where every value came from, and the upstream keys that were accepted but are not used here.

Rules:
- A key is a schema key, an upstream key this project maps onto one (`ALIASES`,
  `optimizer.betas`), an upstream key accepted but not used here (`UPSTREAM_UNUSED`, listed with the
  reason in `ResolvedConfig.unused`), or an error naming the key, the source and the nearest valid key.
- Types are strict (an int key takes an int, a float key an int or a float, a bool key a bool, a
  string key a string; null only where the default is null); ranges and choices are checked. The
  problems of a config are reported together: every unknown key and wrong type, else every value
  out of range.
- Results are memoised by input (`shared=True` readers get one read-only config per input).
- Keys without a default (`MISSING`: the model sizes, `loss.loss_type`, the run length, batch size
  and learning rate) are required only by what reads them: `require(config, keys, owner)`.
- `profile: upstream` gives the cycle keys a file leaves out upstream's cycle trainer defaults
  (`UPSTREAM_PROFILE`) instead of the review's recommended ones (the schema defaults).
- The latent diffusion keys may also be spelt at the config root (upstream's stable trainer read
  them there); a root value fills `model.*`, and a disagreement between the two is an error.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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

# -- upstream's keys ------------------------------------------------------------------------------
# Upstream names of schema keys: (schema key, value translation).
ALIASES = {
    "logging.log_freq": ("logging.log_every", None),
    "logging.save_freq": ("logging.save_every", None),
    "logging.save_dir": ("logging.log_dir", None),
    # upstream's get_optimizer built AdamW for type adam; psgd (heavyball) is not available here.
    "optimizer.type": ("optimizer.name", {"adam": "adamw", "adamw": "adamw"}),
}
# Upstream values of schema keys: key -> {upstream value: (value here, why)}.
_MULTIMODAL_MDLM = (
    "upstream's stable trainer fell back to unconditional for a loss_type other than l2t, t2l, "
    "unconditional, sequential and random; multimodal_mdlm (its mmdit.yaml) trained unconditional"
)
VALUE_ALIASES = {"loss.loss_type": {"multimodal_mdlm": ("unconditional", _MULTIMODAL_MDLM)}}
BETAS_KEY = "optimizer.betas"
_DATA_LOADER = "upstream's data loader option; this project reads data.token_dir / data.latent_dir with its own loader"
_NOT_READ = "not read by upstream's stable training script, trainer or model either"


@dataclass(frozen=True)
class UpstreamKey:
    """An upstream key accepted but not used here; `allowed` (when set): the only values that give
    upstream's behaviour, anything else is an error."""

    reason: str
    allowed: tuple | None = None


UPSTREAM_UNUSED: dict[str, UpstreamKey] = {
    "hydra": UpstreamKey(
        "Hydra's own settings (run and sweep directories); the output directory here is "
        "--output-dir or logging.log_dir/logging.run_name"
    ),
    "data.data_dir": UpstreamKey(_DATA_LOADER),
    "data.data_files": UpstreamKey(_DATA_LOADER),
    "data.dataset_name": UpstreamKey(_DATA_LOADER),
    "data.latent_data_root": UpstreamKey(_DATA_LOADER),
    "data.max_length": UpstreamKey(_DATA_LOADER),
    "data.max_samples": UpstreamKey("upstream capped the samples it read; every sample of the data dirs is used here"),
    "data.max_val_samples": UpstreamKey("no evaluation loop here"),
    "data.val_ratio": UpstreamKey("no evaluation loop here"),
    "data.initial_scan_limit": UpstreamKey(_DATA_LOADER),
    "data.load_tokens": UpstreamKey("pre-tokenized .npz files are the only input here", allowed=(True,)),
    "data.use_preprocessed": UpstreamKey("upstream's preprocessed layout is the only input here", allowed=(True,)),
    "data.tokenizer_path": UpstreamKey("upstream's training script read tokenizer.path, not this key"),
    "data.tokenizer_name": UpstreamKey("upstream's training script read tokenizer.path, not this key"),
    "data.cache_dir": UpstreamKey("nothing is downloaded here"),
    "data.local_files_only": UpstreamKey("nothing is downloaded here"),
    "data.sequential_schedule": UpstreamKey("upstream's stable trainer read training.sequential_schedule"),
    "model.type": UpstreamKey(
        "upstream chose its model class by it; MultimodalMMDiT is the model here", allowed=("multimodal_mmdit",)
    ),
    "model.diffusion_process": UpstreamKey(
        "upstream's stable script built MaskedDiffusion whatever it says; so does this project"
    ),
    "model.latent_diffusion_process": UpstreamKey(
        "upstream's trainers built ContinuousDiffusion whatever it says; so does this project"
    ),
    "model.use_multimodal": UpstreamKey(_NOT_READ),
    "model.latent_beta_min": UpstreamKey(
        "upstream's trainers built ContinuousDiffusion without it (betas 1e-4 to "
        "0.02 for the linear and sigmoid schedules); so does this project"
    ),
    "model.latent_beta_max": UpstreamKey(
        "upstream's trainers built ContinuousDiffusion without it (betas 1e-4 to "
        "0.02 for the linear and sigmoid schedules); so does this project"
    ),
    "model.p_uniform": UpstreamKey(
        "upstream's stable script built MaskedDiffusion(tokenizer) without it (pure masking); so does this project"
    ),
    "model.t_eps": UpstreamKey(
        "upstream's stable script built MaskedDiffusion(tokenizer) without it; so does this project"
    ),
    "model.n_heads": UpstreamKey("read by nothing, as upstream: the mmdit backbone runs 8 heads of 64 dims"),
    "model.use_stub_if_no_mmdit": UpstreamKey(
        "upstream's cycle entry point could fall back to a stub model; the real mmdit is always used here"
    ),
    "training.eval_batch_size": UpstreamKey("no evaluation loop here"),
    "training.num_epochs": UpstreamKey(
        "this loop runs training.num_train_steps optimizer steps; upstream's stable "
        "script ran num_epochs passes over its data and used num_train_steps only "
        "in its LR schedule"
    ),
    "training.world_size": UpstreamKey("set by the launcher at run time (torchrun)"),
    "training.resume": UpstreamKey("resume with --resume CKPT", allowed=(None,)),
    "training.total_steps": UpstreamKey(_NOT_READ),
    "training.save_every_n_steps": UpstreamKey(_NOT_READ),
    "training.loss_type": UpstreamKey("upstream's trainers read loss.loss_type"),
    "loss.loss_scale": UpstreamKey(
        "upstream multiplied the loss by it before backward; only 1.0 is supported here", allowed=(1, 1.0)
    ),
    "loss.reduction": UpstreamKey(_NOT_READ),
    "loss.use_cross_entropy": UpstreamKey(_NOT_READ),
    "loss.text_loss_weight": UpstreamKey(_NOT_READ + " (the text loss has weight 1)"),
    "loss.text_kl_weight": UpstreamKey(_NOT_READ),
    "optimizer.use_fused": UpstreamKey("not read by upstream's get_optimizer either"),
    "tokenizer.cache_dir": UpstreamKey("tokenizer folders are read locally here; nothing is downloaded"),
    "tokenizer.local_files_only": UpstreamKey("tokenizer folders are read locally here; nothing is downloaded"),
    "tokenizer.name": UpstreamKey("a hub name; nothing is downloaded here (pass --tokenizer DIR)"),
    "logging.eval_freq": UpstreamKey("no evaluation loop here"),
    "logging.num_eval_batches": UpstreamKey("no evaluation loop here"),
    "logging.wandb_project": UpstreamKey("no wandb here: every step goes to metrics.jsonl"),
    "logging.wandb_entity": UpstreamKey("no wandb here: every step goes to metrics.jsonl"),
    "logging.wandb_dir": UpstreamKey("no wandb here: every step goes to metrics.jsonl"),
}
BETAS_OVER_BETA1_BETA2 = (
    "upstream's stable trainer built AdamW from optimizer.betas (its optimizer group) "
    "and never read beta1/beta2; optimizer.betas sets both here"
)


# -- the result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnusedKey:
    """An upstream key accepted but not used here."""

    key: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key}={self.value!r}: {self.reason}"


@dataclass
class ResolvedConfig:
    """A validated config and how it was resolved.

    Args:
        config: the validated config, a struct-mode DictConfig typed as `RunSettings` (every schema
            key present; keys without a default that were not given are MISSING).
        source: what was validated (a file, a constructor's argument).
        sources: dotted key -> where its value came from: "file", "override", "default",
            "profile upstream", "upstream key <name>", "config root (<name>)", "tokenizer folder ...".
        unused: upstream keys accepted but not used here, with the reason.
        notes: differences from upstream worth knowing that are not errors.
    """

    config: RunSettings  # a DictConfig, read as RunSettings
    source: str
    sources: dict[str, str]
    unused: list[UnusedKey]
    notes: list[str]

    @property
    def defaulted(self) -> dict[str, Any]:
        """Keys the config did not give, with the default they took (schema or profile)."""
        return {
            key: OmegaConf.select(self.config, key)
            for key, origin in self.sources.items()
            if origin in ("default", "profile upstream")
        }

    def summary(self) -> list[str]:
        """Human-readable lines: defaults taken, upstream keys not used, notes."""
        lines = []
        defaulted = {k: v for k, v in self.defaulted.items() if v is not None}
        if defaulted:
            lines.append(
                "not in the config, from the schema defaults: "
                + ", ".join(
                    f"{k}={v!r}" + (" (profile upstream)" if self.sources[k] == "profile upstream" else "")
                    for k, v in defaulted.items()
                )
            )
        by_reason: dict[str, list[str]] = {}
        for u in self.unused:
            by_reason.setdefault(u.reason, []).append(f"{u.key}={u.value!r}")
        lines += [
            f"upstream keys accepted, not used here ({reason}): {', '.join(keys)}" for reason, keys in by_reason.items()
        ]
        lines += [f"note: {n}" for n in self.notes]
        return lines


# -- schema introspection -------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldKind:
    """What a schema key holds: `base` is int, float, bool, str, list or a settings dataclass."""

    base: Any
    optional: bool = False
    item: Any = None
    check: Callable | None = None
    choices: tuple | None = None

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.base)

    def describe(self) -> str:
        if self.is_section:
            return "a section"
        names = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string", list: "a list"}
        return names[self.base] + (" or null" if self.optional else "")


def _kind(annotation: Any, metadata: Mapping[str, Any]) -> FieldKind:
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = args[0], True
    if typing.get_origin(annotation) is list:
        return FieldKind(list, optional, typing.get_args(annotation)[0], metadata.get("check"), metadata.get("choices"))
    return FieldKind(annotation, optional, None, metadata.get("check"), metadata.get("choices"))


@functools.cache
def schema_fields(cls: type) -> dict[str, FieldKind]:
    """Name -> FieldKind of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


@functools.cache
def schema_keys(cls: type = RunSettings, prefix: str = "") -> dict[str, FieldKind]:
    """Every dotted key of the schema (sections and leaves) -> its FieldKind."""
    out = {}
    for name, kind in schema_fields(cls).items():
        out[prefix + name] = kind
        if kind.is_section:
            out.update(schema_keys(kind.base, f"{prefix}{name}."))
    return out


def schema_kind(key: str) -> FieldKind | None:
    """The FieldKind of a dotted key (list items addressed by index), or None when not a schema key."""
    cls: Any = RunSettings
    kind = None
    parts = key.split(".")
    i = 0
    while i < len(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        kind = schema_fields(cls).get(parts[i])
        if kind is None:
            return None
        i += 1
        if kind.base is list and i < len(parts):
            if not parts[i].isdigit():
                return None
            i += 1
            if i == len(parts):
                return _kind(kind.item, {})
            cls = kind.item
            continue
        cls = kind.base
    return kind


def _known_names(prefix: str) -> list[str]:
    """Valid names (schema, aliases, upstream keys) directly under a dotted section prefix ('' = root)."""
    names = set()
    for key in list(schema_keys()) + list(ALIASES) + list(UPSTREAM_UNUSED) + [BETAS_KEY]:
        if key.startswith(prefix) and key != prefix.rstrip("."):
            names.add(key[len(prefix) :].split(".")[0])
    return sorted(names)


def nearest_key(key: str) -> str | None:
    """The valid dotted key closest to `key`: the same name in another section, else difflib."""
    candidates = [k for k, kind in schema_keys().items() if not kind.is_section] + list(ALIASES)
    leaf = key.split(".")[-1]
    same_leaf = [k for k in candidates if k.split(".")[-1] == leaf and k != key]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key_message(key: str, source: str) -> str:
    """`unknown config key 'a.b' in SOURCE; nearest valid key: 'a.c' (keys of a: ...)`."""
    parts = key.split(".")
    depth = 0
    while depth < len(parts) and parts[depth] in _known_names(".".join(parts[:depth]) + "." if depth else ""):
        depth += 1
    prefix = ".".join(parts[:depth])
    prefix_kind = schema_keys().get(prefix)
    if prefix_kind is not None and not prefix_kind.is_section:
        return f"unknown config key {key!r} in {source}: {prefix} is a value, not a section"
    nearest = nearest_key(key)
    hint = f"; nearest valid key: {nearest!r}" if nearest else ""
    valid = [k for k in schema_keys() if k.startswith(prefix + ".")] if prefix else list(schema_fields(RunSettings))
    known = sorted({k[len(prefix) + 1 :].split(".")[0] if prefix else k for k in valid})
    where = f"keys of {prefix}" if prefix else "valid root keys"
    return f"unknown config key {key!r} in {source}{hint} ({where}: {', '.join(known)})"


# -- validation -----------------------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of nested mappings; lists and scalars are leaves, empty mappings vanish."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in flat.items():
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return root


def upstream_entry(key: str) -> tuple[str, UpstreamKey] | None:
    """The UPSTREAM_UNUSED entry covering `key` (itself or a section above it)."""
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in UPSTREAM_UNUSED and schema_kind(prefix) is None:
            return prefix, UPSTREAM_UNUSED[prefix]
    return None


def _type_problem(value: Any, kind: FieldKind) -> str | None:
    if value is None:
        return None if kind.optional else "null is not allowed"
    if kind.base is bool:
        ok = isinstance(value, bool)
    elif kind.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind.base is str:
        ok = isinstance(value, str)
    elif kind.base is list:
        ok = isinstance(value, (list, tuple))
    else:  # a section
        ok = isinstance(value, Mapping)
    if ok:
        return None
    hint = " (quote it in YAML)" if kind.base is str else ""
    return f"expected {kind.describe()}, got {value!r}{hint}"


class _Problems:
    """Collects every problem of a config, raised at once."""

    def __init__(self, source: str):
        self.source = source
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        self.lines.append(text)

    def raise_if_any(self) -> None:
        if self.lines:
            if len(self.lines) == 1:
                raise ConfigError(self.lines[0])
            raise ConfigError(
                f"{len(self.lines)} problems in {self.source}:\n" + "\n".join(f"- {p}" for p in self.lines)
            )


def _translate(
    flat: dict[str, Any], problems: _Problems
) -> tuple[dict[str, Any], dict[str, str], list[UnusedKey], list[str]]:
    """Upstream spellings onto schema keys; upstream keys not used here set aside. Returns the
    schema-keyed leaves, their origin (the upstream name), the unused keys and notes."""
    source = problems.source
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unused: list[UnusedKey] = []
    notes: list[str] = []
    betas = flat.get(BETAS_KEY)
    for key, value in flat.items():
        if key in VALUE_ALIASES and isinstance(value, str) and value in VALUE_ALIASES[key]:
            value, why = VALUE_ALIASES[key][value]
            notes.append(f"{key}={flat[key]!r} is read as {value!r}: {why}")
        if key == BETAS_KEY:
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 2
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in value)
            ):
                problems.add(f"{source}: optimizer.betas={value!r} must be a list of two numbers [beta1, beta2]")
                continue
            for name, beta in zip(("beta1", "beta2"), value):
                out[f"optimizer.{name}"], origin[f"optimizer.{name}"] = float(beta), BETAS_KEY
            continue
        if key in ("optimizer.beta1", "optimizer.beta2") and betas is not None:
            unused.append(UnusedKey(key, value, BETAS_OVER_BETA1_BETA2))
            continue
        if key in ALIASES:
            target, values = ALIASES[key]
            if values is not None:
                if value not in values:
                    problems.add(
                        f"{source}: {key}={value!r} is not supported here; valid: {', '.join(values)} "
                        f"(it sets {target})"
                    )
                    continue
                value = values[value]
            if target in flat and flat[target] != value:
                problems.add(
                    f"{source}: {key}={flat[key]!r} (upstream's name) and {target}={flat[target]!r} "
                    "set the same setting differently; keep one"
                )
                continue
            out[target], origin[target] = value, key  # when both spellings agree, the upstream one is recorded
            continue
        entry = upstream_entry(key) if schema_kind(key) is None else None
        if entry is not None:
            name, spec = entry
            if spec.allowed is not None and value not in spec.allowed:
                problems.add(
                    f"{source}: {key}={value!r} changes training upstream and is not supported here "
                    f"({spec.reason}); valid: {', '.join(map(repr, spec.allowed))}"
                )
                continue
            unused.append(UnusedKey(key, value, spec.reason))
            continue
        if key not in out:  # else already set by its upstream spelling, to the same value
            out[key] = value
    return out, origin, unused, notes


def _check_leaves(given: dict[str, Any], problems: _Problems) -> None:
    """Unknown keys and wrong types of the given (schema-keyed) leaves."""
    for key, value in given.items():
        kind = schema_kind(key)
        if kind is None:
            problems.add(unknown_key_message(key, problems.source))
            continue
        if kind.is_section:
            problems.add(
                f"{problems.source}: {key} is a section (keys: {', '.join(schema_fields(kind.base))}), got {value!r}"
            )
            continue
        problem = _type_problem(value, kind)
        if problem:
            problems.add(f"{problems.source}: {key}: {problem}")
            continue
        if kind.base is list and dataclasses.is_dataclass(kind.item):
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    problems.add(
                        f"{problems.source}: {key}.{i} must be a mapping "
                        f"({', '.join(schema_fields(kind.item))}), got {item!r}"
                    )
                    continue
                for name, sub in item.items():
                    sub_kind = schema_fields(kind.item).get(name)
                    if sub_kind is None:
                        problems.add(unknown_key_message(f"{key}.{i}.{name}", problems.source))
                    elif _type_problem(sub, sub_kind):
                        problems.add(f"{problems.source}: {key}.{i}.{name}: {_type_problem(sub, sub_kind)}")
        elif kind.base is list:
            item_kind = _kind(kind.item, {})
            for i, item in enumerate(value):
                if _type_problem(item, item_kind):
                    problems.add(f"{problems.source}: {key}.{i}: {_type_problem(item, item_kind)}")


def _fold_root_latent_keys(given: dict[str, Any], sources: dict[str, str], problems: _Problems) -> None:
    """A root latent_* value fills model.latent_*; both given and different is an error."""
    for key in LATENT_KEYS:
        root, nested = given.get(key), given.get(f"model.{key}")
        if root is None:
            continue
        if nested is not None and nested != root:
            problems.add(
                f"{problems.source}: config sets model.{key}={nested!r} and root {key}={root!r}: they "
                f"disagree; upstream's stable trainer read the root key, its cycle trainer model.{key}. Keep one."
            )
        elif nested is None:
            given[f"model.{key}"] = root
            sources[f"model.{key}"] = f"config root ({key})"


def _range_problems(config: DictConfig, sources: Mapping[str, str], problems: _Problems) -> None:
    def where(key: str) -> str:
        origin = sources.get(key.split("[")[0], "file")
        return "" if origin == "file" else f" (from {origin})"

    def walk(cls: type, node: Any, prefix: str) -> None:
        for name, kind in schema_fields(cls).items():
            key = prefix + name
            if OmegaConf.is_missing(node, name):
                continue
            value = node[name]
            if kind.is_section:
                walk(kind.base, value, key + ".")
                continue
            if kind.base is list and dataclasses.is_dataclass(kind.item):
                for i, item in enumerate(value):
                    walk(kind.item, item, f"{key}[{i}].")
                continue
            if value is None:
                continue
            if kind.choices is not None and value not in kind.choices:
                close = difflib.get_close_matches(str(value), kind.choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.add(
                    f"{problems.source}: {key}={value!r}{where(key)} is not valid; "
                    f"valid: {', '.join(kind.choices)}{hint}"
                )
            elif kind.check is not None and (problem := kind.check(value)):
                problems.add(f"{problems.source}: {key}={value!r}{where(key)} {problem}")

    walk(RunSettings, config, "")
    loss, tok, training = config.loss, config.tokenizer, config.training
    if not 0.0 <= loss.cycle_latent_t_min < loss.cycle_latent_t_max <= 1.0:
        problems.add(
            f"{problems.source}: loss.cycle_latent_t_min={loss.cycle_latent_t_min} and "
            f"loss.cycle_latent_t_max={loss.cycle_latent_t_max} must satisfy 0 <= t_min < t_max <= 1"
        )
    weights = list(training.mode_weights)
    if len(weights) != 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        problems.add(
            f"{problems.source}: training.mode_weights={weights} must be 3 finite non-negative weights "
            "(unconditional, l2t, t2l) with a positive sum"
        )
    if tok.vocab_size is not None:
        for name in ("mask_token_id", "pad_token_id"):
            value = tok[name]
            if value is not None and value >= tok.vocab_size:
                problems.add(
                    f"{problems.source}: tokenizer.{name}={value} is outside the vocabulary "
                    f"[0, tokenizer.vocab_size={tok.vocab_size})"
                )
    if tok.mask_token_id is not None and tok.mask_token_id == tok.pad_token_id:
        problems.add(
            f"{problems.source}: tokenizer.mask_token_id and tokenizer.pad_token_id are both {tok.mask_token_id}"
        )


# Results of validate_settings by input (trainers, the factory and the compat harness validate the
# same few configs hundreds of times; a merge with the schema costs ~10 ms).
_VALIDATED: collections.OrderedDict[str, tuple[Any, dict, list, list]] = collections.OrderedDict()
_VALIDATED_SIZE = 256


def validate_settings(
    config: Any, source: str, *, given_sources: Mapping[str, str] | None = None, shared: bool = False
) -> ResolvedConfig:
    """Validates `config` (a mapping or a DictConfig; only read) against the schema.

    Args:
        config: the settings; interpolations are resolved first.
        source: names what is validated in every error ("config file x.yaml", "the config given to ...").
        given_sources: origin of given keys when not "file" (e.g. "override"), by dotted key.
        shared: return a read-only config shared with every other validation of the same input
            (for readers: no copy); else a config of the caller's own.

    Raises ConfigError listing every unknown key (with the nearest valid key), wrong type, value out
    of range and disagreement.
    """
    if isinstance(config, (DictConfig, ListConfig)):
        try:
            config = OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: cannot resolve an interpolation ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(config).__name__}")
    problems = _Problems(source)
    flat = {k: v for k, v in _flatten(copy.deepcopy(dict(config))).items() if v != "???"}
    memo_key = repr((sorted(flat.items(), key=lambda item: item[0]), sorted((given_sources or {}).items())))
    if memo_key in _VALIDATED:  # validation is a pure function of the input: reuse the result
        _VALIDATED.move_to_end(memo_key)
        validated, sources, unused, notes = _VALIDATED[memo_key]
        return ResolvedConfig(
            validated if shared else _own_copy(validated), source, dict(sources), list(unused), list(notes)
        )
    given, origin, unused, notes = _translate(flat, problems)
    _check_leaves(given, problems)
    problems.raise_if_any()
    sources = {key: (given_sources or {}).get(key, "file") for key in given}
    sources.update({key: f"upstream key {name}" for key, name in origin.items()})
    _fold_root_latent_keys(given, sources, problems)
    problems.raise_if_any()
    if given.get("profile", "recommended") == "upstream":
        for key, value in UPSTREAM_PROFILE.items():
            if key not in given:
                given[key], sources[key] = value, "profile upstream"
    try:
        validated = OmegaConf.merge(OmegaConf.structured(RunSettings), _unflatten(given))
    except OmegaConfBaseException as exc:  # the leaf checks above make this a defect, not a user error
        raise ConfigError(f"{source}: {exc}") from exc
    for key, kind in schema_keys().items():
        if not kind.is_section and key not in sources and not is_missing(validated, key):
            sources[key] = "default"
    _range_problems(validated, sources, problems)
    problems.raise_if_any()
    OmegaConf.set_struct(validated, True)
    kept = copy.deepcopy(validated)
    OmegaConf.set_readonly(kept, True)
    _VALIDATED[memo_key] = (kept, dict(sources), list(unused), list(notes))
    if len(_VALIDATED) > _VALIDATED_SIZE:
        _VALIDATED.popitem(last=False)
    return ResolvedConfig(kept if shared else validated, source, sources, unused, notes)


def _own_copy(config: DictConfig) -> DictConfig:
    mine = copy.deepcopy(config)
    OmegaConf.set_readonly(mine, False)
    return mine


def is_missing(config: Any, key: str) -> bool:
    """True when the dotted `key` of a validated config is MISSING (required and not given)."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return node is None or OmegaConf.is_missing(node, name)


def require(config: Any, keys: list[str] | tuple[str, ...], owner: str) -> None:
    """Raises ConfigError naming every key of `keys` that `config` (validated) leaves MISSING."""
    missing = [key for key in keys if is_missing(config, key)]
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(
            f"{owner} needs {', '.join(missing)} (no default): set "
            f"{'it' if len(missing) == 1 else 'them'} in the config or on the command line ({example})"
        )
