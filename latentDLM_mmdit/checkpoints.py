"""Saving and strictly loading model checkpoints, and reading upstream's safely.

Written here: one safetensors file with the model's state dict and metadata (format, config,
versions of torch / mmdit / hyper-connections / x-transformers, trainer kind, step, model sizes),
plus `<stem>.train_state.pt` beside it with the optimizer state, step and RNG states, published
as a pair that survives a kill at any point (`save_checkpoint`, `remove_interrupted_saves`).

Read here, never modified:
- that format and any safetensors file, its header validated before anything is allocated;
- upstream's `.pt` / `.pth` / `.bin` files and checkpoint folders (see `checkpoints_mmdit`):
  torch's weights_only unpickler, plain records (a dataclass such as upstream's `TrainingState`)
  read as data, numpy scalars through validating replacements, everything else refused with the
  global's name and a safe way forward. The state dict is a bare one or the one under
  `model_state_dict` / `state_dict`; keys lose `module.` (DDP), `_orig_mod.` (torch.compile) and
  `model.` (the trainer) prefixes nested in any order; the trainer's `text_noise_schedule.*`
  buffers are dropped. `CheckpointSource.contents` says what was used, ignored, stripped, dropped.

Also: `derive_layout` (the model's sizes from names and shapes alone), `layout_differences`
(config vs checkpoint, key by key), `find_non_finite` (NaN/Inf, one tensor at a time), and the
command line `python -m latentDLM_mmdit.checkpoints inspect IN` / `convert IN OUT.safetensors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentDLM_mmdit.checkpoints_mmdit import (
    InertRecord,
    TrainingState,
    UnreadableTorchFile,
    load_torch_file,
    resolve_upstream_folder,
)

logger = logging.getLogger(__name__)

FORMAT = "mmdit-compat/1"
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")
DROPPED_PREFIXES = ("text_noise_schedule.",)
WRAPPER_KEYS = ("model_state_dict", "state_dict")
TRACKED_PACKAGES = ("torch", "mmdit", "hyper-connections", "x-transformers")
# Residual-stream parameter names: those only mmdit 0.2.x (HyperConnections) has, those only
# mmdit 0.3.x (ManifoldConstrainedHyperConnections) has, and the container of both.
MMDIT_02_MARKERS = ("dynamic_alpha_scale", "dynamic_beta_scale")
MMDIT_03_MARKERS = ("pre_branch_scale", "residual_scale", "h_post_scale")
RESIDUAL_CONTAINER = "residual_fns"
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the safetensors library's own limit
MODEL_SIZE_KEYS = ("vocab_size", "latent_dim", "cluster_size")
MODEL_DEFAULT_RESIDUAL_STREAMS = 2  # what MultimodalMMDiT builds when model.num_residual_streams is unset
NON_FINITE_CHUNK = 1 << 24  # elements counted per step (bounds the temporary masks)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["torch"] = torch.__version__
    return versions


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- keys ------------------------------------------------------------------------------------------
def normalize_key(key: str) -> str | None:
    """Strips wrapper prefixes until none is left; None for keys that are not the model's."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    if key.startswith(DROPPED_PREFIXES):
        return None
    return key


def normalize_keys(keys: Iterable[str], source: str) -> dict[str, str]:
    """Map model key -> source key. Two source keys landing on one model key is an error."""
    mapping: dict[str, str] = {}
    for key in keys:
        model_key = normalize_key(key)
        if model_key is None:
            continue
        if model_key in mapping:
            raise CheckpointError(f"{source}: keys {mapping[model_key]!r} and {key!r} both map to {model_key!r}")
        mapping[model_key] = key
    return mapping


def _key_changes(keys: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """({stripped prefix: count}, dropped source keys)."""
    stripped: dict[str, int] = {}
    dropped = []
    for key in keys:
        model_key = normalize_key(key)
        if model_key is None:
            dropped.append(key)
        elif model_key != key:
            prefix = key[: len(key) - len(model_key)]
            stripped[prefix] = stripped.get(prefix, 0) + 1
    return stripped, dropped


# -- safetensors header ----------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets within the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, SafetensorsEntry]
    metadata: dict[str, str]
    data_start: int  # file offset of the data section


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Reads and validates a safetensors header; nothing larger than the header (itself bounded
    by the file and by MAX_SAFETENSORS_HEADER) is allocated. Raises CheckpointError naming the
    file and the problem: too short, header length beyond the file or absurd, header not a JSON
    object, bad metadata, unknown dtype, bad shape, data offsets outside the file, overlapping,
    leaving gaps, or not matching shape x dtype size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if size == 0:
                raise CheckpointError(f"{path}: the file is empty (0 bytes); was its write interrupted?")
            if size < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes, shorter than the 8-byte header length every safetensors file starts with"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_SAFETENSORS_HEADER:
                raise CheckpointError(
                    f"{path}: declares a {header_len}-byte header, beyond the {MAX_SAFETENSORS_HEADER}"
                    "-byte limit (a header bomb or a damaged file); nothing was allocated"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: declares a {header_len}-byte header but the file has only "
                    f"{size - 8} bytes after the length: truncated, or not a safetensors file"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: its header is not JSON ({exc}); not a safetensors file, or damaged") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: its __metadata__ is not a JSON object of strings")
    data_len = size - 8 - header_len
    entries = {name: _header_entry(path, name, info, data_len) for name, info in header.items()}
    _check_coverage(path, entries, data_len)
    return SafetensorsHeader(entries, dict(metadata), 8 + header_len)


def _header_entry(path: Path, name: str, info: Any, data_len: int) -> SafetensorsEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object with dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unknown dtype {info['dtype']!r} (known: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
        )
    begin, end = offsets
    needed = torch.Size(shape).numel() * dtype.itemsize
    if end - begin != needed:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes) "
            f"but shape {shape} x {info['dtype']} needs {needed} bytes"
        )
    if end > data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {end} of a data section of {data_len} bytes: "
            "the file is truncated or its header lies"
        )
    return SafetensorsEntry(dtype, tuple(shape), begin, end)


def _check_coverage(path: Path, entries: dict[str, SafetensorsEntry], data_len: int) -> None:
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise CheckpointError(
                f"{path}: tensors {previous!r} and {name!r} overlap (data offsets "
                f"{entries[previous].begin}-{position} and {entry.begin}-{entry.end})"
            )
        if entry.begin > position:
            raise CheckpointError(f"{path}: {entry.begin - position} bytes before tensor {name!r} belong to no tensor")
        position, previous = entry.end, name
    if position != data_len:
        raise CheckpointError(f"{path}: {data_len - position} bytes after the last tensor belong to no tensor")


# -- what a checkpoint holds -----------------------------------------------------------------------
def _tensor_count(value: Any, seen: set[int] | None = None) -> tuple[int, int]:
    """(tensors, bytes) under a value of nested dicts / lists / tuples (cycles counted once)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(value):
        return 1, value.numel() * value.element_size()
    if id(value) in seen or not isinstance(value, (Mapping, list, tuple)):
        return 0, 0
    seen.add(id(value))
    total = (0, 0)
    for item in value.values() if isinstance(value, Mapping) else value:
        n, b = _tensor_count(item, seen)
        total = (total[0] + n, total[1] + b)
    return total


def describe_value(value: Any) -> str:
    """A short description of a non-weight entry: records and numbers by repr, containers by size."""
    if torch.is_tensor(value):
        return f"tensor {list(value.shape)} {value.dtype}"
    if isinstance(value, (Mapping, list, tuple)):
        n, nbytes = _tensor_count(value)
        kind = "dict" if isinstance(value, Mapping) else type(value).__name__
        return f"{kind} of {len(value)} entries" + (f" holding {n} tensors ({_human_bytes(nbytes)})" if n else "")
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class CheckpointContents:
    """What `open_checkpoint` found and what it used.

    Attributes:
        requested: the path given; file: the file read (differs for an upstream folder).
        format: "safetensors", "torch zip" or "torch legacy".
        folder_note: for an upstream checkpoint folder, which file was used and what was not read.
        keys_used: top-level entries the weights came from (the wrapper key, or the whole file).
        ignored: top-level entries not used for the weights, each with a description.
        records: plain records found in the pickle (where, global, what they became).
        numpy_scalars: numpy scalars found in the pickle (where, dtype, value).
        prefixes_stripped: {prefix: number of keys}; dropped_keys: source keys that are not weights.
        n_tensors / n_elements / nbytes: the model tensors.
    """

    requested: str
    file: str
    format: str
    folder_note: str | None = None
    keys_used: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)
    numpy_scalars: list[str] = field(default_factory=list)
    prefixes_stripped: dict[str, int] = field(default_factory=dict)
    dropped_keys: list[str] = field(default_factory=list)
    metadata_keys: list[str] = field(default_factory=list)
    n_tensors: int = 0
    n_elements: int = 0
    nbytes: int = 0

    def lines(self) -> list[str]:
        out = [f"file: {self.file}"]
        if self.folder_note:
            out.append(f"folder: {self.folder_note}")
        out.append(f"format: {self.format}")
        out.append(
            f"weights from: {', '.join(self.keys_used)} ({self.n_tensors} model tensors, "
            f"{self.n_elements} values, {_human_bytes(self.nbytes)})"
        )
        if self.metadata_keys:
            out.append(f"metadata: {', '.join(self.metadata_keys)}")
        out.append("ignored: " + ("; ".join(f"{k}: {v}" for k, v in self.ignored.items()) or "nothing"))
        out.append("records: " + ("; ".join(self.records) or "none"))
        if self.numpy_scalars:
            out.append(
                f"numpy scalars: {'; '.join(self.numpy_scalars[:8])}"
                + (f" (+{len(self.numpy_scalars) - 8} more)" if len(self.numpy_scalars) > 8 else "")
            )
        out.append(
            "prefixes stripped: " + (", ".join(f"{p!r} x{n}" for p, n in self.prefixes_stripped.items()) or "none")
        )
        out.append("dropped (not model weights): " + (", ".join(self.dropped_keys) or "none"))
        return out


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class CheckpointSource:
    """An opened checkpoint: key mapping, shapes, metadata, and a lazy tensor getter.

    `path` is the file read; `contents` says what was found and used; `dtypes` maps model keys to
    their stored dtypes; `header` is the validated safetensors header (None for torch files)."""

    path: Path
    mapping: dict[str, str]  # model key -> source key
    shapes: dict[str, tuple[int, ...]]  # model key -> shape
    metadata: dict[str, Any]
    _getter: Any = field(repr=False, default=None)
    _closer: Any = field(repr=False, default=None)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    contents: CheckpointContents | None = None
    header: SafetensorsHeader | None = field(repr=False, default=None)

    def tensor(self, model_key: str) -> torch.Tensor:
        return self._getter(self.mapping[model_key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.mapping}

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _decode_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        try:
            out[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            out[key] = value
    return out


def _unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, the top-level key it was under or None for a bare state dict)."""
    wrapper = None
    if isinstance(obj, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
    state = obj[wrapper] if wrapper else obj
    if isinstance(state, InertRecord):
        raise CheckpointError(
            f"{source}: holds a pickled {state.global_name} object (read as an inert record), "
            "not a state dict; save its state_dict() instead"
        )
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: holds a {type(state).__name__}, not a state dict")
    bad = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
    if bad:
        raise CheckpointError(
            f"{source}: entries {bad[:5]} are not tensors; expected a state dict, or a dict with "
            f"one under {' or '.join(WRAPPER_KEYS)}"
        )
    return dict(state), wrapper


def _resolve(path: Path) -> tuple[Path, str | None]:
    if path.is_dir():
        try:
            return resolve_upstream_folder(path)
        except UnreadableTorchFile as exc:
            raise CheckpointError(str(exc)) from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    return path, None


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Opens a `.safetensors` or `.pt`/`.pth`/`.bin` checkpoint, or upstream's checkpoint folder,
    without loading every tensor at once and without running anything from it.

    Args:
        path: a checkpoint file, or a folder holding exactly one of upstream's checkpoint.pt,
            model_final.pth, model.pth (`contents.folder_note` says which was used).
    Raises CheckpointError naming the file, the problem and a way forward."""
    requested = Path(path)
    file, folder_note = _resolve(requested)
    if file.suffix == ".safetensors":
        source = _open_safetensors(file)
    else:
        source = _open_torch(file)
    source.contents.requested, source.contents.folder_note = str(requested), folder_note
    try:
        sizes = source.metadata.get("model_sizes")
        if sizes is not None:
            check_model_sizes(sizes, source.shapes, str(file))
    except CheckpointError:
        source.close()
        raise
    return source


def _summarize(
    contents: CheckpointContents,
    source_keys: Iterable[str],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
) -> None:
    contents.prefixes_stripped, contents.dropped_keys = _key_changes(source_keys)
    contents.n_tensors = len(shapes)
    contents.n_elements = sum(torch.Size(s).numel() for s in shapes.values())
    contents.nbytes = sum(torch.Size(shapes[k]).numel() * dtypes[k].itemsize for k in shapes)


def _open_safetensors(path: Path) -> CheckpointSource:
    header = read_safetensors_header(path)
    mapping = normalize_keys(header.entries, str(path))
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    shapes = {mk: header.entries[sk].shape for mk, sk in mapping.items()}
    dtypes = {mk: header.entries[sk].dtype for mk, sk in mapping.items()}
    contents = CheckpointContents(
        str(path),
        str(path),
        "safetensors",
        keys_used=[f"every tensor in the file ({len(header.entries)})"],
        metadata_keys=sorted(header.metadata),
    )
    _summarize(contents, header.entries, shapes, dtypes)
    return CheckpointSource(
        path,
        mapping,
        shapes,
        _decode_metadata(header.metadata),
        _getter=handle.get_tensor,
        _closer=lambda: handle.__exit__(None, None, None),
        dtypes=dtypes,
        contents=contents,
        header=header,
    )


def _open_torch(path: Path) -> CheckpointSource:
    try:
        loaded = load_torch_file(path)
    except UnreadableTorchFile as exc:
        raise CheckpointError(str(exc)) from None
    state, wrapper = _unwrap(loaded.obj, str(path))
    mapping = normalize_keys(state.keys(), str(path))
    shapes = {mk: tuple(state[sk].shape) for mk, sk in mapping.items()}
    dtypes = {mk: state[sk].dtype for mk, sk in mapping.items()}
    contents = CheckpointContents(
        str(path), str(path), loaded.container, records=loaded.records, numpy_scalars=loaded.numpy_scalars
    )
    contents.keys_used = [wrapper] if wrapper else ["the whole file (a bare state dict)"]
    metadata: dict[str, Any] = {}
    if wrapper:
        for key, value in loaded.obj.items():
            if key == wrapper:
                continue
            contents.ignored[str(key)] = describe_value(value)
            if _tensor_count(value)[0] == 0:  # small entries (step, config, records) are kept as metadata
                metadata[key] = value
    _summarize(contents, state, shapes, dtypes)
    return CheckpointSource(
        path, mapping, shapes, metadata, _getter=state.__getitem__, dtypes=dtypes, contents=contents
    )


def _as_source(checkpoint: CheckpointSource | str | Path) -> tuple[CheckpointSource, bool]:
    """(source, whether the caller must close it)."""
    if isinstance(checkpoint, CheckpointSource):
        return checkpoint, False
    return open_checkpoint(checkpoint), True


# -- model sizes and layout from names and shapes --------------------------------------------------
TOKEN_EMBED = "text_encoder.token_embed.weight"  # [V, H]
POSITION_EMBED = "text_encoder.position_embed"  # [1, max_seq_len, H]
LATENT_IN = "latent_encoder.projection.0.weight"  # [2H, D]
COND_OUT = "conditioning.combine.2.weight"  # [C, 4C]
TEXT_HEAD = "text_head.weight"  # [V, H]
CLUSTER_HEAD = "text_head_clusters.weight"  # [V, H], only when cluster_size > 0
BLOCK_KEY = re.compile(r"^mmdit\.blocks\.(\d+)\.")
STATIC_ALPHA_KEY = re.compile(r"^mmdit\.blocks\.\d+\.\w*residual_fns\.\d+\.static_alpha$")  # [n, n + 1]


def check_model_sizes(sizes: Any, shapes: Mapping[str, tuple[int, ...]], source: str) -> dict[str, int]:
    """Validates recorded model_sizes against the tensor shapes; returns them as ints.

    vocab_size must be the rows of text_encoder.token_embed.weight, latent_dim the columns of
    latent_encoder.projection.0.weight, and cluster_size > 0 exactly when text_head_clusters exists.

    Args:
        sizes: the decoded `model_sizes` metadata value (anything: it is untrusted).
        shapes: model key -> shape, from the checkpoint's header or pickle.
        source: the file, for messages."""
    if not isinstance(sizes, dict) or set(sizes) != set(MODEL_SIZE_KEYS):
        raise CheckpointError(
            f"{source}: metadata model_sizes is {sizes!r}; expected a JSON object with exactly "
            f"{', '.join(MODEL_SIZE_KEYS)}"
        )
    for key, value in sizes.items():
        if type(value) is not int or value < (0 if key == "cluster_size" else 1):
            raise CheckpointError(
                f"{source}: metadata model_sizes.{key} is {value!r}, not a "
                f"{'non-negative' if key == 'cluster_size' else 'positive'} integer"
            )
    for key, tensor, dim in (("vocab_size", TOKEN_EMBED, 0), ("latent_dim", LATENT_IN, 1)):
        shape = shapes.get(tensor)
        if shape is None or len(shape) != 2:
            raise CheckpointError(
                f"{source}: metadata model_sizes.{key} = {sizes[key]} cannot be checked: the "
                f"checkpoint has no 2-D {tensor} (shape {shape})"
            )
        if shape[dim] != sizes[key]:
            raise CheckpointError(
                f"{source}: metadata model_sizes.{key} = {sizes[key]} contradicts {tensor} "
                f"{list(shape)} ({key} {shape[dim]}); the metadata is wrong or forged"
            )
    if (sizes["cluster_size"] > 0) != (CLUSTER_HEAD in shapes):
        raise CheckpointError(
            f"{source}: metadata model_sizes.cluster_size = {sizes['cluster_size']} but the "
            f"checkpoint {'has' if CLUSTER_HEAD in shapes else 'has no'} {CLUSTER_HEAD}"
        )
    return dict(sizes)


def model_sizes_from(path: str | Path) -> dict[str, int] | None:
    """vocab_size / latent_dim / cluster_size recorded in a checkpoint of this format, checked
    against the tensor shapes; None when the checkpoint records none."""
    with open_checkpoint(path) as source:
        sizes = source.metadata.get("model_sizes")
        return None if sizes is None else check_model_sizes(sizes, source.shapes, str(source.path))


@dataclass(frozen=True)
class ModelLayout:
    """The MultimodalMMDiT layout a state dict implies.

    num_residual_streams is None when the residual-stream shapes do not tell it; residual_layout
    is "0.2.x" / "0.3.x" (the mmdit version whose parameter names appear) or None; evidence maps
    each field to the key and shape it was read from."""

    vocab_size: int
    hidden_size: int
    latent_dim: int
    max_seq_len: int
    n_blocks: int
    cond_dim: int
    cluster_head: bool
    num_residual_streams: int | None
    residual_layout: str | None
    evidence: dict[str, str] = field(compare=False, default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evidence"}


def derive_layout(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> ModelLayout:
    """Derives the model layout from names and shapes alone.

    Args:
        shapes: model key (prefixes stripped, as `CheckpointSource.shapes`) -> shape.
        source: what the shapes came from, for messages.
    Raises CheckpointError naming the key when a needed tensor is missing or shapes disagree."""

    def need(key: str, ndim: int) -> tuple[int, ...]:
        shape = shapes.get(key)
        if shape is None or len(shape) != ndim:
            raise CheckpointError(
                f"{source}: cannot derive the model layout: {key} is "
                f"{'missing' if shape is None else f'{list(shape)}, not {ndim}-D'} "
                "(not a MultimodalMMDiT state dict?)"
            )
        return tuple(shape)

    def agree(what: str, key: str, got: int, want: int) -> None:
        if got != want:
            raise CheckpointError(
                f"{source}: {key} {list(shapes[key])} gives {what} {got}, "
                f"{TOKEN_EMBED} {list(shapes[TOKEN_EMBED])} gives {want}"
            )

    vocab, hidden = need(TOKEN_EMBED, 2)
    _, max_seq_len, pos_hidden = need(POSITION_EMBED, 3)
    agree("hidden_size", POSITION_EMBED, pos_hidden, hidden)
    latent_width, latent_dim = need(LATENT_IN, 2)
    agree("2 x hidden_size", LATENT_IN, latent_width, 2 * hidden)
    cond_dim, cond_in = need(COND_OUT, 2)
    if cond_in != 4 * cond_dim:
        raise CheckpointError(f"{source}: {COND_OUT} {list(shapes[COND_OUT])} is not [C, 4C]")
    for head in (TEXT_HEAD, CLUSTER_HEAD):
        if head in shapes and tuple(shapes[head]) != (vocab, hidden):
            raise CheckpointError(
                f"{source}: {head} {list(shapes[head])} is not [vocab_size, hidden_size] = "
                f"{[vocab, hidden]} as {TOKEN_EMBED} gives"
            )
    blocks = sorted({int(m.group(1)) for k in shapes if (m := BLOCK_KEY.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(
            f"{source}: cannot derive n_blocks: mmdit.blocks.<i> indices are {blocks or 'absent'}, not 0..n-1"
        )
    alphas = {tuple(s) for k, s in shapes.items() if STATIC_ALPHA_KEY.match(k)}
    if not any(RESIDUAL_CONTAINER in k for k in shapes):
        streams = 1  # mmdit builds hyper-connection parameters only for more than one stream
    elif len(alphas) == 1 and len(next(iter(alphas))) == 2 and next(iter(alphas))[1] == next(iter(alphas))[0] + 1:
        streams = next(iter(alphas))[0]
    else:
        streams = None
    residual_layout = (
        "0.2.x"
        if any(m in k for k in shapes for m in MMDIT_02_MARKERS)
        else "0.3.x"
        if any(m in k for k in shapes for m in MMDIT_03_MARKERS)
        else None
    )
    evidence = {
        "vocab_size": f"{TOKEN_EMBED} {[vocab, hidden]}",
        "hidden_size": f"{TOKEN_EMBED} {[vocab, hidden]}",
        "latent_dim": f"{LATENT_IN} {[latent_width, latent_dim]}",
        "max_seq_len": f"{POSITION_EMBED} {list(shapes[POSITION_EMBED])}",
        "n_blocks": f"mmdit.blocks.0..{blocks[-1]}",
        "cond_dim": f"{COND_OUT} {[cond_dim, cond_in]}",
        "cluster_head": f"{CLUSTER_HEAD} {'present' if CLUSTER_HEAD in shapes else 'absent'}",
        "num_residual_streams": (
            f"static_alpha {list(next(iter(alphas)))}"
            if alphas and streams
            else "no residual_fns parameters"
            if streams == 1
            else "residual shapes inconclusive"
        ),
    }
    return ModelLayout(
        vocab,
        hidden,
        latent_dim,
        max_seq_len,
        len(blocks),
        cond_dim,
        CLUSTER_HEAD in shapes,
        streams,
        residual_layout,
        evidence,
    )


def checkpoint_layout(checkpoint: CheckpointSource | str | Path) -> ModelLayout:
    """derive_layout for an opened checkpoint or a path (read from the header / pickle only)."""
    source, owned = _as_source(checkpoint)
    try:
        return derive_layout(source.shapes, str(source.path))
    finally:
        if owned:
            source.close()


_MISSING = object()


def _config_value(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


@dataclass(frozen=True)
class LayoutDifference:
    config_key: str
    config_value: Any
    checkpoint_value: Any
    evidence: str

    def __str__(self) -> str:
        shown = "not set" if self.config_value is _MISSING else repr(self.config_value)
        return f"{self.config_key}: config {shown}, checkpoint {self.checkpoint_value!r} ({self.evidence})"


def layout_differences(layout: ModelLayout, config: Any) -> list[LayoutDifference]:
    """Config keys whose value does not build the checkpoint's layout, one entry per key.

    Args:
        layout: from derive_layout / checkpoint_layout.
        config: a run config (dict or OmegaConf, read only) with `model.*` and
            `tokenizer.vocab_size`; an unset key is a difference, except
            model.num_residual_streams, whose unset value builds MODEL_DEFAULT_RESIDUAL_STREAMS."""
    pairs = [
        ("tokenizer.vocab_size", "vocab_size"),
        ("model.hidden_size", "hidden_size"),
        ("model.latent_dim", "latent_dim"),
        ("model.max_seq_len", "max_seq_len"),
        ("model.n_blocks", "n_blocks"),
        ("model.cond_dim", "cond_dim"),
    ]
    out = []
    for key, name in pairs:
        value = _config_value(config, key)
        if value is _MISSING or value != getattr(layout, name):
            out.append(LayoutDifference(key, value, getattr(layout, name), layout.evidence[name]))
    cluster = _config_value(config, "model.cluster_size")
    cluster_on = cluster is not _MISSING and cluster is not None and cluster > 0
    if cluster_on != layout.cluster_head:
        out.append(
            LayoutDifference(
                "model.cluster_size", cluster, "> 0" if layout.cluster_head else 0, layout.evidence["cluster_head"]
            )
        )
    if layout.num_residual_streams is not None:
        streams = _config_value(config, "model.num_residual_streams")
        built = MODEL_DEFAULT_RESIDUAL_STREAMS if streams is _MISSING or streams is None else streams
        if built != layout.num_residual_streams:
            out.append(
                LayoutDifference(
                    "model.num_residual_streams",
                    streams,
                    layout.num_residual_streams,
                    layout.evidence["num_residual_streams"],
                )
            )
    return out


def explain_layout_differences(layout: ModelLayout, config: Any, source: str = "checkpoint") -> str | None:
    """None when the config builds the checkpoint's layout; else one line per differing key."""
    differences = layout_differences(layout, config)
    if not differences:
        return None
    return "\n".join(
        [f"the config does not build the layout of {source}; set these keys to the checkpoint's values:"]
        + [f"  {d}" for d in differences]
    )


# -- non-finite weights ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NonFiniteTensor:
    name: str
    nan: int
    posinf: int
    neginf: int
    numel: int


def _count_non_finite(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(NaN, +Inf, -Inf) counts, NON_FINITE_CHUNK values at a time."""
    flat = tensor.reshape(-1)
    nan = posinf = neginf = 0
    for start in range(0, flat.numel(), NON_FINITE_CHUNK):
        chunk = flat[start : start + NON_FINITE_CHUNK]
        nan += int(torch.isnan(chunk).sum())
        if not chunk.is_complex():
            posinf += int(torch.isposinf(chunk).sum())
            neginf += int(torch.isneginf(chunk).sum())
    return nan, posinf, neginf


def find_non_finite(checkpoint: CheckpointSource | str | Path) -> list[NonFiniteTensor]:
    """The model tensors holding NaN or +-Inf, with counts; one tensor in memory at a time (each
    is released before the next is read), counted in chunks of NON_FINITE_CHUNK values.

    Args:
        checkpoint: an opened CheckpointSource (left open) or a path (opened and closed here)."""
    source, owned = _as_source(checkpoint)
    found = []
    try:
        for key in source.mapping:
            if source.dtypes[key].is_floating_point or source.dtypes[key].is_complex:
                nan, posinf, neginf = _count_non_finite(source.tensor(key))
                if nan or posinf or neginf:
                    found.append(NonFiniteTensor(key, nan, posinf, neginf, torch.Size(source.shapes[key]).numel()))
    finally:
        if owned:
            source.close()
    return found


# -- comparing -------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    path: str
    n_tensors: int
    metadata: dict[str, Any]
    recorded_versions: dict[str, str] | None
    installed_versions: dict[str, str]
    version_differences: dict[str, tuple[str, str]]
    contents: CheckpointContents | None = None  # what was used, ignored, stripped, dropped

    @property
    def versions_match(self) -> bool | None:
        if self.recorded_versions is None:
            return None
        return not self.version_differences


def compare_versions(recorded: Mapping[str, str] | None) -> dict[str, tuple[str, str]]:
    """{package: (recorded, installed)} for mmdit / hyper-connections / x-transformers that differ."""
    if not recorded:
        return {}
    installed = installed_versions()
    return {
        name: (str(recorded[name]), installed[name])
        for name in ("mmdit", "hyper-connections", "x-transformers")
        if name in recorded and str(recorded[name]) != installed[name]
    }


def residual_stream_hint(model_keys: set[str], ckpt_keys: set[str], differing: list[str]) -> str | None:
    """Explains a mismatch confined to the residual streams, or None."""
    if not any(RESIDUAL_CONTAINER in k for k in differing):
        return None

    def layout(keys):
        if any(m in k for k in keys for m in MMDIT_02_MARKERS):
            return "0.2.x"
        if any(m in k for k in keys for m in MMDIT_03_MARKERS):
            return "0.3.x"
        return None  # a single residual stream has no hyper-connection parameters

    model_layout, ckpt_layout = layout(model_keys), layout(ckpt_keys)
    if model_layout and ckpt_layout and model_layout != ckpt_layout:
        return (
            f"the residual-stream parameters are laid out as mmdit {ckpt_layout} writes them "
            f"(0.2.x: HyperConnections, 0.3.x: ManifoldConstrainedHyperConnections) and the model "
            f"as mmdit {model_layout}: the checkpoint was probably written with another mmdit version"
        )
    if (model_layout is None) != (ckpt_layout is None):
        return (
            "one side has hyper-connection residual streams and the other has none: "
            "model.num_residual_streams probably differs from the checkpoint's (1 vs > 1)"
        )
    return "the residual-stream parameters differ in shape: model.num_residual_streams probably differs"


def layout_mismatch_message(model: torch.nn.Module, source: CheckpointSource) -> str | None:
    """None when the checkpoint's names and shapes equal the model's; else a readable report."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(source.shapes))
    unexpected = sorted(set(source.shapes) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(source.shapes) if expected[k] != source.shapes[k])
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"checkpoint {source.path} does not fit the model (strict load):"]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {title} key(s): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
    if misshaped:
        shown = [f"{k} checkpoint {source.shapes[k]} vs model {expected[k]}" for k in misshaped[:12]]
        lines.append(f"  {len(misshaped)} mis-shaped key(s): {'; '.join(shown)}{' ...' if len(misshaped) > 12 else ''}")
    hint = residual_stream_hint(set(expected), set(source.shapes), missing + unexpected + misshaped)
    if hint:
        recorded = (source.metadata.get("versions") or {}).get("mmdit", "not recorded")
        lines.append(f"  {hint}; installed mmdit {installed_versions()['mmdit']}, recorded {recorded}")
    return "\n".join(lines)


# -- loading ---------------------------------------------------------------------------------------
def _check_dtype(path, key: str, dtype: torch.dtype, target: torch.Tensor) -> None:
    if dtype.is_floating_point != target.is_floating_point():
        raise CheckpointError(f"{path}: {key} has dtype {dtype}, the model's has {target.dtype}")


def _read_safetensors_into(
    path: Path, header: SafetensorsHeader, mapping: dict[str, str], targets: dict[str, torch.Tensor]
) -> None:
    """Reads each tensor's bytes straight into the model's parameter memory when dtype and device
    allow (no second copy of the weights in memory, no mmap of the whole file); otherwise through a
    per-tensor temporary. The header was validated by read_safetensors_header."""
    with open(path, "rb") as f:
        for model_key, source_key in mapping.items():
            entry = header.entries[source_key]
            target = targets[model_key]
            _check_dtype(path, model_key, entry.dtype, target)
            f.seek(header.data_start + entry.begin)
            nbytes = entry.end - entry.begin
            direct = (
                target.dtype == entry.dtype
                and target.device.type == "cpu"
                and target.is_contiguous()
                and target.numel() * target.element_size() == nbytes
            )
            if direct:
                buffer = target.detach().reshape(-1).view(torch.uint8).numpy()
                read = f.readinto(memoryview(buffer))
                if read != nbytes:
                    raise CheckpointError(f"{path}: truncated data for {source_key}")
            else:
                raw = bytearray(nbytes)
                if f.readinto(raw) != nbytes:
                    raise CheckpointError(f"{path}: truncated data for {source_key}")
                value = torch.frombuffer(raw, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)
                target.copy_(value)
                del value, raw


def load_checkpoint_into(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Strictly loads a checkpoint into `model`, one tensor at a time (no second full copy).

    Raises CheckpointError naming missing, unexpected and mis-shaped keys. Differences between the
    recorded and installed mmdit / hyper-connections versions are logged and reported: weights
    that load are no proof of equal outputs under another hyper-connections version.
    """
    with open_checkpoint(path) as source:
        problem = layout_mismatch_message(model, source)
        if problem:
            raise CheckpointError(problem)
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():
            if source.header is not None:
                _read_safetensors_into(source.path, source.header, source.mapping, targets)
            else:
                for key in source.mapping:
                    value = source.tensor(key)
                    _check_dtype(source.path, key, value.dtype, targets[key])
                    targets[key].copy_(value)
                    del value
        recorded = source.metadata.get("versions") if isinstance(source.metadata.get("versions"), dict) else None
        differences = compare_versions(recorded)
        if differences:
            logger.warning(
                "checkpoint %s was written with %s; installed %s: outputs can differ even though the weights load",
                source.path,
                ", ".join(f"{k} {v[0]}" for k, v in differences.items()),
                ", ".join(f"{k} {v[1]}" for k, v in differences.items()),
            )
        return LoadReport(
            str(source.path),
            len(source.mapping),
            dict(source.metadata),
            recorded,
            installed_versions(),
            differences,
            source.contents,
        )


# -- writing ---------------------------------------------------------------------------------------
TMP_SUFFIX = ".tmp"  # a file being written; published by an atomic rename once complete and fsynced
CHECKPOINT_NAME = re.compile(r"^step_\d+\.")  # the names the training loop gives its checkpoint files


def train_state_path(path: str | Path) -> Path:
    """`<stem>.train_state.pt` beside the weights file `path`."""
    path = Path(path)
    return path.with_name(path.stem + ".train_state.pt")


def _fsync_dir(directory: Path) -> None:
    """Makes the renames in `directory` durable (a rename is not, until its directory is synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(tmp: Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    save_file(dict(state), str(tmp), metadata=dict(meta))
    with open(tmp, "rb+") as f:  # save_file writes by name; sync what it wrote
        os.fsync(f.fileno())


def _write_train_state(tmp: Path, state: Mapping[str, Any]) -> None:
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    config: Any,
    trainer_kind: str,
    step: int,
    model_sizes: Mapping[str, int] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `path` (.safetensors) and, when given, `train_state` beside it (`train_state_path`).

    A reader never sees the weights without their train state: both are written to `<name>.tmp`
    and fsynced, the train state is renamed into place first and the weights last, and the
    directory is fsynced after each rename. Both files carry the same `pair_id` (and step), which
    `load_train_state` checks. A save killed midway leaves `.tmp` files, or a train state whose
    weights were never published: `remove_interrupted_saves` clears both at the next start.

    Args:
        path: target file; must end in `.safetensors`.
        model: the bare model (unwrap DDP / compile first; prefixes are refused).
        config: the run config (OmegaConf or plain dict), stored as JSON.
        trainer_kind: "stable" or "cycle".
        step: global step.
        model_sizes: vocab_size, latent_dim, cluster_size (read from the model when omitted).
        train_state: optimizer state, RNG states and anything else needed to resume (only read; a
            "step" in it must equal `step`); saved with "step" and "pair_id" added.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    prefixed = [k for k in state if normalize_key(k) != k]
    if prefixed:
        raise ValueError(f"save the bare model, not a wrapper: keys {prefixed[:3]} carry a wrapper prefix")
    if train_state is not None and train_state.get("step", step) != step:
        raise ValueError(f"train_state has step {train_state['step']}, the checkpoint step {step}")
    if model_sizes is None:
        model_sizes = {name: int(getattr(model, name)) for name in ("vocab_size", "latent_dim", "cluster_size")}
    config_container = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
    meta = {
        "format": FORMAT,
        "config": json.dumps(config_container),
        "versions": json.dumps(installed_versions()),
        "trainer_kind": str(trainer_kind),
        "step": str(int(step)),
        "model_sizes": json.dumps(dict(model_sizes)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_tmp = path.with_name(path.name + TMP_SUFFIX)
    if train_state is None:
        _write_weights(weights_tmp, state, meta)
        os.replace(weights_tmp, path)
        _fsync_dir(path.parent)
        return path
    pair_id = uuid.uuid4().hex  # os.urandom: no global RNG is drawn from
    meta["pair_id"] = pair_id
    state_file = train_state_path(path)
    state_tmp = state_file.with_name(state_file.name + TMP_SUFFIX)
    _write_train_state(state_tmp, {**train_state, "step": int(step), "pair_id": pair_id})
    _write_weights(weights_tmp, state, meta)
    os.replace(state_tmp, state_file)  # published first: weights without it are never visible
    _fsync_dir(path.parent)
    os.replace(weights_tmp, path)
    _fsync_dir(path.parent)
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The train state saved beside the weights file `path`, refused unless it is that file's pair
    (same step and `pair_id`; files written before pair ids existed compare the step only)."""
    path = Path(path)
    state_path = train_state_path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"resume needs a .safetensors checkpoint written by this training loop, got {path}")
    if not state_path.is_file():
        raise CheckpointError(
            f"resume needs {state_path} beside {path}; it does not exist (removed, or copied "
            "without it): resume from a checkpoint that has both files"
        )
    meta = read_safetensors_header(path).metadata
    state = torch.load(str(state_path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: holds a {type(state).__name__}, not a train state dict")
    ours = (str(state.get("step")), state.get("pair_id"))
    theirs = (meta.get("step"), meta.get("pair_id"))
    if ours != theirs:
        raise CheckpointError(
            f"{state_path} (step {ours[0]}, pair {ours[1]}) is not the train state of {path} (step {theirs[0]}, "
            f"pair {theirs[1]}): a save of that step was interrupted, or the files come from different runs; "
            "resume from another checkpoint"
        )
    return state


def remove_interrupted_saves(directory: str | Path) -> list[Path]:
    """Removes what interrupted saves left in a checkpoint directory: `step_*.tmp` files and train
    states whose weights were never published. Logs each removal; returns the removed paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if not entry.is_file() or not CHECKPOINT_NAME.match(entry.name):
            continue
        if entry.name.endswith(TMP_SUFFIX):
            why = "an unfinished write"
        elif (
            entry.name.endswith(".train_state.pt")
            and not entry.with_name(entry.name.removesuffix(".train_state.pt") + ".safetensors").exists()
        ):
            why = "a train state whose weights were never published"
        else:
            continue
        size = entry.stat().st_size
        entry.unlink()
        removed.append(entry)
        logger.warning("removed %s (%s, %s) left by an interrupted save", entry, why, _human_bytes(size))
    if removed:
        _fsync_dir(directory)
    return removed


# -- converting ------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_safetensors(path: Path, source: CheckpointSource, metadata: Mapping[str, str]) -> None:
    """Streams the model tensors of `source` (model keys) into a new safetensors file at `path`,
    one tensor in memory at a time. Fails if `path` exists."""
    if sys.byteorder != "little":
        raise CheckpointError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {}
    offset = 0
    for key in source.mapping:
        dtype, shape = source.dtypes[key], source.shapes[key]
        if dtype not in SAFETENSORS_NAMES:
            raise CheckpointError(f"{source.path}: {key} has dtype {dtype}, which safetensors cannot hold")
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in source.mapping:
            value = source.tensor(key).detach().to("cpu").contiguous()
            if value.dtype != source.dtypes[key] or tuple(value.shape) != source.shapes[key]:
                raise CheckpointError(
                    f"{source.path}: {key} read as {value.dtype} {list(value.shape)}, "
                    f"its header says {source.dtypes[key]} {list(source.shapes[key])}"
                )
            f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            del value


def _json_or_none(value: Any) -> str | None:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


def _converted_metadata(source: CheckpointSource, requested: Path) -> dict[str, str]:
    """This project's metadata for a converted file: what is known, never invented. Versions are
    carried only when the source recorded them (upstream's files do not)."""
    contents = source.contents
    meta = {"format": FORMAT, "converted_with": json.dumps(installed_versions())}
    if source.header is not None:  # this project's (or any) safetensors: carry its metadata verbatim
        for key in ("config", "versions", "trainer_kind", "step", "model_sizes"):
            if key in source.header.metadata:
                meta[key] = source.header.metadata[key]
    else:
        states = [
            v for k, v in source.metadata.items() if k in ("state", "training_state") and isinstance(v, TrainingState)
        ]
        if len(states) == 1:
            meta["step"] = str(states[0].step)
            meta["training_state"] = json.dumps(dataclasses.asdict(states[0]))
        elif isinstance(source.metadata.get("step"), int) and not isinstance(source.metadata.get("step"), bool):
            meta["step"] = str(source.metadata["step"])
        if "config" in source.metadata and _json_or_none(source.metadata["config"]) is not None:
            meta["config"] = _json_or_none(source.metadata["config"])
    try:
        layout = derive_layout(source.shapes, str(source.path))
    except CheckpointError:
        layout = None
    if layout is not None:
        meta["layout"] = json.dumps(layout.as_dict())
        if "model_sizes" not in meta and not layout.cluster_head:  # cluster_size is exact (0) only without a head
            meta["model_sizes"] = json.dumps(
                {"vocab_size": layout.vocab_size, "latent_dim": layout.latent_dim, "cluster_size": 0}
            )
    meta["converted_from"] = json.dumps(
        {
            "path": str(requested),
            "file": str(source.path),
            "sha256": _sha256(source.path),
            "format": contents.format,
            "folder": contents.folder_note,
            "weights_from": contents.keys_used,
            "ignored": contents.ignored,
            "records": contents.records,
            "prefixes_stripped": contents.prefixes_stripped,
            "dropped_keys": contents.dropped_keys,
        }
    )
    return meta


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def convert_checkpoint(source_path: str | Path, out_path: str | Path) -> tuple[Path, CheckpointContents]:
    """Re-saves the model weights of any readable checkpoint as this project's safetensors.

    The output's metadata says where the weights came from (file, sha256, records found, e.g. the
    step of upstream's TrainingState). Refuses to overwrite the input or an existing output; the
    written file is re-read and compared bit for bit before it takes its name.

    Args:
        source_path: anything open_checkpoint reads (read only, never modified).
        out_path: a new `.safetensors` file in an existing folder.
    Returns (the output path, what was read from the source)."""
    requested, out = Path(source_path), Path(out_path)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"output {out} must end in .safetensors")
    if out.exists() and requested.exists() and (out.resolve() == requested.resolve()):
        raise CheckpointError(f"output {out} is the input: convert never overwrites its input; choose another name")
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"output {out} already exists: convert never overwrites; choose another name")
    if not out.parent.is_dir():
        raise CheckpointError(f"output folder {out.parent} does not exist; create it first")
    with open_checkpoint(requested) as source:
        metadata = _converted_metadata(source, requested)
        partial = out.with_name(f".{out.stem}.partial-{os.getpid()}.safetensors")
        try:
            write_safetensors(partial, source, metadata)
            with open_checkpoint(partial) as written:
                if set(written.mapping) != set(source.mapping):
                    raise CheckpointError(f"{partial}: written keys differ from the source's")
                for key in source.mapping:
                    if not _same_bytes(written.tensor(key), source.tensor(key)):
                        raise CheckpointError(f"{partial}: {key} differs from the source after writing")
            if out.exists():
                raise CheckpointError(f"output {out} appeared while converting; nothing was overwritten")
            os.replace(partial, out)
        except OSError as exc:
            raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return out, source.contents


# -- command line ----------------------------------------------------------------------------------
def inspect_lines(path: str | Path) -> list[str]:
    """What `open_checkpoint` finds in a checkpoint: format, keys used and ignored, records,
    prefixes, dropped keys, layout, versions and non-finite tensors."""
    with open_checkpoint(path) as source:
        lines = source.contents.lines()
        try:
            layout = derive_layout(source.shapes, str(source.path))
            lines.append("layout: " + ", ".join(f"{k}={v}" for k, v in layout.as_dict().items()))
        except CheckpointError as exc:
            lines.append(f"layout: not derivable ({exc})")
        provenance = {k: source.metadata[k] for k in ("trainer_kind", "step") if k in source.metadata}
        if provenance:
            lines.append("recorded: " + ", ".join(f"{k}={v}" for k, v in provenance.items()))
        recorded = source.metadata.get("versions")
        installed = installed_versions()
        if isinstance(recorded, dict):
            differences = compare_versions(recorded)
            lines.append(
                f"versions recorded: {recorded}; "
                + (f"differing from installed: {differences}" if differences else "installed ones match")
            )
        else:
            lines.append(f"versions: not recorded; installed {installed}")
        bad = find_non_finite(source)
        lines.append(
            "non-finite tensors: "
            + (
                "; ".join(f"{t.name} ({t.nan} NaN, {t.posinf} +Inf, {t.neginf} -Inf of {t.numel})" for t in bad)
                or "none"
            )
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m latentDLM_mmdit.checkpoints",
        description="Inspect a checkpoint, or convert one to this project's safetensors, without running "
        "anything from it. Exit 0 on success, 2 on a problem with the input.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="what a checkpoint holds and what loading it would use")
    inspect.add_argument("checkpoint", help=".safetensors, .pt/.pth/.bin, or upstream's checkpoint folder")
    convert = commands.add_parser("convert", help="re-save a checkpoint's model weights as safetensors")
    convert.add_argument("checkpoint", help=".safetensors, .pt/.pth/.bin, or upstream's checkpoint folder")
    convert.add_argument("out", help="new .safetensors file (never overwritten)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print("\n".join(inspect_lines(args.checkpoint)))
        else:
            out, contents = convert_checkpoint(args.checkpoint, args.out)
            print(f"wrote {out}: {contents.n_tensors} tensors from {contents.file} ({', '.join(contents.keys_used)})")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
