"""Loading run configs (OmegaConf YAML) with type-checked `key.path=value` overrides.

    cfg = load_config(default_config_path("stable"), ["training.num_train_steps=10", "model.n_blocks=1"])

An override must name a key the file already has (a typo is an error naming the key and the file)
and give a value of the default's type:
- int keys take integer literals (`10`, `-3`; not `1.5`, not `true`);
- float keys take integer or float literals (`1e-3`, `0.5`, `2`), stored as float;
- bool keys take `true` / `false` (any case);
- string keys take the text after `=` verbatim (`logging.run_name=007` is the string "007");
- list keys take a YAML list (`training.sequential_schedule=[{type: l2t, steps: 2}]`);
- `null` is accepted only where the default is null, and a null default takes any YAML value.
A section (a mapping) is not replaced as a whole: override its keys. List items are addressed by
index (`training.sequential_schedule.0.steps=3`).

The returned config is in struct mode: reading a key that does not exist raises instead of
returning None. Nothing passed in is modified.
"""
from __future__ import annotations

import re
import importlib
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

PACKAGED_CONFIGS = {
    "stable": ("latentDLM_mmdit", "configs/mmdit_stable.yaml"),
}

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NULLS = ("null", "~", "none")


class ConfigError(ValueError):
    """A config file or an override that cannot be used (names the key and the file)."""


def packaged_config_path(package: str, relative: str) -> Path:
    """Path of the config file `relative` shipped inside `package`."""
    # The package's own directories (also right for a namespace package, e.g. a stale editable
    # install, where importlib.resources.files() fails).
    module = importlib.import_module(package)
    searched = [Path(base) for base in getattr(module, "__path__", [])]
    for base in searched:
        if (base / relative).is_file():
            return base / relative
    raise ConfigError(f"packaged config {relative} of {package} is missing (searched {', '.join(map(str, searched))}); "
                      "reinstall the package")


def default_config_path(kind: str = "stable") -> Path:
    """Path of a packaged config of the reference: "stable" (the cycle trainer's configs live in
    `cycle_vae_impl.configs`)."""
    if kind not in PACKAGED_CONFIGS:
        raise ConfigError(f"unknown packaged config {kind!r}; valid: {', '.join(PACKAGED_CONFIGS)}")
    return packaged_config_path(*PACKAGED_CONFIGS[kind])


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Reads a YAML config and applies `key.path=value` overrides (see the module docstring).

    Raises ConfigError for a missing or unreadable file, a malformed override, an unknown key or
    a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml and omegaconf raise several types
        raise ConfigError(f"config file {path} is not valid YAML ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got a list")
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    for override in list(overrides):
        apply_override(config, override, source=str(path))
    OmegaConf.set_struct(config, True)
    return config


def _split(override: str, source: str) -> tuple[str, str]:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} for {source} must look like key.path=value")
    key, value = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} for {source}: malformed key {key!r}")
    return key, value


def _lookup(config: DictConfig, key: str, source: str) -> tuple[Any, str]:
    """(parent node, last key part) of an existing key; ConfigError naming the key otherwise."""
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        so_far = ".".join(parts[: depth + 1])
        if isinstance(node, DictConfig):
            if part not in node:
                known = ", ".join(sorted(str(k) for k in node.keys()))
                raise ConfigError(f"unknown config key {so_far!r} in {source} (keys there: {known})")
            child = node._get_node(part)
        elif isinstance(node, ListConfig):
            if not _INT_RE.match(part) or not 0 <= int(part) < len(node):
                raise ConfigError(f"unknown config key {so_far!r} in {source}: "
                                  f"{'.'.join(parts[:depth])} is a list of {len(node)} item(s)")
            part = int(part)
            child = node._get_node(part)
        else:
            raise ConfigError(f"unknown config key {so_far!r} in {source}: "
                              f"{'.'.join(parts[:depth])} is a value, not a section")
        if depth == len(parts) - 1:
            return node, part
        node = child
    raise AssertionError("unreachable")


def _yaml_value(key: str, raw: str, source: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={raw!r} for {source}: not valid YAML ({exc})") from exc


def _type_error(key: str, expected: str, raw: str, source: str) -> ConfigError:
    return ConfigError(f"override {key}={raw!r} for {source}: expected {expected}, got {raw!r}")


def parse_override_value(key: str, raw: str, default: Any, source: str) -> Any:
    """The typed value of `raw` for a key whose current value is `default`."""
    text = raw.strip()
    if default is None:
        return _yaml_value(key, raw, source)
    if text.lower() in _NULLS:
        raise ConfigError(f"override {key}={raw!r} for {source}: null is not allowed "
                          f"(the default is {default!r}, of type {type(default).__name__})")
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise _type_error(key, "a bool (true or false)", raw, source)
        return text.lower() == "true"
    if isinstance(default, int):
        if not _INT_RE.match(text):
            raise _type_error(key, "an int", raw, source)
        return int(text)
    if isinstance(default, float):
        if not (_INT_RE.match(text) or _FLOAT_RE.match(text)):
            raise _type_error(key, "a float", raw, source)
        return float(text)
    if isinstance(default, str):
        return raw
    if isinstance(default, (list, tuple)):
        value = _yaml_value(key, raw, source)
        if not isinstance(value, list):
            raise _type_error(key, "a list in YAML syntax, e.g. [a, b]", raw, source)
        return value
    if isinstance(default, dict):
        raise ConfigError(f"override {key}={raw!r} for {source}: {key} is a section; override its keys "
                          f"({', '.join(sorted(map(str, default)))})")
    raise ConfigError(f"override {key}={raw!r} for {source}: the default has unsupported type {type(default).__name__}")


def apply_override(config: DictConfig, override: str, source: str = "<config>") -> None:
    """Applies one `key.path=value` override to `config` in place (used by `load_config` on its
    own fresh copy)."""
    key, raw = _split(override, source)
    parent, last = _lookup(config, key, source)
    current = parent._get_node(last)
    if isinstance(current, (DictConfig, ListConfig)):
        default = OmegaConf.to_container(current, resolve=False)
    else:
        default = current._value() if current is not None else None
    value = parse_override_value(key, raw, default, source)
    parent[last] = value
