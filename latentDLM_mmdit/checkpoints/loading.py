"""The strict load of a checkpoint into a model, with what differs explained (versions recorded vs
installed, residual-stream layouts of mmdit 0.2.x and 0.3.x)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from latentDLM_mmdit.checkpoints.base import (
    CheckpointError,
    installed_versions,
    logger,
    MMDIT_02_MARKERS,
    MMDIT_03_MARKERS,
    RESIDUAL_CONTAINER,
)
from latentDLM_mmdit.checkpoints.safetensors_header import SafetensorsHeader
from latentDLM_mmdit.checkpoints.source import CheckpointContents, CheckpointSource, open_checkpoint


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
