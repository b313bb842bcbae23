"""Crash-safe saving: the weights (safetensors) and the train state published as a pair that
survives a kill at any point, and the cleanup of interrupted saves."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from latentDLM_mmdit.checkpoints.base import _human_bytes, CheckpointError, FORMAT, installed_versions, logger
from latentDLM_mmdit.checkpoints.keys import normalize_key
from latentDLM_mmdit.checkpoints.safetensors_header import read_safetensors_header


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
