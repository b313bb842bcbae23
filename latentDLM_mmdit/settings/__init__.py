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
- Validated once where a config enters: `validate_settings(..., shared=True)` seals its result
  (read-only, registered by identity), and every reader handed that very object (trainers, the model
  factory, the loop) takes it as validated at no cost; a mapping, a copy or a merge is validated
  where it enters. A change goes through `config.with_updates` (or `writable_copy` then `reseal`).
- Keys without a default (`MISSING`: the model sizes, `loss.loss_type`, the run length, batch size
  and learning rate) are required only by what reads them: `require(config, keys, owner)`.
- `profile: upstream` gives the cycle keys a file leaves out upstream's cycle trainer defaults
  (`UPSTREAM_PROFILE`) instead of the review's recommended ones (the schema defaults).
- The latent diffusion keys may also be spelt at the config root (upstream's stable trainer read
  them there); a root value fills `model.*`, and a disagreement between the two is an error.

The package, one module per concern (each imports only those before it): `schema` (the dataclasses,
the choices, `ConfigError`), `upstream_keys` (upstream's names of keys, and its keys accepted but not used), `introspection`
(the schema read as types, the nearest key to a typo), `validation`
(`validate_settings`, `ResolvedConfig`, `require`). This module is their interface.
"""

from latentDLM_mmdit.settings.schema import (
    BASE_MODES,
    COMPILE_BACKENDS,
    CYCLE_LOSS_TYPE,
    ConfigError,
    DTYPE_NAMES,
    DataSettings,
    FULL_T_MODES,
    LATENT_KEYS,
    LATENT_T_MODES,
    LR_SCHEDULES,
    LoggingSettings,
    LossSettings,
    ModelSettings,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    OptimizerSettings,
    PROFILES,
    PSEUDO_TOKEN_SAMPLINGS,
    RunSettings,
    STABLE_LOSS_TYPES,
    ScheduleItem,
    TokenizerSettings,
    TrainingSettings,
    UPSTREAM_PROFILE,
    setting,
)
from latentDLM_mmdit.settings.upstream_keys import (
    ALIASES,
    BETAS_KEY,
    BETAS_OVER_BETA1_BETA2,
    UPSTREAM_UNUSED,
    UpstreamKey,
    VALUE_ALIASES,
)
from latentDLM_mmdit.settings.introspection import (
    FieldKind,
    nearest_key,
    schema_fields,
    schema_keys,
    schema_kind,
    unknown_key_message,
    upstream_entry,
)
from latentDLM_mmdit.settings.validation import (
    ResolvedConfig,
    UnusedKey,
    is_missing,
    is_sealed_section,
    require,
    reseal,
    sealed_resolution,
    validate_settings,
    writable_copy,
)

__all__ = [
    "ALIASES",
    "BASE_MODES",
    "BETAS_KEY",
    "BETAS_OVER_BETA1_BETA2",
    "COMPILE_BACKENDS",
    "CYCLE_LOSS_TYPE",
    "ConfigError",
    "DTYPE_NAMES",
    "DataSettings",
    "FULL_T_MODES",
    "FieldKind",
    "LATENT_KEYS",
    "LATENT_T_MODES",
    "LR_SCHEDULES",
    "LoggingSettings",
    "LossSettings",
    "ModelSettings",
    "NONFINITE_POLICIES",
    "OPTIMIZERS",
    "OptimizerSettings",
    "PROFILES",
    "PSEUDO_TOKEN_SAMPLINGS",
    "ResolvedConfig",
    "RunSettings",
    "STABLE_LOSS_TYPES",
    "ScheduleItem",
    "TokenizerSettings",
    "TrainingSettings",
    "UPSTREAM_PROFILE",
    "UPSTREAM_UNUSED",
    "UnusedKey",
    "UpstreamKey",
    "VALUE_ALIASES",
    "is_missing",
    "is_sealed_section",
    "nearest_key",
    "require",
    "reseal",
    "sealed_resolution",
    "schema_fields",
    "schema_keys",
    "schema_kind",
    "setting",
    "unknown_key_message",
    "upstream_entry",
    "validate_settings",
    "writable_copy",
]
