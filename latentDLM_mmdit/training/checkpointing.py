"""Save and resume: a checkpoint of the loop is the bare model's weights plus a train state (the
optimizer, the loss scaler, the LR scheduler, the data order, every rank's RNG states, the step),
published as a pair by `latentDLM_mmdit.checkpoints.save_checkpoint`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from latentDLM_mmdit.checkpoints import load_train_state, open_checkpoint, save_checkpoint
from latentDLM_mmdit.precision import LossScaler
from latentDLM_mmdit.seeding import rng_state, set_rng_state
from latentDLM_mmdit.training.dataloader import BatchOrder
from latentDLM_mmdit.training.distributed import DistContext, bare_model
from latentDLM_mmdit.training.loop_settings import LoopSettings, TrainingError
from latentDLM_mmdit.training.run_dir import CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# /2: the train state carries skipped_nonfinite_steps and pairs with its weights by pair_id.
TRAIN_STATE_FORMAT = "mmdit-compat-train/2"


@dataclass
class Resumable:
    """What a checkpoint of a run holds besides its step: the model's weights and the train state's
    parts, and what names the run (its config, its trainer's kind)."""

    model: nn.Module
    trainer: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: LossScaler
    order: BatchOrder
    config: DictConfig
    trainer_kind: str


def save_train_checkpoint(
    output_dir: Path, run: Resumable, step: int, skipped_nonfinite_steps: int, dist_ctx: DistContext
) -> Path | None:
    """Writes `<output_dir>/checkpoints/step_<step>.safetensors` and its train state (rank 0; every
    rank gives its RNG states); returns the weights file on rank 0, else None."""
    local = {"rng": rng_state(), "trainer_generator": run.trainer.generator.get_state()}
    if dist_ctx.distributed:
        ranks: list[Any] = [None] * dist_ctx.world_size
        dist.all_gather_object(ranks, local)
    else:
        ranks = [local]
    path = None
    if dist_ctx.is_main:
        path = output_dir / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"
        train_state = {
            "format": TRAIN_STATE_FORMAT,
            "trainer_kind": run.trainer_kind,
            "step": step,
            "world_size": dist_ctx.world_size,
            "optimizer": run.optimizer.state_dict(),
            "grad_scaler": run.scaler.state_dict(),
            "data_order": run.order.state_dict(),
            "lr_scheduler": run.scheduler.state_dict(),
            "ranks": ranks,
            "skipped_nonfinite_steps": skipped_nonfinite_steps,
        }
        save_checkpoint(
            path,
            bare_model(run.model),
            config=run.config,
            trainer_kind=run.trainer_kind,
            step=step,
            train_state=train_state,
        )
        logger.info("checkpoint %s", path)
    if dist_ctx.distributed:
        dist.barrier()
    return path


def read_resume_state(resume, trainer_kind: str, dist_ctx: DistContext, config: DictConfig) -> dict[str, Any]:
    """The train state of the checkpoint `resume`, refused (TrainingError) when another trainer,
    another format or another number of processes wrote it; a config that differs is logged."""
    with open_checkpoint(resume) as source:
        metadata = dict(source.metadata)
    recorded_kind = metadata.get("trainer_kind")
    if recorded_kind is not None and recorded_kind != trainer_kind:
        raise TrainingError(
            f"{resume} was written by the {recorded_kind} trainer; resume it with that trainer's "
            f"entry point, or start the {trainer_kind} trainer from it with --init-from"
        )
    state = load_train_state(resume)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise TrainingError(
            f"{resume}: its train state has format {state.get('format')!r}, expected "
            f"{TRAIN_STATE_FORMAT!r} (written by this version of the training loop); start from "
            "its weights with --init-from instead"
        )
    if state["trainer_kind"] != trainer_kind:
        raise TrainingError(
            f"{resume} was written by the {state['trainer_kind']} trainer, this is the {trainer_kind} trainer"
        )
    if state["world_size"] != dist_ctx.world_size:
        raise TrainingError(
            f"{resume} was written by {state['world_size']} process(es), this run has "
            f"{dist_ctx.world_size}; resume with the same number of processes"
        )
    differences = _config_differences(config, metadata.get("config"))
    if differences:
        logger.warning("resuming %s with a config that differs from its own in: %s", resume, ", ".join(differences))
    return state


def restore(
    run: Resumable, state: Mapping[str, Any], resume, settings: LoopSettings, dist_ctx: DistContext
) -> tuple[int, int]:
    """Puts the train state `state` of the checkpoint `resume` into `run` (the model's weights are
    loaded already): optimizer, loss scaler, data order, LR scheduler, this rank's RNG states.
    Returns (the step, the skipped non-finite steps so far)."""
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler.enabled and not state.get("grad_scaler"):
        raise TrainingError(
            f"{resume}: its train state has no fp16 loss-scaler state (saved without "
            "training.mixed_precision=fp16); resume with the mixed precision it was trained in"
        )
    run.scaler.load_state_dict(state.get("grad_scaler") or {})
    run.order.load_state_dict(state["data_order"])
    _load_scheduler_state(run.scheduler, state, resume, settings)
    rank_state = state["ranks"][dist_ctx.rank]
    set_rng_state(rank_state["rng"])
    run.trainer.generator.set_state(rank_state["trainer_generator"])
    return int(state["step"]), int(state["skipped_nonfinite_steps"])


def _load_scheduler_state(scheduler, state, resume, settings) -> None:
    """Restores the LR scheduler of a train state; it must be at the checkpoint's step with the
    config's optimizer.lr as its base."""
    if "lr_scheduler" not in state:
        raise TrainingError(
            f"{resume}: its train state has no lr_scheduler (written before the LR schedule "
            "was saved); continue from its weights with --init-from instead of --resume"
        )
    saved = state["lr_scheduler"]
    if saved["last_epoch"] != state["step"]:
        raise TrainingError(
            f"{resume}: its LR scheduler is at step {saved['last_epoch']}, the checkpoint at "
            f"step {state['step']}; the train state is inconsistent"
        )
    if list(saved["base_lrs"]) != [settings.lr] * len(scheduler.base_lrs):
        raise TrainingError(
            f"{resume} was trained with base learning rate {saved['base_lrs'][0]}, this run has "
            f"optimizer.lr={settings.lr}; resume with the same optimizer.lr (or start a new run "
            "from its weights with --init-from)"
        )
    scheduler.load_state_dict(saved)


def _config_differences(current: DictConfig, recorded: Any) -> list[str]:
    def flatten(node, prefix=""):
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                out.update(flatten(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    now = flatten(OmegaConf.to_container(current, resolve=True))
    then = flatten(recorded if isinstance(recorded, Mapping) else {})
    return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
