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

Config keys read by the loop: training.{seed, dtype, mixed_precision, compile_model, compile_backend,
train_batch_size, num_train_steps, gradient_accumulation_steps, lr_schedule, warmup_steps,
ddp_timeout_minutes}, optimizer.{name, lr, weight_decay, beta1, beta2, eps, grad_clip_norm},
data.{token_dir, latent_dir, num_workers, synthetic_seq_len, synthetic_num_samples},
logging.{run_name, log_dir, log_every, save_every}, loss.on_nonfinite (`LOOP_KEYS`); the model,
tokenizer and loss sections are read by the factory and the trainers.

The package, one module per concern of the loop (each imports only those above it):
`loop_settings` (the typed settings read once from the validated config, the LR schedule),
`distributed` (process group, DDP), `dataloader` (dataset, `BatchOrder`, `BatchFeed`), `run_dir`
(metrics.jsonl, published checkpoints, readying the directory), `checkpointing` (save, resume),
`step` (one optimizer step, `StepRunner`), `loop` (`run_training`), `cli` (the entry points' main).
This module is their interface.
"""

from latentDLM_mmdit.training.checkpointing import TRAIN_STATE_FORMAT, Resumable
from latentDLM_mmdit.training.cli import USER_ERRORS, build_parser, cli_main
from latentDLM_mmdit.training.dataloader import (
    DATA_ORDER_SEED_OFFSET,
    LOADER_SEED_OFFSET,
    SYNTHETIC_DATA_SEED_OFFSET,
    BatchFeed,
    BatchOrder,
    build_dataset,
)
from latentDLM_mmdit.training.distributed import (
    DIST_TIMEOUT,
    DistContext,
    bare_model,
    init_distributed,
    wrap_model_for_ddp,
)
from latentDLM_mmdit.training.loop import RunRequest, TrainerEntry, TrainResult, build_trainer, run_training
from latentDLM_mmdit.training.loop_settings import (
    LOOP_KEYS,
    LOOP_REQUIRED,
    LoopSettings,
    TrainingError,
    build_lr_scheduler,
    learning_rate,
    validated_config,
)
from latentDLM_mmdit.training.run_dir import (
    ABANDONED_DIR,
    CHECKPOINT_DIR,
    METRICS_NAME,
    metrics_line,
    prepare_output_dir,
    published_checkpoints,
)
from latentDLM_mmdit.training.step import Severity, StepProblem, StepRunner

__all__ = [
    "ABANDONED_DIR",
    "CHECKPOINT_DIR",
    "DATA_ORDER_SEED_OFFSET",
    "DIST_TIMEOUT",
    "LOADER_SEED_OFFSET",
    "LOOP_KEYS",
    "LOOP_REQUIRED",
    "METRICS_NAME",
    "SYNTHETIC_DATA_SEED_OFFSET",
    "TRAIN_STATE_FORMAT",
    "USER_ERRORS",
    "BatchFeed",
    "BatchOrder",
    "DistContext",
    "LoopSettings",
    "Resumable",
    "RunRequest",
    "Severity",
    "StepProblem",
    "StepRunner",
    "TrainResult",
    "TrainerEntry",
    "TrainingError",
    "bare_model",
    "build_dataset",
    "build_lr_scheduler",
    "build_parser",
    "build_trainer",
    "cli_main",
    "init_distributed",
    "learning_rate",
    "metrics_line",
    "prepare_output_dir",
    "published_checkpoints",
    "run_training",
    "validated_config",
    "wrap_model_for_ddp",
]
