"""Converting any readable checkpoint to this project's safetensors, `inspect`, and the command
line `python -m latentDLM_mmdit.checkpoints inspect IN` / `convert IN OUT.safetensors`."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from latentDLM_mmdit.checkpoints_mmdit import (
    TrainingState,
)
from latentDLM_mmdit.checkpoints.base import CheckpointError, FORMAT, installed_versions
from latentDLM_mmdit.checkpoints.layout import derive_layout
from latentDLM_mmdit.checkpoints.loading import compare_versions
from latentDLM_mmdit.checkpoints.nonfinite import find_non_finite
from latentDLM_mmdit.checkpoints.safetensors_header import SAFETENSORS_NAMES
from latentDLM_mmdit.checkpoints.source import CheckpointContents, CheckpointSource, open_checkpoint


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
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
            "sha256": file_sha256(source.path),
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
