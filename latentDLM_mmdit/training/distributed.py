"""Distributed setup: the process group from torchrun's environment, DDP wrapping, and running a
rank-0 action so that every rank learns of its refusal."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from latentDLM_mmdit.checkpoints import CheckpointError
from latentDLM_mmdit.settings import TrainingSettings
from latentDLM_mmdit.training.loop_settings import TrainingError

DIST_TIMEOUT = timedelta(minutes=TrainingSettings.ddp_timeout_minutes)  # the schema's default


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    raise TrainingError(f"device {device!r}; valid: auto, cpu, cuda")


def init_distributed(device: str | None = None, timeout: timedelta = DIST_TIMEOUT) -> DistContext:
    """A DistContext from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); joins the process group (gloo on CPU, nccl on CUDA) unless one exists.

    Args:
        device: auto (CUDA when available), cpu or cuda.
        timeout: how long to wait for the peers, to join and in every collective
            (training.ddp_timeout_minutes in a run); a group that does not form in time is a TrainingError.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=_pick_device(device, 0))
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise TrainingError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; start with torchrun")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    target = _pick_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    initialized_here = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                "nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world_size, timeout=timeout
            )
        except dist.DistError as exc:
            raise TrainingError(
                f"rank {rank} of {world_size} could not form the process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout} "
                f"(training.ddp_timeout_minutes): {exc}; check that every rank started"
            ) from exc
        initialized_here = True
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise TrainingError(
            f"process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"environment says {rank} of {world_size}"
        )
    return DistContext(rank, world_size, local_rank, target, initialized_here)


def wrap_model_for_ddp(trainer: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wraps `trainer.model` in DDP in place and returns the wrapper.

    find_unused_parameters=True: the stable trainer freezes a parameter group per mode and the
    cycle trainer skips terms whose weight is 0, so the used parameters change between steps.
    Call before the first step, while every parameter still requires grad."""
    model = trainer.model
    if isinstance(model, DistributedDataParallel):
        raise ValueError("trainer.model is already wrapped in DistributedDataParallel")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"wrap before freezing: DDP would never synchronise {frozen[:3]}")
    kwargs: dict[str, Any] = {"find_unused_parameters": True}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    wrapped = DistributedDataParallel(model, **kwargs)
    trainer.model = wrapped
    return wrapped


def bare_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def on_main_then_share(dist_ctx: DistContext, action) -> None:
    """Runs `action` on rank 0; a refusal there (TrainingError, CheckpointError, OSError) is raised
    on every rank, so that no rank goes on to wait for the others in a collective."""
    error = None
    if dist_ctx.is_main:
        try:
            action()
        except (TrainingError, CheckpointError, OSError) as exc:
            error = exc
    if dist_ctx.distributed:
        shared = [None if error is None else one_line(error)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            raise TrainingError(f"rank 0 refused to start: {shared[0]}")
    if error is not None:
        raise error


def one_line(exc: BaseException) -> str:
    """An error's message on one line (its lines joined with "; ")."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
