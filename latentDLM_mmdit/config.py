"""Loading run configs: plain YAML files and upstream's Hydra files, `key.path=value` overrides,
validation against the schema (`latentDLM_mmdit.settings`) and the vocabulary.

    cfg = load_config(default_config_path("stable"), ["training.num_train_steps=10", "model.n_blocks=1"])
    resolved = resolve_config("upstream/configs/mmdit_stable.yaml", tokenizer_dir="tokenizers/bert")
    resolved.config, resolved.sources, resolved.unused

A file whose top level has a `defaults:` list is composed with Hydra's compose API as upstream's
`@hydra.main(config_path=..., version_base="1.1")` composed it: config groups are looked up in the
file's folder, `_self_` and the defaults list merge in Hydra's order. Interpolations (`${...}`)
are resolved after the overrides are applied. The `hydra:` section is listed as not used.

An override names a schema key (whether or not the file has it), an upstream key the file has or
one the schema knows (`settings.ALIASES`, `settings.UPSTREAM_UNUSED`); anything else is an error
naming the key, the file and the nearest valid key. Values are typed by the schema (or, for an
upstream key the schema does not map, by the file's value):
- int keys take integer literals (`10`, `-3`; not `1.5`, not `true`);
- float keys take integer or float literals (`1e-3`, `0.5`, `2`, also `inf` / `nan`, which the
  range checks then refuse), stored as float;
- bool keys take `true` / `false` (any case);
- string keys take the text after `=` verbatim (`logging.run_name=007` is the string "007");
- list keys take a YAML list (`training.sequential_schedule=[{type: l2t, steps: 2}]`);
- `null` is accepted only where the default is null, and such a key takes a value of its type.
A section (a mapping) is not replaced as a whole: override its keys (in a Hydra file, `group=option`
selects another option of a config group of its defaults list). List items are addressed by index
(`training.sequential_schedule.0.steps=3`). An override of a key the file spells with upstream's
name (`logging.save_freq` for `logging.save_every`) sets it under that name.

The returned config is validated, typed and in struct mode: reading a key that does not exist raises
instead of returning None. It is sealed (read-only): the trainers, the model factory and the loop it
is handed to take it as validated without checking it again; `with_updates(config, {...}, source)`
makes a changed copy. Nothing passed in is modified.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentDLM_mmdit.settings import (
    ALIASES,
    BETAS_KEY,
    ConfigError,
    FieldKind,
    ResolvedConfig,
    schema_fields,
    schema_kind,
    unknown_key_message,
    upstream_entry,
    reseal,
    validate_settings,
)
from latentDLM_mmdit.tokenizer import apply_vocab, resolve_vocab

__all__ = [
    "PACKAGED_CONFIGS",
    "ConfigError",
    "default_config_path",
    "load_config",
    "packaged_config_path",
    "resolve_config",
    "with_updates",
]

PACKAGED_CONFIGS = {
    "stable": ("latentDLM_mmdit", "configs/mmdit_stable.yaml"),
}
HYDRA_VERSION_BASE = "1.1"  # upstream's @hydra.main(version_base="1.1")

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NONFINITE = ("inf", "+inf", "-inf", ".inf", "+.inf", "-.inf", "nan", ".nan")
_NULLS = ("null", "~", "none")


def packaged_config_path(package: str, relative: str) -> Path:
    """Path of the config file `relative` shipped inside `package`."""
    # The package's own directories (also right for a namespace package, e.g. a stale editable
    # install, where importlib.resources.files() fails).
    module = importlib.import_module(package)
    searched = [Path(base) for base in getattr(module, "__path__", [])]
    for base in searched:
        if (base / relative).is_file():
            return base / relative
    raise ConfigError(
        f"packaged config {relative} of {package} is missing (searched {', '.join(map(str, searched))}); "
        "reinstall the package"
    )


def default_config_path(kind: str = "stable") -> Path:
    """Path of a packaged config of the reference: "stable" (the cycle trainer's configs live in
    `cycle_vae_impl.configs`)."""
    if kind not in PACKAGED_CONFIGS:
        raise ConfigError(f"unknown packaged config {kind!r}; valid: {', '.join(PACKAGED_CONFIGS)}")
    return packaged_config_path(*PACKAGED_CONFIGS[kind])


def load_config(
    path: str | Path, overrides: Sequence[str] = (), *, tokenizer_dir: str | Path | None = None
) -> DictConfig:
    """The validated config of a YAML file (plain or Hydra) with `key.path=value` overrides; see
    `resolve_config` and the module docstring."""
    return resolve_config(path, overrides, tokenizer_dir=tokenizer_dir).config


def resolve_config(
    path: str | Path, overrides: Sequence[str] = (), *, tokenizer_dir: str | Path | None = None, vocab: bool = True
) -> ResolvedConfig:
    """Reads a YAML config (composing a Hydra file), applies overrides, resolves interpolations,
    validates every key and fills the vocabulary.

    Args:
        path: the YAML file.
        overrides: `key.path=value` strings (see the module docstring).
        tokenizer_dir: a local tokenizer folder (--tokenizer DIR); it replaces `tokenizer.path`.
        vocab: fill the vocabulary from the tokenizer folder now; False leaves the tokenizer
            section as given (the gate takes the vocabulary size from the checkpoint instead).

    Returns the ResolvedConfig: the config, where each value came from (file, override, default,
    profile, upstream key, tokenizer folder), the upstream keys not used here and notes.
    Raises ConfigError naming the file, the key and the fix.
    """
    path = Path(path)
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    overrides = list(overrides)
    source = str(path)
    raw_file = _read_yaml(path)
    group_overrides = [o for o in overrides if _is_group_override(o, raw_file)]
    if "defaults" in raw_file:
        raw, hydra_section = _compose_hydra(path, group_overrides), raw_file.get("hydra")
    else:
        raw = OmegaConf.to_container(raw_file, resolve=False)
        hydra_section = raw.pop("hydra", None)
    given_sources: dict[str, str] = {}
    for override in overrides:
        if override not in group_overrides:
            _apply_override(raw, override, source, given_sources)
    resolved_raw = _resolve_interpolations(raw, hydra_section, source)
    resolved = validate_settings(resolved_raw, f"config file {source}", given_sources=given_sources)
    if "defaults" in raw_file:
        resolved.notes.extend(_upstream_stable_notes(resolved))
    folder = tokenizer_dir if tokenizer_dir is not None else resolved.config.tokenizer.path
    if folder and vocab:
        vocab = resolve_vocab(resolved.config, tokenizer_dir=tokenizer_dir, owner=f"config file {source}")
        apply_vocab(resolved, vocab)
    return reseal(resolved)  # the vocabulary written is checked with the rest; sealed: validated once


def with_updates(config: Any, updates: Mapping[str, Any], source: str) -> DictConfig:
    """A validated copy of `config` with `updates` ({dotted key: Python value}) applied; an unknown
    key is a ConfigError naming the nearest valid key, a wrong value is refused by the schema.
    `config` is only read. The copy is sealed (read-only; readers take it as validated)."""
    resolved = validate_settings(config, source, shared=True)
    raw = OmegaConf.to_container(resolved.config, resolve=True, throw_on_missing=False)
    for key, value in updates.items():
        if key in ALIASES:  # upstream's name of a schema key: update the schema key
            key, values = ALIASES[key]
            value = values.get(value, value) if values is not None else value
        kind = schema_kind(key)
        if kind is None and key != BETAS_KEY and upstream_entry(key) is None:
            raise ConfigError(unknown_key_message(key, source))
        if kind is not None and kind.is_section:
            raise ConfigError(f"{source}: {key} is a section; update its keys ({', '.join(schema_fields(kind.base))})")
        _set(raw, key, value, source)
    return validate_settings(_drop_missing(raw), source, shared=True).config


# -- reading files --------------------------------------------------------------------------------
def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml and omegaconf raise several types
        raise ConfigError(f"config file {path} is not valid YAML ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got a list")
    return config


def _defaults_groups(raw_file: DictConfig) -> set[str]:
    groups = set()
    for entry in raw_file.get("defaults") or []:
        if isinstance(entry, (Mapping, DictConfig)):
            groups.update(str(k).lstrip("+~").split("@")[0].replace("override ", "").strip() for k in entry)
    return groups


def _is_group_override(override: Any, raw_file: DictConfig) -> bool:
    """`group=option` for a config group of the file's defaults list."""
    if not isinstance(override, str) or "=" not in override:
        return False
    key = override.split("=", 1)[0].strip()
    return "defaults" in raw_file and key in _defaults_groups(raw_file)


def _compose_hydra(path: Path, group_overrides: list[str]) -> dict:
    """The file composed by Hydra (defaults list, groups in the file's folder), interpolations
    left unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if path.suffix != ".yaml":
        raise ConfigError(f"config file {path} has a Hydra defaults list, so it must end in .yaml (Hydra's rule)")
    if GlobalHydra.instance().is_initialized():
        raise ConfigError(
            f"cannot compose {path}: Hydra is already initialised in this process "
            "(load configs outside @hydra.main, or pass the composed config itself)"
        )
    folder = path.resolve().parent
    try:
        with warnings.catch_warnings():
            # Hydra 1.3.3+ warns that version_base 1.1 is for compatibility: it is chosen on purpose.
            warnings.filterwarnings("ignore", message=r"(?s).*version_base=.1\.1")
            with initialize_config_dir(
                config_dir=str(folder), version_base=HYDRA_VERSION_BASE, job_name="mmdit_compat"
            ):
                composed = compose(config_name=path.stem, overrides=group_overrides)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(
            f"cannot compose {path} with Hydra (config groups are looked up in {folder}): {type(exc).__name__}: {exc}"
        ) from exc
    return OmegaConf.to_container(composed, resolve=False)


def _resolve_interpolations(raw: dict, hydra_section: Any, source: str) -> dict:
    """`raw` with every `${...}` resolved; the hydra section (not used here) is resolved when it can
    be and otherwise kept as written, for the list of unused keys."""
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"config file {source}: cannot resolve an interpolation ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if hydra_section is not None:
        hydra_raw = (
            OmegaConf.to_container(hydra_section, resolve=False)
            if isinstance(hydra_section, DictConfig)
            else hydra_section
        )
        try:
            with_hydra = OmegaConf.create({**raw, "hydra": hydra_raw})
            resolved["hydra"] = OmegaConf.to_container(with_hydra.hydra, resolve=True)
        except OmegaConfBaseException:  # e.g. ${hydra:...}, which only a running Hydra app resolves
            resolved["hydra"] = hydra_raw
    return resolved


def _upstream_stable_notes(resolved: ResolvedConfig) -> list[str]:
    """Differences from upstream's stable training script worth knowing for a Hydra config."""
    cfg = resolved.config
    notes = []
    if (
        resolved.sources.get("training.gradient_accumulation_steps") != "default"
        and cfg.training.gradient_accumulation_steps > 1
    ):
        notes.append(
            f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps} is used here; "
            "upstream's stable training script accumulated nothing (one optimizer step per batch)"
        )
    if cfg.training.lr_schedule == "cosine":
        notes.append(
            "training.lr_schedule=cosine: this loop warms up over (step+1)/warmup_steps and decays to 0 at "
            "num_train_steps; upstream's stable script warmed up over step/warmup_steps and decayed to "
            "0.1 x optimizer.lr"
        )
    return notes


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# -- overrides ------------------------------------------------------------------------------------
def _split(override: Any, source: str) -> tuple[str, str]:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} for {source} must look like key.path=value")
    key, value = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} for {source}: malformed key {key!r}")
    return key, value


def _lookup(raw: Any, key: str) -> tuple[bool, Any]:
    node = raw
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and _INT_RE.match(part) and 0 <= int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _set(raw: dict, key: str, value: Any, source: str) -> None:
    """Sets a dotted key of nested dicts/lists, creating missing sections; refuses to go through a
    value or past the end of a list."""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        so_far = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not _INT_RE.match(part) or not 0 <= int(part) < len(node):
                raise ConfigError(
                    f"unknown config key {so_far!r} in {source}: "
                    f"{'.'.join(parts[:depth])} is a list of {len(node)} item(s)"
                )
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(
                f"unknown config key {key!r} in {source}: {'.'.join(parts[:depth])} is a value, not a section"
            )
        child = node.get(part)
        if child is None:
            if _INT_RE.match(parts[depth + 1]):
                raise ConfigError(
                    f"unknown config key {key!r} in {source}: {so_far} is not in the config, so it "
                    f"has no item {parts[depth + 1]}; give the whole list ({so_far}=[...])"
                )
            child = node[part] = {}
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not _INT_RE.match(last) or not 0 <= int(last) < len(node):
            raise ConfigError(
                f"unknown config key {key!r} in {source}: {'.'.join(parts[:-1])} is a list of {len(node)} item(s)"
            )
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"unknown config key {key!r} in {source}: {'.'.join(parts[:-1])} is a value, not a section")


def _kind_of_value(value: Any) -> FieldKind | None:
    """The kind an upstream key the schema does not map takes from the file's value."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return FieldKind(dict)
    for base in (bool, int, float, str, list):
        if isinstance(value, base):
            return FieldKind(base)
    return None


def _apply_override(raw: dict, override: str, source: str, given_sources: dict[str, str]) -> None:
    key, text = _split(override, source)
    schema_key = ALIASES[key][0] if key in ALIASES else key
    kind = schema_kind(schema_key)
    present, current = _lookup(raw, key)
    target = key
    if kind is not None:
        if key in ("optimizer.beta1", "optimizer.beta2") and _lookup(raw, BETAS_KEY)[0]:
            raise ConfigError(
                f"override {override!r} for {source}: this config sets optimizer.betas (upstream's "
                "optimizer group, which upstream's stable trainer read instead of beta1/beta2); "
                "override optimizer.betas=[beta1, beta2] instead"
            )
        for alias, (aliased, _) in ALIASES.items():
            if aliased == key and _lookup(raw, alias)[0]:
                target = alias  # the file's own spelling stays the one in effect
        if kind.is_section:
            names = ", ".join(schema_fields(kind.base))
            raise ConfigError(f"override {key}={text!r} for {source}: {key} is a section; override its keys ({names})")
        if key in ALIASES:
            kind = _kind_of_value(current) if present else None  # the upstream spelling takes its file's type
    elif present:
        kind = _kind_of_value(current)
        if kind is not None and kind.base is dict:
            raise ConfigError(
                f"override {key}={text!r} for {source}: {key} is a section; override its keys "
                f"({', '.join(map(str, current))})"
            )
    elif key != BETAS_KEY and upstream_entry(key) is None:  # the override's key, not the file's: say so
        raise ConfigError(unknown_key_message(key, f"the override {override!r} (applied to {source})"))
    value = parse_override_value(key, text, kind, source)
    _set(raw, target, value, source)
    given_sources[_given_key(schema_key)] = "override"


def _given_key(key: str) -> str:
    """The key whose value an override sets: a list item's override sets the whole list."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        kind = schema_kind(".".join(parts[:depth]))
        if kind is not None and kind.base is list:
            return ".".join(parts[:depth])
    return key


def _type_error(key: str, expected: str, raw: str, source: str) -> ConfigError:
    return ConfigError(f"override {key}={raw!r} for {source}: expected {expected}, got {raw!r}")


def parse_override_value(key: str, raw: str, kind: FieldKind | None, source: str) -> Any:
    """The typed value of the text `raw` for a key of `kind` (None: any YAML value)."""
    text = raw.strip()
    if kind is None:
        return _yaml_value(key, raw, source)
    if text.lower() in _NULLS:
        if kind.optional:
            return None
        raise ConfigError(f"override {key}={raw!r} for {source}: null is not allowed ({key} takes {kind.describe()})")
    if kind.base is bool:
        if text.lower() not in ("true", "false"):
            raise _type_error(key, "a bool (true or false)", raw, source)
        return text.lower() == "true"
    if kind.base is int:
        if not _INT_RE.match(text):
            raise _type_error(key, "an int", raw, source)
        return int(text)
    if kind.base is float:
        if not (_INT_RE.match(text) or _FLOAT_RE.match(text) or text.lower() in _NONFINITE):
            raise _type_error(key, "a float", raw, source)
        return float(text.replace(".inf", "inf").replace(".nan", "nan"))
    if kind.base is str:
        return raw
    if kind.base is list:
        value = _yaml_value(key, raw, source)
        if not isinstance(value, list):
            raise _type_error(key, "a list in YAML syntax, e.g. [a, b]", raw, source)
        return value
    raise ConfigError(f"override {key}={raw!r} for {source}: {key} is a section; override its keys")


def _yaml_value(key: str, raw: str, source: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={raw!r} for {source}: not valid YAML ({exc})") from exc


def _drop_missing(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_missing(v) for k, v in node.items() if v != "???"}
    return node
