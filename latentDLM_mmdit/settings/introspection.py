"""The schema read as types: what kind of value each key holds, the keys of a section, the nearest
valid key to a typo."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


from latentDLM_mmdit.settings.upstream_keys import ALIASES, BETAS_KEY, UPSTREAM_UNUSED, UpstreamKey
from latentDLM_mmdit.settings.schema import (
    RunSettings,
)


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


def field_kind_of(annotation: Any, metadata: Mapping[str, Any]) -> FieldKind:
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
    return {f.name: field_kind_of(hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


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
                return field_kind_of(kind.item, {})
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


def upstream_entry(key: str) -> tuple[str, UpstreamKey] | None:
    """The UPSTREAM_UNUSED entry covering `key` (itself or a section above it)."""
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in UPSTREAM_UNUSED and schema_kind(prefix) is None:
            return prefix, UPSTREAM_UNUSED[prefix]
    return None
