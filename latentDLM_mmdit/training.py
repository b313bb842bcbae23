"""The training loop shared by the stable and the cycle entry points.

`run_training(config, trainer=ENTRY, ...)` builds the model (`factory.build_model`, after
seeding every RNG from `training.seed`), optionally loads a pretrained checkpoint strictly
(`init_from`) or resumes a run of this loop (`resume`), builds the trainer
(`MultimodalDiffusionTrainer` or `CycleVAETrainer`), and runs AdamW with linear warmup and a
cosine (or constant) learning rate (a `LambdaLR` of `learning_rate`), gradient accumulation and
clipping. Batches come from a `torch.utils.data.DataLoader` (`data.num_workers` reader processes,
pinned memory on CUDA) over this rank's `BatchOrder` (`BatchFeed`). Every optimizer step
appends one JSON line to `<output_dir>/metrics.jsonl`; checkpoints (safetensors plus
`.train_state.pt` beside it) go to `<output_dir>/checkpoints/` every `logging.save_every` steps
and at the end.

Non-finite steps (`loss.on_nonfinite`): a micro-batch whose loss is non-finite or a constant
without a graph (the trainers' replacement when every term is non-finite), or a non-finite gradient
norm, makes the step skipped under `upstream` (as upstream's training script skipped it: optimizer
not stepped, gradients cleared, the record's `skipped` says why, `skipped_nonfinite_steps` counts
them) and stops the run with a TrainingError naming the step and the term under `raise`.
metrics.jsonl is strict JSON: a non-finite value is written as null and named in `nonfinite_values`.

Checkpoints are published as pairs (see `checkpoints.save_checkpoint`): a weights file is visible
only once its train state is, and `load_train_state` refuses a train state of another save. At
every start, rank 0 removes what an interrupted save left; a resume into the run's own directory
keeps one history: the metrics lines and checkpoints after the resumed step move to
`abandoned/after_step_<N>/` (logged), and metrics.jsonl ends at the resumed step.

Determinism: a run resumed from the checkpoint of step k continues bit-exactly like the
uninterrupted run on CPU: the checkpoint holds the model, the optimizer state, the step, the global
RNG states (Python, NumPy, torch), the trainer's own generator, the LR scheduler and the data
order (the position of the batches consumed, not of those the loader's workers read ahead).

Under torchrun (WORLD_SIZE > 1) the trainer's model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA), every rank reads its own slice of each global batch (the data order is shared,
`training.train_batch_size` samples per rank), the trainer generator of rank r is seeded with
`training.seed + r`, and rank 0 writes the metrics and the checkpoints. A peer that does not join
or answer within `training.ddp_timeout_minutes` fails the run.

`training.compile_model: true` runs every step through `torch.compile(trainer, backend=
training.compile_backend)`, as upstream's script did; the checkpoints hold the bare model's names.

Config keys read here: training.{seed, dtype, mixed_precision, compile_model, compile_backend, train_batch_size, num_train_steps,
gradient_accumulation_steps, lr_schedule, warmup_steps, ddp_timeout_minutes}, optimizer.{name, lr,
weight_decay, beta1, beta2, eps, grad_clip_norm}, data.{token_dir, latent_dir, num_workers,
synthetic_seq_len, synthetic_num_samples}, logging.{run_name, log_dir, log_every, save_every}; the model, tokenizer
and loss sections are read by the factory and the trainers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.nn.parallel import DistributedDataParallel

from latentDLM_mmdit.checkpoints import (
    CheckpointError,
    load_checkpoint_into,
    load_train_state,
    open_checkpoint,
    remove_interrupted_saves,
    save_checkpoint,
    train_state_path,
)
from latentDLM_mmdit.config import ConfigError, resolve_config
from latentDLM_mmdit.data import DataError, SyntheticDataset, UpstreamLatentDataset, collate
from latentDLM_mmdit.draws import make_generator
from latentDLM_mmdit.precision import LossScaler, autocast
from latentDLM_mmdit.factory import build_model, build_text_side, dtype_from_config
from latentDLM_mmdit.seeding import rng_state, seed_everything, set_rng_state
from latentDLM_mmdit.settings import (  # noqa: F401
    LR_SCHEDULES,
    OPTIMIZERS,
    RunSettings,
    TrainingSettings,
    require,
    validate_settings,
)
from latentDLM_mmdit.tokenizer import apply_vocab, resolve_vocab

logger = logging.getLogger(__name__)

# /2: the train state carries skipped_nonfinite_steps and pairs with its weights by pair_id.
TRAIN_STATE_FORMAT = "mmdit-compat-train/2"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
ABANDONED_DIR = "abandoned"  # what a resume set aside: the abandoned run's later metrics and checkpoints
CHECKPOINT_FILE = re.compile(r"^step_(\d+)\.safetensors$")
DIST_TIMEOUT = timedelta(minutes=TrainingSettings.ddp_timeout_minutes)  # the schema's default
# Streams derived from training.seed, kept apart from the trainer generator (seed + rank).
DATA_ORDER_SEED_OFFSET = 1_000_003
SYNTHETIC_DATA_SEED_OFFSET = 2_000_003
LOADER_SEED_OFFSET = 3_000_017  # + rank: the DataLoader's generator (its workers' base seed)


class TrainingError(ValueError):
    """A run that cannot start or continue as asked (the message says why)."""


# -- settings --------------------------------------------------------------------------------------
LOOP_REQUIRED = ("training.train_batch_size", "training.num_train_steps", "optimizer.lr")
# Every config key the loop itself reads (`LoopSettings.from_config`); the trainers read the rest.
LOOP_KEYS = (
    "training.seed",
    "training.train_batch_size",
    "training.num_train_steps",
    "training.gradient_accumulation_steps",
    "training.lr_schedule",
    "training.warmup_steps",
    "training.ddp_timeout_minutes",
    "training.mixed_precision",
    "training.compile_model",
    "training.compile_backend",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
    "optimizer.grad_clip_norm",
    "data.token_dir",
    "data.latent_dir",
    "data.num_workers",
    "data.synthetic_seq_len",
    "data.synthetic_num_samples",
    "logging.run_name",
    "logging.log_dir",
    "logging.log_every",
    "logging.save_every",
    "loss.on_nonfinite",
)


def validated_config(config: Any) -> DictConfig:
    """`config` (a mapping or a DictConfig, only read) validated against the schema
    (`latentDLM_mmdit.settings`), with the vocabulary filled from `tokenizer.path` when the
    tokenizer section does not give it."""
    try:
        resolved = validate_settings(config, "the run config")
        if resolved.config.tokenizer.path:
            apply_vocab(resolved, resolve_vocab(resolved.config, owner="the run config"))
    except ConfigError as exc:
        raise TrainingError(str(exc)) from exc
    return resolved.config


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own settings, read once from the validated config (ranges are the schema's)."""

    seed: int
    batch_size: int
    num_train_steps: int
    grad_accum: int
    lr_schedule: str
    warmup_steps: int
    ddp_timeout: timedelta
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip_norm: float
    token_dir: str
    latent_dir: str
    num_workers: int
    synthetic_seq_len: int
    synthetic_num_samples: int
    run_name: str
    log_dir: str
    log_every: int
    save_every: int
    on_nonfinite: str
    mixed_precision: str = "no"
    compile_backend: str | None = None  # None: eager

    @classmethod
    def from_config(cls, config: Any) -> "LoopSettings":
        s: RunSettings = validated_config(config)
        try:
            require(s, LOOP_REQUIRED, "the training loop")
        except ConfigError as exc:
            raise TrainingError(str(exc)) from exc
        training, optimizer, data, log = s.training, s.optimizer, s.data, s.logging
        return cls(
            seed=training.seed,
            batch_size=training.train_batch_size,
            num_train_steps=training.num_train_steps,
            grad_accum=training.gradient_accumulation_steps,
            lr_schedule=training.lr_schedule,
            warmup_steps=training.warmup_steps,
            ddp_timeout=timedelta(minutes=training.ddp_timeout_minutes),
            lr=optimizer.lr,
            weight_decay=optimizer.weight_decay,
            betas=(optimizer.beta1, optimizer.beta2),
            eps=optimizer.eps,
            grad_clip_norm=optimizer.grad_clip_norm,
            token_dir=data.token_dir,
            latent_dir=data.latent_dir,
            num_workers=data.num_workers,
            synthetic_seq_len=data.synthetic_seq_len,
            synthetic_num_samples=data.synthetic_num_samples,
            run_name=log.run_name,
            log_dir=log.log_dir,
            log_every=log.log_every,
            save_every=log.save_every if log.save_every > 0 else training.num_train_steps,  # 0: the last only
            on_nonfinite=s.loss.on_nonfinite,
            mixed_precision=training.mixed_precision,
            compile_backend=training.compile_backend if training.compile_model else None,
        )


def learning_rate(step: int, settings: LoopSettings) -> float:
    """LR of the optimizer step with 0-based index `step`: linear warmup over `warmup_steps`
    ((step+1)/warmup of the base), then cosine decay reaching 0 at `num_train_steps` (or constant)."""
    base = settings.lr
    if step < settings.warmup_steps:
        return base * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return base
    span = max(1, settings.num_train_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, settings: LoopSettings, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving the optimizer step with 0-based index k the learning rate
    `learning_rate(k, settings)` (to the last bit or one unit in it: LambdaLR multiplies the base
    by a factor). Step it after every optimizer step; its state_dict goes into the train state.

    Args:
        optimizer: its param groups' `lr` must be `settings.lr` (the base the factor scales).
        settings: the loop's settings (lr, warmup_steps, lr_schedule, num_train_steps).
        start_step: the step the first optimizer step has (0, or a later point of the schedule).
    """

    def factor(step: int) -> float:
        return learning_rate(step, settings) / settings.lr

    if start_step:  # LambdaLR's own way to start later: the base LR recorded as initial_lr
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


# -- distributed -----------------------------------------------------------------------------------
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


# -- data order ------------------------------------------------------------------------------------
class BatchOrder:
    """Deterministic, resumable sample order shared by every rank.

    Each epoch is one permutation drawn from its own generator; the epoch is cut into global
    batches of `batch_size * world_size` (the remainder is dropped) and rank r takes the r-th
    slice of `batch_size` of each global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise TrainingError(
                f"the data has {num_samples} sample(s), fewer than one global batch of "
                f"{batch_size} x {world_size} process(es) = {global_batch}"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank = world_size, rank
        self.batches_per_epoch = num_samples // global_batch
        self.generator = make_generator(seed)
        self.epoch, self.position = 0, 0
        self.permutation: torch.Tensor | None = None

    def next_indices(self) -> list[int]:
        if self.permutation is None or self.position >= self.batches_per_epoch:
            if self.permutation is not None:
                self.epoch += 1
            self.permutation = torch.randperm(self.num_samples, generator=self.generator)
            self.position = 0
        start = self.position * self.batch_size * self.world_size + self.rank * self.batch_size
        self.position += 1
        return self.permutation[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "permutation": self.permutation,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_samples", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise TrainingError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                    f"this run {getattr(self, key)} (resume with the same data, "
                    "training.train_batch_size and number of processes)"
                )
        self.generator.set_state(state["generator"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.permutation = state["permutation"]

    def copy(self) -> BatchOrder:
        """An independent order at the same position (drawing from it leaves this one where it is)."""
        twin = BatchOrder(self.num_samples, self.batch_size, self.world_size, self.rank, seed=0)
        twin.load_state_dict(self.state_dict())
        return twin


class _OrderSampler(torch.utils.data.Sampler):
    """The DataLoader's sampler: the batches of a copy of `order` from its current position, endless."""

    def __init__(self, order: BatchOrder):
        self.order = order

    def __iter__(self) -> Iterator[list[int]]:
        twin = self.order.copy()
        while True:
            yield twin.next_indices()


@dataclass(frozen=True)
class _ReadFailure:
    """A DataError raised while a worker read a batch, carried to the training process as a value
    (the DataLoader would re-raise it with the worker's traceback inside the message)."""

    message: str


class _BatchReads(torch.utils.data.Dataset):
    """Index list -> the collated batch (`collate`) plus its `indices` [B]; a DataError becomes a _ReadFailure."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor] | _ReadFailure:
        try:
            batch = collate([self.dataset[i] for i in indices])
        except DataError as exc:
            return _ReadFailure(str(exc))
        return {**batch, "indices": torch.tensor(indices, dtype=torch.int64)}


def _as_read(batch: Any) -> Any:
    return batch


class BatchFeed:
    """This rank's batches in `order`, read by a `torch.utils.data.DataLoader`.

    The loader's sampler draws from a copy of `order`, so its workers may read ahead; `order` itself
    moves one batch per `next_batch()`, and its state is the position of the batches consumed:
    saving `order.state_dict()` and resuming from it continues with exactly the next batch, whatever
    the number of workers. Every batch's indices are checked against `order`.

    Args:
        dataset: map-style dataset of samples (`collate` stacks them).
        order: the rank's BatchOrder (moved by this feed).
        num_workers: reader processes (0: read in this process).
        device: batches are moved there; on CUDA they are read into pinned memory and copied
            asynchronously.
        seed: seeds the generator the DataLoader draws its workers' base seed from (never the global RNG).
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, order: BatchOrder, *, num_workers: int, device: torch.device, seed: int
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.order, self.num_workers, self.device = dataset, order, num_workers, device
        self.seed = seed
        self._batches: Iterator[Any] | None = None

    def _start(self) -> Iterator[Any]:
        loader = torch.utils.data.DataLoader(
            _BatchReads(self.dataset),
            batch_size=None,
            sampler=_OrderSampler(self.order),
            num_workers=self.num_workers,
            collate_fn=_as_read,
            pin_memory=self.device.type == "cuda",
            generator=make_generator(self.seed),
        )
        return iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch on the device: input_ids [B,S], attention_mask [B,S], latent [B,1,D]."""
        if self._batches is None:
            self._batches = self._start()
        read = next(self._batches)
        if isinstance(read, _ReadFailure):
            raise DataError(read.message)
        expected = self.order.next_indices()
        if read["indices"].tolist() != expected:
            raise RuntimeError(
                f"the data loader delivered samples {read['indices'].tolist()}, the data order "
                f"expects {expected} (a defect of BatchFeed)"
            )
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in read.items() if k != "indices"}

    def close(self) -> None:
        """Stops the reader processes (a later next_batch starts new ones at the current position)."""
        self._batches = None


# -- pieces ----------------------------------------------------------------------------------------
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
    return trainer_cls(model, vocab, text_noise, dtype_from_config(config), config)


def build_dataset(config: DictConfig, settings: LoopSettings, *, synthetic: bool, token_dir, latent_dir):
    vocab, _ = build_text_side(config)
    max_seq_len = int(config.model.max_seq_len)
    latent_dim = int(config.model.latent_dim)
    if synthetic:
        if token_dir is not None or latent_dir is not None:
            raise TrainingError("pass either synthetic data or token/latent directories, not both")
        if settings.synthetic_seq_len > max_seq_len:
            raise TrainingError(
                f"data.synthetic_seq_len={settings.synthetic_seq_len} exceeds model.max_seq_len={max_seq_len}"
            )
        return SyntheticDataset(
            vocab,
            settings.synthetic_num_samples,
            settings.synthetic_seq_len,
            latent_dim,
            settings.seed + SYNTHETIC_DATA_SEED_OFFSET,
        ), "synthetic"
    token_dir = token_dir if token_dir is not None else (settings.token_dir or None)
    latent_dir = latent_dir if latent_dir is not None else (settings.latent_dir or None)
    if token_dir is None or latent_dir is None:
        raise TrainingError(
            "no training data: pass --synthetic, or --data-tokens DIR and --data-latents DIR "
            "(or set data.token_dir and data.latent_dir)"
        )
    dataset = UpstreamLatentDataset(token_dir, latent_dir, max_seq_len, vocab)
    if dataset.latent_dim != latent_dim:
        raise TrainingError(
            f"latents in {latent_dir} have width {dataset.latent_dim}, model.latent_dim is {latent_dim}"
        )
    return dataset, f"{token_dir} + {latent_dir} ({len(dataset)} samples)"


def _merge_metrics(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Numbers averaged over the micro-batches, strings from the last one, lists united."""
    merged: dict[str, Any] = {}
    for key in parts[-1]:
        values = [p[key] for p in parts if key in p]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = sum(float(v) for v in values) / len(values)
        elif all(isinstance(v, list) for v in values):
            merged[key] = sorted({x for v in values for x in v})
        else:
            merged[key] = values[-1]
    for part in parts[:-1]:  # keys only an earlier micro-batch had (e.g. nonfinite)
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


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


@dataclass
class TrainResult:
    """What a run wrote and measured (every rank returns one; only rank 0 writes files)."""

    output_dir: Path
    metrics_path: Path
    checkpoints: list[Path]
    metrics: list[dict[str, Any]]
    final_step: int


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
    settings = LoopSettings.from_config(config)
    ctx = init_distributed(device, settings.ddp_timeout if dist_timeout is None else dist_timeout)
    try:
        return _train(
            config,
            settings,
            ctx,
            trainer,
            Path(output_dir),
            synthetic,
            token_dir,
            latent_dir,
            init_from,
            resume,
            progress,
            stop_at_step,
            start_at_step,
        )
    except BaseException as exc:
        # Free the loop's objects (the DDP module and its reducer, the loaders) now, while the process
        # group exists: kept alive by the traceback, they were freed after destroy_process_group
        # below, where a DDP module's teardown could block in gloo (a run stopped by
        # loss.on_nonfinite=raise then hung on one rank instead of exiting). The traceback still prints.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if ctx.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config,
    settings,
    ctx,
    entry,
    output_dir,
    synthetic,
    token_dir,
    latent_dir,
    init_from,
    resume,
    progress,
    stop_at_step,
    start_at_step=0,
) -> TrainResult:
    metrics_path = output_dir / METRICS_NAME
    resume_state = None
    if resume is not None:
        resume_state = _read_resume_state(resume, entry.kind, ctx, config)
    _on_main_then_share(
        ctx,
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
    if init_from is not None:
        report = load_checkpoint_into(model, init_from)
        logger.info("initialised from %s (%d tensors)", report.path, report.n_tensors)
    if resume is not None:
        load_checkpoint_into(model, resume)
    try:
        trainer = build_trainer(config, entry.trainer_cls, model)
    except ValueError as exc:
        raise TrainingError(f"cannot build the {entry.kind} trainer from the config: {exc}") from exc
    trainer.generator.manual_seed(settings.seed + ctx.rank)
    dataset, data_description = build_dataset(
        config, settings, synthetic=synthetic, token_dir=token_dir, latent_dir=latent_dir
    )
    order = BatchOrder(
        len(dataset), settings.batch_size, ctx.world_size, ctx.rank, settings.seed + DATA_ORDER_SEED_OFFSET
    )
    feed = BatchFeed(
        dataset,
        order,
        num_workers=settings.num_workers,
        device=ctx.device,
        seed=settings.seed + LOADER_SEED_OFFSET + ctx.rank,
    )
    model.to(ctx.device)
    trainer.to(ctx.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    scaler = LossScaler(settings.mixed_precision, ctx.device)
    scheduler = build_lr_scheduler(optimizer, settings, start_step=start_at_step)
    # Per-rank global streams (dropout) from here on.
    seed_everything(settings.seed + ctx.rank)
    step = start_at_step
    skipped_nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (loss.on_nonfinite)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler.enabled and not resume_state.get("grad_scaler"):
            raise TrainingError(
                f"{resume}: its train state has no fp16 loss-scaler state (saved without "
                "training.mixed_precision=fp16); resume with the mixed precision it was trained in"
            )
        scaler.load_state_dict(resume_state.get("grad_scaler") or {})
        order.load_state_dict(resume_state["data_order"])
        _load_scheduler_state(scheduler, resume_state, resume, settings)
        rank_state = resume_state["ranks"][ctx.rank]
        set_rng_state(rank_state["rng"])
        trainer.generator.set_state(rank_state["trainer_generator"])
        step = int(resume_state["step"])
        skipped_nonfinite_steps = int(resume_state["skipped_nonfinite_steps"])
    ddp = wrap_model_for_ddp(trainer, ctx.device) if ctx.distributed else None
    last_outputs = LastOutputs(ddp) if ddp is not None else None
    # The step as the cluster runs it: compiled (over the DDP-wrapped model) when the config says so.
    run_step = trainer if settings.compile_backend is None else torch.compile(trainer, backend=settings.compile_backend)

    end = settings.num_train_steps if stop_at_step is None else min(stop_at_step, settings.num_train_steps)
    if step >= end:
        raise TrainingError(
            f"the checkpoint is at step {step}; nothing to do up to step {end} (raise training.num_train_steps)"
        )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s trainer: %d parameters on %s, %d process(es), data: %s, steps %d -> %d",
        entry.kind,
        n_params,
        ctx.device,
        ctx.world_size,
        data_description,
        step,
        end,
    )

    checkpoints: list[Path] = []
    history: list[dict[str, Any]] = []
    metrics_file = None
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, output_dir / "config.yaml")
        metrics_file = open(metrics_path, "a", encoding="utf-8")  # truncated to the resumed step above
    show_bar = progress and ctx.is_main and sys.stderr.isatty()
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=settings.num_train_steps, initial=step, disable=not show_bar, desc=entry.kind, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm() if show_bar else contextlib.nullcontext():
            while step < end:
                record = _optimizer_step(
                    trainer,
                    optimizer,
                    scheduler,
                    ddp,
                    feed,
                    settings,
                    step,
                    ctx,
                    scaler,
                    last_outputs,
                    run_step=run_step,
                )
                step += 1
                if "skipped" in record:
                    skipped_nonfinite_steps += 1
                    if ctx.is_main:
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
                    path = _save(
                        output_dir,
                        model,
                        trainer,
                        optimizer,
                        order,
                        config,
                        entry.kind,
                        step,
                        ctx,
                        skipped_nonfinite_steps,
                        scaler,
                        lr_scheduler=scheduler,
                    )
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


SKIP, STOP = 1, 2  # what a rank found wrong with a step, in increasing severity (agreed with MAX across ranks)


@dataclass(frozen=True)
class StepProblem:
    """Why an optimizer step cannot be taken: `severity` SKIP (loss.on_nonfinite=upstream skips the
    step, as upstream's training script did) or STOP (the run ends with an error); `what` says why."""

    severity: int
    what: str


def _loss_problem(
    loss: torch.Tensor | None, metrics: Mapping[str, Any], error: str | None, policy: str
) -> StepProblem | None:
    """What is wrong with one micro-batch's loss (`error`: the trainer's FloatingPointError), or None."""
    nonfinite = SKIP if policy == "upstream" else STOP
    if error is not None:
        return StepProblem(STOP, error)
    if not bool(torch.isfinite(loss.detach()).all()):
        return StepProblem(nonfinite, f"non-finite loss {float(loss.detach())}")
    if not loss.requires_grad:
        terms = metrics.get("nonfinite")
        if not terms:
            return StepProblem(
                STOP,
                "the trainer returned a loss without a graph and reported no non-finite term "
                "(nothing to train on; a trainer defect)",
            )
        return StepProblem(
            nonfinite,
            f"every loss term non-finite ({', '.join(terms)}); the trainer returned a "
            f"constant loss {float(loss.detach()):.6g} without a graph",
        )
    return None


def _agree(problem: StepProblem | None, ctx: DistContext) -> StepProblem | None:
    """Every rank's worst problem (one all-reduce), so that all ranks skip or stop together."""
    flag = torch.tensor([0 if problem is None else problem.severity], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    worst = int(flag.item())
    if worst == 0 or (problem is not None and problem.severity == worst):
        return problem
    return StepProblem(worst, "another rank's loss was unusable (see that rank's log)")


def _grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """The total 2-norm of the gradients, clipping them to `clip` when it is > 0 (torch's clip_grad_norm_)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))


class LastOutputs:
    """The outputs of the DDP module's latest forward (kept by a forward hook, dropped after each
    step): a step skipped after a synchronised forward still runs the backward DDP's reducer
    expects (a zero loss on these outputs, on every rank), else the next step fails in DDP."""

    def __init__(self, ddp: DistributedDataParallel):
        self.outputs: Any = None
        ddp.register_forward_hook(self._keep)

    def _keep(self, module, inputs, outputs) -> None:
        self.outputs = outputs

    def zero_backward(self) -> None:
        outputs = self.outputs if isinstance(self.outputs, (tuple, list)) else (self.outputs,)
        tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.backward(sum(t.sum() * 0.0 for t in tensors))


def _optimizer_step(
    trainer,
    optimizer,
    scheduler,
    ddp,
    feed,
    settings,
    step,
    ctx,
    scaler: LossScaler,
    last_outputs: LastOutputs | None = None,
    *,
    run_step,
) -> dict[str, Any]:
    """One optimizer step over `settings.grad_accum` micro-batches; returns its metrics record.
    `run_step` is what each micro-batch calls: the trainer or its compiled form.

    A micro-batch whose loss is non-finite, or a constant without a graph (the trainers' replacement
    when every term is non-finite), or a non-finite gradient norm: under loss.on_nonfinite=upstream
    the optimizer is not stepped and the gradients are cleared (the record gets `skipped`); under
    raise a TrainingError names the step and the term. Every rank runs every micro-batch's forward
    (DDP's forward is collective) and the ranks agree before the synchronised backward."""
    if scheduler.last_epoch != step:
        raise RuntimeError(f"the LR scheduler is at step {scheduler.last_epoch}, the loop at {step}")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    parts = []
    problem = None
    for micro in range(settings.grad_accum):
        batch = feed.next_batch()
        last = micro == settings.grad_accum - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            loss, metrics, error = None, {}, None
            try:
                with autocast(settings.mixed_precision, ctx.device):
                    loss, metrics = run_step(batch, step=step)
            except FloatingPointError as exc:  # the trainer's own check under loss.on_nonfinite=raise
                error = str(exc)
            parts.append(metrics)
            problem = problem or _loss_problem(loss, metrics, error, settings.on_nonfinite)
            if last and ctx.distributed:
                problem = _agree(problem, ctx)
            if problem is None:
                scaler.scale(loss / settings.grad_accum).backward()
            elif last and last_outputs is not None and problem.severity == SKIP:
                last_outputs.zero_backward()  # gradients discarded below
    if last_outputs is not None:
        last_outputs.outputs = None
    grad_norm = None
    if problem is None:
        params = [p for p in bare_model(trainer.model).parameters() if p.grad is not None]
        if params:
            scaler.unscale_(optimizer)  # fp16: clip (and log) the true gradients
            norm = _grad_norm(params, settings.grad_clip_norm)
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):  # the same on every rank: DDP averaged the gradients
                problem = StepProblem(
                    SKIP if settings.on_nonfinite == "upstream" else STOP, f"non-finite gradient norm {grad_norm}"
                )
    if problem is not None and problem.severity == STOP:
        raise TrainingError(
            f"step {step + 1}: {problem.what}; stopped by loss.on_nonfinite={settings.on_nonfinite} "
            "(the last checkpoint can be resumed; loss.on_nonfinite=upstream skips such steps as "
            "upstream's training script did)"
        )
    stepped = False
    if problem is None:
        stepped = scaler.step(optimizer)  # fp16: the scaler itself skips a step with inf/NaN gradients
    else:
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # a skipped step still advances the schedule (the step index moves on)
    record = _merge_metrics(parts)
    if ctx.distributed:  # the logged loss is the mean over ranks; other metrics are this rank's
        loss_mean = torch.tensor([record["loss"]], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(loss_mean)
        record["loss"] = float(loss_mean.item()) / ctx.world_size
    record["lr"] = lr
    if scaler.enabled:
        record["amp_skipped"] = int(not stepped)
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    if problem is not None:
        record["skipped"] = problem.what
    return record


def metrics_line(record: Mapping[str, Any]) -> str:
    """`record` as one line of strict JSON: a non-finite float is written as null, and
    `nonfinite_values` maps its key (dotted / indexed when nested) to "nan", "inf" or "-inf"."""
    flagged: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            flagged[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, Mapping):
            return {k: clean(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    line = {k: clean(v, str(k)) for k, v in record.items()}
    if flagged:
        line["nonfinite_values"] = flagged
    return json.dumps(line, allow_nan=False)


def _save(
    output_dir,
    model,
    trainer,
    optimizer,
    order,
    config,
    trainer_kind,
    step,
    ctx,
    skipped_nonfinite_steps,
    scaler,
    *,
    lr_scheduler,
) -> Path | None:
    local = {"rng": rng_state(), "trainer_generator": trainer.generator.get_state()}
    if ctx.distributed:
        ranks: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(ranks, local)
    else:
        ranks = [local]
    path = None
    if ctx.is_main:
        path = output_dir / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"
        train_state = {
            "format": TRAIN_STATE_FORMAT,
            "trainer_kind": trainer_kind,
            "step": step,
            "world_size": ctx.world_size,
            "optimizer": optimizer.state_dict(),
            "grad_scaler": scaler.state_dict(),
            "data_order": order.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "ranks": ranks,
            "skipped_nonfinite_steps": skipped_nonfinite_steps,
        }
        save_checkpoint(
            path, bare_model(model), config=config, trainer_kind=trainer_kind, step=step, train_state=train_state
        )
        logger.info("checkpoint %s", path)
    if ctx.distributed:
        dist.barrier()
    return path


def _read_resume_state(resume, trainer_kind, ctx, config) -> dict[str, Any]:
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
    if state["world_size"] != ctx.world_size:
        raise TrainingError(
            f"{resume} was written by {state['world_size']} process(es), this run has "
            f"{ctx.world_size}; resume with the same number of processes"
        )
    differences = _config_differences(config, metadata.get("config"))
    if differences:
        logger.warning("resuming %s with a config that differs from its own in: %s", resume, ", ".join(differences))
    return state


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


# -- the output directory --------------------------------------------------------------------------
def _on_main_then_share(ctx: DistContext, action) -> None:
    """Runs `action` on rank 0; a refusal there (TrainingError, CheckpointError, OSError) is raised
    on every rank, so that no rank goes on to wait for the others in a collective."""
    error = None
    if ctx.is_main:
        try:
            action()
        except (TrainingError, CheckpointError, OSError) as exc:
            error = exc
    if ctx.distributed:
        shared = [None if error is None else _one_line(error)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            raise TrainingError(f"rank 0 refused to start: {shared[0]}")
    if error is not None:
        raise error


def published_checkpoints(directory: Path) -> dict[int, Path]:
    """{step: weights file} of the checkpoints this loop published in `directory`."""
    if not directory.is_dir():
        return {}
    found = {}
    for entry in directory.iterdir():
        match = CHECKPOINT_FILE.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def _metrics_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a record (cut by a kill)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _fresh_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first that does not exist, created."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def _write_durably(path: Path, text: str) -> None:
    """Replaces `path` by `text` atomically: a temporary, fsynced, renamed, the directory fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_output_dir(output_dir: Path, resume: Path | None, resume_step: int | None) -> Path | None:
    """Readies `output_dir` for a run (rank 0); returns the folder things were set aside in, if any.

    A fresh run (`resume` None) needs a directory without metrics.jsonl or checkpoints. A resume
    into a directory that holds a run needs a checkpoint of that run (in its checkpoints/). Then
    what interrupted saves left is removed (`remove_interrupted_saves`), and the history is made
    one again: the metrics lines after `resume_step` (and any line cut by a kill) and the
    checkpoints after it move to `abandoned/after_step_<N>[-n]/` (metrics.jsonl, checkpoints/),
    with a warning naming them; metrics.jsonl keeps the steps up to `resume_step`.
    """
    metrics_path, ckpt_dir = output_dir / METRICS_NAME, output_dir / CHECKPOINT_DIR
    published = published_checkpoints(ckpt_dir)
    held = ([METRICS_NAME] if metrics_path.exists() else []) + (
        [f"{len(published)} checkpoint(s) in {CHECKPOINT_DIR}/"] if published else []
    )
    if resume is None:
        if held:
            raise TrainingError(
                f"{output_dir} already holds a run ({', '.join(held)}); choose another output "
                "directory, or --resume one of its checkpoints"
            )
        remove_interrupted_saves(ckpt_dir)
        return None
    if held and resume.resolve().parent != ckpt_dir.resolve():
        raise TrainingError(
            f"{output_dir} holds another run ({', '.join(held)}) than the one {resume} belongs to; "
            f"resume into an empty output directory, or into the run of that checkpoint"
        )
    remove_interrupted_saves(ckpt_dir)
    later = [published[s] for s in sorted(published) if s > resume_step]
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True) if metrics_path.exists() else []
    steps = [_metrics_step(line) for line in lines]
    keep = [line for line, s in zip(lines, steps) if s is not None and s <= resume_step]
    dropped = [line for line, s in zip(lines, steps) if s is None or s > resume_step]
    if not later and not dropped:
        return None
    aside = _fresh_dir(output_dir / ABANDONED_DIR / f"after_step_{resume_step:08d}")
    if dropped:
        _write_durably(aside / METRICS_NAME, "".join(dropped))
    if later:
        (aside / CHECKPOINT_DIR).mkdir()
        for weights in later:  # the train state first: a weights file never stays without it
            state = train_state_path(weights)
            if state.exists():
                os.replace(state, aside / CHECKPOINT_DIR / state.name)
            os.replace(weights, aside / CHECKPOINT_DIR / weights.name)
    if dropped:
        _write_durably(metrics_path, "".join(keep))
    logger.warning(
        "resuming %s at step %d: the abandoned run's %d metrics line(s) after it and %d later "
        "checkpoint(s) (%s) were moved to %s",
        output_dir,
        resume_step,
        len(dropped),
        len(later),
        ", ".join(p.name for p in later) or "none",
        aside,
    )
    return aside


# -- command line ----------------------------------------------------------------------------------
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    TrainingError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    OmegaConfBaseException,
)


def build_parser(entry: TrainerEntry) -> argparse.ArgumentParser:
    module, what = entry.module, entry.description
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=f"Train {what}. Config overrides are positional key.path=value arguments, e.g. "
        "training.num_train_steps=100 optimizer.lr=5e-5 model.n_blocks=1; an unknown key or a "
        "value of the wrong type is an error.",
        epilog="Multi-process: torchrun --nproc_per_node=N -m " + module + " ... (gloo on CPU, nccl on CUDA).",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. training.num_train_steps=10 loss.cycle_text_weight=0.2",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML config, plain or upstream's Hydra format with a defaults list "
        f"(default: the packaged {entry.default_config.name})",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="local tokenizer folder (tokenizer.json, or vocab.txt with special_tokens_map.json / "
        "tokenizer_config.json) giving tokenizer.vocab_size, mask_token_id and pad_token_id; "
        "replaces tokenizer.path",
    )
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--synthetic", action="store_true", help="seeded synthetic samples (data.synthetic_*)")
    data.add_argument("--data-tokens", metavar="DIR", help="upstream token dir of <stem>_tokens.npz files")
    data.add_argument("--data-latents", metavar="DIR", help="upstream latent dir of <stem>.npy files")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from pretrained weights (strict load; .safetensors written here or an upstream .pt)",
    )
    start.add_argument("--resume", metavar="CKPT", help="continue a run from a checkpoint this loop wrote")
    parser.add_argument("--output-dir", metavar="DIR", help="default: <logging.log_dir>/<logging.run_name>")
    parser.add_argument(
        "--stop-at-step",
        type=int,
        metavar="N",
        help="stop after step N (the LR schedule still spans training.num_train_steps)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def cli_main(entry: TrainerEntry, argv: Sequence[str] | None = None) -> int:
    """The entry points' main: parses arguments, trains, prints a summary. Returns the exit code."""
    parser = build_parser(entry)
    args = parser.parse_args(argv)
    if args.synthetic and (args.data_tokens or args.data_latents):
        parser.error("--synthetic and --data-tokens / --data-latents exclude each other")
    if bool(args.data_tokens) != bool(args.data_latents):
        parser.error("--data-tokens and --data-latents go together")
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config_path = args.config or entry.default_config
        resolved = resolve_config(config_path, args.overrides, tokenizer_dir=args.tokenizer)
        if is_main:
            for line in resolved.summary():
                logger.info("config %s: %s", config_path, line)
        config = resolved.config
        output_dir = (
            Path(args.output_dir) if args.output_dir else Path(config.logging.log_dir) / config.logging.run_name
        )
        result = run_training(
            config,
            trainer=entry,
            output_dir=output_dir,
            synthetic=args.synthetic,
            token_dir=args.data_tokens,
            latent_dir=args.data_latents,
            init_from=args.init_from,
            resume=args.resume,
            progress=not args.no_progress,
            stop_at_step=args.stop_at_step,
            device=args.device,
        )
    except USER_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    if is_main:
        last = result.metrics[-1] if result.metrics else {}
        print(
            f"{entry.kind} trainer: step {result.final_step}, final loss {last.get('loss', float('nan')):.6g}; "
            f"metrics {result.metrics_path}; "
            f"last checkpoint {result.checkpoints[-1] if result.checkpoints else 'none'}"
        )
    return 0
