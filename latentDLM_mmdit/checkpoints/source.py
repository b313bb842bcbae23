"""Opening a checkpoint (this project's safetensors, any safetensors, upstream's `.pt` files and
folders) into a `CheckpointSource`: names, shapes, dtypes and metadata, tensors read on demand, and
`CheckpointContents`, what was used, ignored, stripped and dropped."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from latentDLM_mmdit.checkpoints_mmdit import (
    InertRecord,
    UnreadableTorchFile,
    load_torch_file,
    resolve_upstream_folder,
)
from latentDLM_mmdit.checkpoints.base import _human_bytes, CheckpointError
from latentDLM_mmdit.checkpoints.keys import _key_changes, CLUSTER_HEAD, LATENT_IN, normalize_keys, TOKEN_EMBED
from latentDLM_mmdit.checkpoints.safetensors_header import read_safetensors_header, SafetensorsHeader

MODEL_SIZE_KEYS = ("vocab_size", "latent_dim", "cluster_size")

WRAPPER_KEYS = ("model_state_dict", "state_dict")


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
