"""The run: `run_training` builds the model (seeded), loads a pretrained checkpoint or resumes a run,
builds the trainer, and steps it (`step.StepRunner`) to the end of the schedule, writing metrics
and checkpoints. See the package docstring for the whole contract."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from latentDLM_mmdit.checkpoints import load_checkpoint_into
from latentDLM_mmdit.factory import build_model, build_text_side, dtype_from_config
from latentDLM_mmdit.precision import LossScaler
from latentDLM_mmdit.seeding import seed_everything
from latentDLM_mmdit.trainer_base import config_for
from latentDLM_mmdit.training.checkpointing import Resumable, read_resume_state, restore, save_train_checkpoint
from latentDLM_mmdit.training.dataloader import (
    DATA_ORDER_SEED_OFFSET,
    LOADER_SEED_OFFSET,
    BatchFeed,
    BatchOrder,
    build_dataset,
)
import latentDLM_mmdit.training.distributed as distributed
from latentDLM_mmdit.training.distributed import DistContext, init_distributed, on_main_then_share
from latentDLM_mmdit.training.loop_settings import LoopSettings, TrainingError, build_lr_scheduler, validated_config
from latentDLM_mmdit.training.run_dir import METRICS_NAME, metrics_line, prepare_output_dir
from latentDLM_mmdit.training.step import StepRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerEntry:
    """What an entry point hands the shared loop: the trainer class and how to name it.

    Args:
        kind: the trainer's name, written into checkpoints ("stable", "cycle"); resume checks it.
        trainer_cls: built as upstream builds it: trainer_cls(model, vocab, MaskedDiffusion(vocab), dtype, config).
        default_config: the packaged YAML the entry point uses without --config.
        module: the entry point's module (`python -m <module>`), for --help.
        description: what it trains, for --help.
    """

    kind: str
    trainer_cls: type
    default_config: Path
    module: str
    description: str


def build_trainer(config: DictConfig, trainer_cls: type, model: nn.Module) -> nn.Module:
    """`trainer_cls` over `model`, as upstream builds it: Trainer(model, vocab, MaskedDiffusion(vocab), dtype, config)."""
    vocab, text_noise = build_text_side(config)
    return trainer_cls(model, vocab, text_noise, dtype_from_config(config), config_for(trainer_cls, config))


@dataclass
class TrainResult:
    """What a run wrote and measured (every rank returns one; only rank 0 writes files)."""

    output_dir: Path
    metrics_path: Path
    checkpoints: list[Path]
    metrics: list[dict[str, Any]]
    final_step: int


@dataclass(frozen=True)
class RunRequest:
    """What a caller asks of one run besides its config (see `run_training`'s arguments)."""

    output_dir: Path
    synthetic: bool
    token_dir: str | Path | None = None
    latent_dir: str | Path | None = None
    init_from: str | Path | None = None
    resume: str | Path | None = None
    progress: bool = True
    stop_at_step: int | None = None
    start_at_step: int = 0


# -- the loop --------------------------------------------------------------------------------------
def run_training(
    config: Any,
    *,
    trainer: TrainerEntry,
    output_dir: str | Path,
    synthetic: bool,
    token_dir: str | Path | None = None,
    latent_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    start_at_step: int = 0,
    device: str | None = None,
    dist_timeout: timedelta | None = None,
) -> TrainResult:
    """Trains the stable or the cycle trainer; see the module docstring.

    Args:
        config: the run config (OmegaConf or mapping); only read.
        trainer: the entry point's TrainerEntry (the reference's is `train_stable.STABLE`).
        output_dir: where metrics.jsonl, config.yaml and checkpoints/ go (rank 0).
        synthetic: train on seeded synthetic samples (data.synthetic_*).
        token_dir, latent_dir: upstream-format data (default: data.token_dir / data.latent_dir).
        init_from: a pretrained checkpoint to start from (strict load; any format `checkpoints` reads).
        resume: a checkpoint written by this loop to continue (model, optimizer, step, RNG, data order).
        progress: show a tqdm bar (only on a terminal, only on rank 0).
        stop_at_step: stop after this global step (the LR schedule still spans
            training.num_train_steps); a checkpoint is written there, to resume later.
        start_at_step: begin at this 0-based global step with a fresh optimizer state: the LR
            schedule and the trainer's step-dependent settings (cycle weight ramps) as at that step,
            the data order from its start. For examining a window of a long schedule from given
            weights (the compat trajectories row); not a resume (use `resume` for that).
        device: auto (CUDA when available), cpu or cuda.
        dist_timeout: timeout given to init_process_group under torchrun (None: the config's
            training.ddp_timeout_minutes).
    """
    if not isinstance(trainer, TrainerEntry):
        raise TypeError(f"trainer must be a TrainerEntry, got {type(trainer).__name__}")
    if init_from is not None and resume is not None:
        raise TrainingError("pass --init-from (start from pretrained weights) or --resume (continue a run), not both")
    if stop_at_step is not None and stop_at_step < 1:
        raise TrainingError(f"stop_at_step={stop_at_step}: must be >= 1")
    if start_at_step < 0 or (start_at_step and resume is not None):
        raise TrainingError(
            f"start_at_step={start_at_step}: must be >= 0, and 0 when resuming (the run's step is kept)"
        )
    config = validated_config(config)
    settings = LoopSettings.from_settings(config)
    request = RunRequest(
        Path(output_dir), synthetic, token_dir, latent_dir, init_from, resume, progress, stop_at_step, start_at_step
    )
    dist_ctx = init_distributed(device, settings.ddp_timeout if dist_timeout is None else dist_timeout)
    try:
        return _train(config, settings, dist_ctx, trainer, request)
    except BaseException as exc:
        # Free the loop's objects (the DDP module and its reducer, the loaders) now, while the process
        # group exists: kept alive by the traceback, they were freed after destroy_process_group
        # below, where a DDP module's teardown could block in gloo (a run stopped by
        # loss.on_nonfinite=raise then hung on one rank instead of exiting). The traceback still prints.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if dist_ctx.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: DictConfig, settings: LoopSettings, dist_ctx: DistContext, entry: TrainerEntry, request: RunRequest
) -> TrainResult:
    output_dir, resume = request.output_dir, request.resume
    metrics_path = output_dir / METRICS_NAME
    resume_state = None
    if resume is not None:
        resume_state = read_resume_state(resume, entry.kind, dist_ctx, config)
    on_main_then_share(
        dist_ctx,
        lambda: prepare_output_dir(
            output_dir,
            None if resume is None else Path(resume),
            None if resume_state is None else int(resume_state["step"]),
        ),
    )

    # Model: every RNG seeded first (the residual-stream init draws from Python's `random`).
    seed_everything(settings.seed)
    try:
        model = build_model(config)
    except ValueError as exc:
        raise TrainingError(f"cannot build the model from the config: {exc}") from exc
    if request.init_from is not None:
        report = load_checkpoint_into(model, request.init_from)
        logger.info("initialised from %s (%d tensors)", report.path, report.n_tensors)
    if resume is not None:
        load_checkpoint_into(model, resume)
    try:
        trainer = build_trainer(config, entry.trainer_cls, model)
    except ValueError as exc:
        raise TrainingError(f"cannot build the {entry.kind} trainer from the config: {exc}") from exc
    trainer.generator.manual_seed(settings.seed + dist_ctx.rank)
    dataset, data_description = build_dataset(
        config, settings, synthetic=request.synthetic, token_dir=request.token_dir, latent_dir=request.latent_dir
    )
    order = BatchOrder(
        len(dataset), settings.batch_size, dist_ctx.world_size, dist_ctx.rank, settings.seed + DATA_ORDER_SEED_OFFSET
    )
    feed = BatchFeed(
        dataset,
        order,
        num_workers=settings.num_workers,
        device=dist_ctx.device,
        seed=settings.seed + LOADER_SEED_OFFSET + dist_ctx.rank,
    )
    model.to(dist_ctx.device)
    trainer.to(dist_ctx.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    run = Resumable(
        model,
        trainer,
        optimizer,
        build_lr_scheduler(optimizer, settings, start_step=request.start_at_step),
        LossScaler(settings.mixed_precision, dist_ctx.device),
        order,
        config,
        entry.kind,
    )
    # Per-rank global streams (dropout) from here on.
    seed_everything(settings.seed + dist_ctx.rank)
    step = request.start_at_step
    skipped_nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (loss.on_nonfinite)
    if resume_state is not None:
        step, skipped_nonfinite_steps = restore(run, resume_state, resume, settings, dist_ctx)
    ddp = distributed.wrap_model_for_ddp(trainer, dist_ctx.device) if dist_ctx.distributed else None
    # The step as the cluster runs it: compiled (over the DDP-wrapped model) when the config says so.
    run_step = trainer if settings.compile_backend is None else torch.compile(trainer, backend=settings.compile_backend)
    runner = StepRunner(trainer, run_step, optimizer, run.scheduler, run.scaler, feed, settings, dist_ctx, ddp)

    end = (
        settings.num_train_steps
        if request.stop_at_step is None
        else min(request.stop_at_step, settings.num_train_steps)
    )
    if step >= end:
        raise TrainingError(
            f"the checkpoint is at step {step}; nothing to do up to step {end} (raise training.num_train_steps)"
        )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s trainer: %d parameters on %s, %d process(es), data: %s, steps %d -> %d",
        entry.kind,
        n_params,
        dist_ctx.device,
        dist_ctx.world_size,
        data_description,
        step,
        end,
    )

    checkpoints: list[Path] = []
    history: list[dict[str, Any]] = []
    metrics_file = None
    if dist_ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, output_dir / "config.yaml")
        metrics_file = open(metrics_path, "a", encoding="utf-8")  # truncated to the resumed step above
    show_bar = request.progress and dist_ctx.is_main and sys.stderr.isatty()
    from tqdm import tqdm  # not at import: tqdm loads its own modules (a run's dependency only)
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=settings.num_train_steps, initial=step, disable=not show_bar, desc=entry.kind, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm() if show_bar else contextlib.nullcontext():
            while step < end:
                record = runner.run(step)
                step += 1
                if "skipped" in record:
                    skipped_nonfinite_steps += 1
                    if dist_ctx.is_main:
                        logger.warning(
                            "step %d: optimizer step skipped (%s; loss.on_nonfinite=upstream); %d "
                            "step(s) skipped so far",
                            step,
                            record["skipped"],
                            skipped_nonfinite_steps,
                        )
                record = {"step": step, **record, "skipped_nonfinite_steps": skipped_nonfinite_steps}
                history.append(record)
                if metrics_file is not None:
                    metrics_file.write(metrics_line(record) + "\n")
                    metrics_file.flush()
                if step % settings.log_every == 0 or step == end:
                    logger.info(
                        "step %d: %s",
                        step,
                        ", ".join(
                            f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items()
                            if k != "step"
                        ),
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step % settings.save_every == 0 or step == end:
                    if metrics_file is not None:  # the metrics up to a checkpoint are as durable as it is
                        os.fsync(metrics_file.fileno())
                    path = save_train_checkpoint(output_dir, run, step, skipped_nonfinite_steps, dist_ctx)
                    if path is not None:
                        checkpoints.append(path)
    finally:
        feed.close()
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if ddp is not None:
            trainer.model = ddp.module
    return TrainResult(output_dir, metrics_path, checkpoints, history, step)
