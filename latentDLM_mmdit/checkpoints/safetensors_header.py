"""A safetensors header read and validated before anything is allocated: offsets, dtypes, shapes,
coverage of the data section."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from latentDLM_mmdit.checkpoints.base import CheckpointError

MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the safetensors library's own limit


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
