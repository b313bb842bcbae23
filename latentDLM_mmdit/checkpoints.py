"""Saving and strictly loading model checkpoints.

Written here: one safetensors file with the model's state dict and metadata (format, config,
versions of torch / mmdit / hyper-connections / x-transformers, trainer kind, step, model sizes),
plus `<stem>.train_state.pt` beside it with the optimizer state, step and RNG states.

Read here: that format, and upstream's `.pt` files (always `torch.load(weights_only=True)`):
a bare state dict or a dict holding it under `model_state_dict` / `state_dict`, keys prefixed by
`module.` (DDP), `_orig_mod.` (torch.compile) and `model.` (the trainer), nested in any order, with
the trainer's `text_noise_schedule.*` buffers dropped. The source file is only ever read.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


# -- keys ------------------------------------------------------------------------------------------
def normalize_key(key: str) -> str | None:
    """Strips wrapper prefixes until none is left; None for keys that are not the model's."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
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


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class CheckpointSource:
    """An opened checkpoint: key mapping, shapes, metadata, and a lazy tensor getter."""

    path: Path
    mapping: dict[str, str]  # model key -> source key
    shapes: dict[str, tuple[int, ...]]  # model key -> shape
    metadata: dict[str, Any]
    _getter: Any = field(repr=False, default=None)
    _closer: Any = field(repr=False, default=None)

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


def _unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    extra: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for wrapper in WRAPPER_KEYS:
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                extra = {k: v for k, v in obj.items() if k != wrapper and not torch.is_tensor(v)}
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    bad = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
    if bad:
        raise CheckpointError(
            f"{source}: entries {bad[:5]} are not tensors; expected a state dict, or a dict with "
            f"one under {' or '.join(WRAPPER_KEYS)}"
        )
    return dict(obj), extra


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Opens a `.safetensors` or `.pt`/`.pth`/`.bin` checkpoint without loading every tensor at once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        keys = list(handle.keys())
        mapping = normalize_keys(keys, str(path))
        shapes = {mk: tuple(handle.get_slice(sk).get_shape()) for mk, sk in mapping.items()}
        return CheckpointSource(path, mapping, shapes, _decode_metadata(handle.metadata()),
                                _getter=handle.get_tensor, _closer=lambda: handle.__exit__(None, None, None))
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {exc})"
        ) from exc
    state, extra = _unwrap(obj, str(path))
    mapping = normalize_keys(state.keys(), str(path))
    shapes = {mk: tuple(state[sk].shape) for mk, sk in mapping.items()}
    return CheckpointSource(path, mapping, shapes, extra, _getter=state.__getitem__)


# -- comparing -------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    path: str
    n_tensors: int
    metadata: dict[str, Any]
    recorded_versions: dict[str, str] | None
    installed_versions: dict[str, str]
    version_differences: dict[str, tuple[str, str]]

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
    return {name: (str(recorded[name]), installed[name])
            for name in ("mmdit", "hyper-connections", "x-transformers")
            if name in recorded and str(recorded[name]) != installed[name]}


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
        return (f"the residual-stream parameters are laid out as mmdit {ckpt_layout} writes them "
                f"(0.2.x: HyperConnections, 0.3.x: ManifoldConstrainedHyperConnections) and the model "
                f"as mmdit {model_layout}: the checkpoint was probably written with another mmdit version")
    if (model_layout is None) != (ckpt_layout is None):
        return ("one side has hyper-connection residual streams and the other has none: "
                "model.num_residual_streams probably differs from the checkpoint's (1 vs > 1)")
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


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _check_dtype(path, key: str, dtype: torch.dtype, target: torch.Tensor) -> None:
    if dtype.is_floating_point != target.is_floating_point():
        raise CheckpointError(f"{path}: {key} has dtype {dtype}, the model's has {target.dtype}")


def _read_safetensors_into(path: Path, mapping: dict[str, str], targets: dict[str, torch.Tensor]) -> None:
    """Reads each tensor's bytes straight into the model's parameter memory when dtype and device
    allow (no second copy of the weights in memory, no mmap of the whole file); otherwise through a
    per-tensor temporary."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        for model_key, source_key in mapping.items():
            entry = header[source_key]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: {source_key} has unsupported dtype {entry['dtype']}")
            target = targets[model_key]
            _check_dtype(path, model_key, dtype, target)
            begin, end = entry["data_offsets"]
            f.seek(data_start + begin)
            direct = (target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous()
                      and target.numel() * target.element_size() == end - begin)
            if direct:
                buffer = target.detach().reshape(-1).view(torch.uint8).numpy()
                read = f.readinto(memoryview(buffer))
                if read != end - begin:
                    raise CheckpointError(f"{path}: truncated data for {source_key}")
            else:
                raw = bytearray(end - begin)
                if f.readinto(raw) != end - begin:
                    raise CheckpointError(f"{path}: truncated data for {source_key}")
                value = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry["shape"])
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
            if source.path.suffix == ".safetensors":
                _read_safetensors_into(source.path, source.mapping, targets)
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
        return LoadReport(str(source.path), len(source.mapping), dict(source.metadata), recorded,
                          installed_versions(), differences)


# -- writing ---------------------------------------------------------------------------------------
def train_state_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".train_state.pt")


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, config: Any, trainer_kind: str, step: int,
                    model_sizes: Mapping[str, int] | None = None, train_state: Mapping[str, Any] | None = None) -> Path:
    """Writes `path` (.safetensors) and, when given, `train_state` beside it.

    Args:
        path: target file; must end in `.safetensors`.
        model: the bare model (unwrap DDP / compile first; prefixes are refused).
        config: the run config (OmegaConf or plain dict), stored as JSON.
        trainer_kind: "stable" or "cycle".
        step: global step.
        model_sizes: vocab_size, latent_dim, cluster_size (read from the model when omitted).
        train_state: optimizer state, RNG states and anything else needed to resume.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    prefixed = [k for k in state if normalize_key(k) != k]
    if prefixed:
        raise ValueError(f"save the bare model, not a wrapper: keys {prefixed[:3]} carry a wrapper prefix")
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    if train_state is not None:
        tmp_state = train_state_path(path).with_suffix(".tmp")
        torch.save(dict(train_state), str(tmp_state))
        tmp_state.replace(train_state_path(path))
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    state_path = train_state_path(path)
    if not state_path.is_file():
        raise CheckpointError(f"resume needs {state_path} beside {path}; it does not exist")
    return torch.load(str(state_path), map_location="cpu", weights_only=True)


def model_sizes_from(path: str | Path) -> dict[str, int] | None:
    """vocab_size / latent_dim / cluster_size recorded in a checkpoint of this format, else None."""
    with open_checkpoint(path) as source:
        sizes = source.metadata.get("model_sizes")
        return dict(sizes) if isinstance(sizes, dict) else None
