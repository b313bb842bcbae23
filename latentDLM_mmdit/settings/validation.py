"""Validation: `validate_settings(config, source)` applies the schema to a mapping or a DictConfig
(upstream's keys translated, types strict, ranges checked, problems reported together) and returns
a `ResolvedConfig`; `require` checks the keys a reader needs that have no default."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentDLM_mmdit.settings.schema import (
    ConfigError,
    LATENT_KEYS,
    RunSettings,
    UPSTREAM_PROFILE,
)
from latentDLM_mmdit.settings.introspection import (
    FieldKind,
    field_kind_of,
    schema_fields,
    schema_keys,
    schema_kind,
    unknown_key_message,
    upstream_entry,
)
from latentDLM_mmdit.settings.upstream_keys import (
    ALIASES,
    BETAS_KEY,
    BETAS_OVER_BETA1_BETA2,
    VALUE_ALIASES,
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
            item_kind = field_kind_of(kind.item, {})
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


# -- validated once -------------------------------------------------------------------------------
# A validated config is sealed (read-only, struct mode) and registered here by identity with its
# resolution: a reader handed that very object (a trainer, the model factory, the loop) takes it as
# validated and pays nothing; anything else (a mapping, a copy, a merge, a config a user unlocked) is
# validated where it enters. Entries leave with their config (weak references).
@dataclass(frozen=True)
class _Resolution:
    config: weakref.ref
    sources: dict[str, str]
    unused: tuple[UnusedKey, ...]
    notes: tuple[str, ...]


_SEALED: dict[int, _Resolution] = {}  # id(sealed config) -> its resolution
_SEALED_SECTIONS: dict[int, tuple[weakref.ref, str]] = {}  # id(section of a sealed config) -> (it, its name)


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def forget(ref: weakref.ref) -> None:
        entry = _SEALED.get(key)
        if entry is not None and entry.config is ref:
            del _SEALED[key]
        if _SEALED_SECTIONS.get(key, (None,))[0] is ref:
            del _SEALED_SECTIONS[key]

    return forget


def _still_sealed(node: Any) -> bool:
    """True when `node` and every section under it are still read-only (nobody unlocked one)."""
    if not OmegaConf.is_readonly(node):
        return False
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node)) if isinstance(node, ListConfig) else ()
    children = (node._get_node(key) for key in keys)
    return all(_still_sealed(c) for c in children if isinstance(c, (DictConfig, ListConfig)))


def _seal(resolved: ResolvedConfig) -> ResolvedConfig:
    """Registers `resolved.config` (made read-only here) as validated, with its resolution."""
    config = resolved.config
    OmegaConf.set_readonly(config, True)
    key = id(config)
    _SEALED[key] = _Resolution(
        weakref.ref(config, _forget(key)), dict(resolved.sources), tuple(resolved.unused), tuple(resolved.notes)
    )
    for name in schema_fields(RunSettings):
        node = config._get_node(name)
        if isinstance(node, DictConfig):
            _SEALED_SECTIONS[id(node)] = (weakref.ref(node, _forget(id(node))), name)
    return resolved


def sealed_resolution(config: Any, source: str) -> ResolvedConfig | None:
    """The resolution of `config` when it is a sealed validated config (this very object, still
    read-only), named `source`; None for anything else."""
    entry = _SEALED.get(id(config))
    if entry is None or entry.config() is not config or not _still_sealed(config):
        return None
    return ResolvedConfig(config, source, dict(entry.sources), list(entry.unused), list(entry.notes))


def is_sealed_section(node: Any, name: str) -> bool:
    """True when `node` is the section `name` (e.g. "model") of a sealed validated config, still read-only."""
    ref, section = _SEALED_SECTIONS.get(id(node), (None, None))
    return section == name and ref() is node and _still_sealed(node)


def validate_settings(
    config: Any, source: str, *, given_sources: Mapping[str, str] | None = None, shared: bool = False
) -> ResolvedConfig:
    """Validates `config` (a mapping or a DictConfig; only read) against the schema.

    Args:
        config: the settings; interpolations are resolved first. A config this function returned
            with `shared=True` (sealed) is taken as it is, with the resolution it was sealed with.
        source: names what is validated in every error ("config file x.yaml", "the config given to ...").
        given_sources: origin of given keys when not "file" (e.g. "override"), by dotted key.
        shared: return the sealed config: read-only, and taken as validated by every reader it is
            handed to (trainers, the model factory, the loop); else a writable copy of the caller's
            own (which readers validate again, since it may have changed).

    Raises ConfigError listing every unknown key (with the nearest valid key), wrong type, value out
    of range and disagreement.
    """
    known = sealed_resolution(config, source)
    if known is None:
        known = _seal(_validated(config, source, given_sources))
    return known if shared else writable_copy(known)


def reseal(resolved: ResolvedConfig) -> ResolvedConfig:
    """`resolved` after a change made through its writable config (e.g. `tokenizer.apply_vocab`):
    validated again and sealed, keeping the origins, unused keys and notes recorded so far."""
    checked = _validated(resolved.config, resolved.source, resolved.sources)
    return _seal(
        ResolvedConfig(checked.config, resolved.source, dict(resolved.sources), resolved.unused, resolved.notes)
    )


def _validated(config: Any, source: str, given_sources: Mapping[str, str] | None) -> ResolvedConfig:
    if isinstance(config, (DictConfig, ListConfig)):
        try:
            config = OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: cannot resolve an interpolation ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(config).__name__}")
    problems = _Problems(source)
    flat = {k: v for k, v in _flatten(copy.deepcopy(dict(config))).items() if v != "???"}
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
    return ResolvedConfig(validated, source, sources, unused, notes)


def writable_copy(resolved: ResolvedConfig) -> ResolvedConfig:
    """A copy of `resolved` whose config the caller may change (then `reseal` it to hand it on)."""
    mine = copy.deepcopy(resolved.config)
    OmegaConf.set_readonly(mine, False)
    return ResolvedConfig(mine, resolved.source, dict(resolved.sources), list(resolved.unused), list(resolved.notes))


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
