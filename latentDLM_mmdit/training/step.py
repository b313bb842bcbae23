"""One optimizer step of the loop: `settings.grad_accum` micro-batches, non-finite handling
(`loss.on_nonfinite`), clipping, the optimizer and the LR schedule, and its metrics record."""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from latentDLM_mmdit.precision import LossScaler, autocast
from latentDLM_mmdit.training.dataloader import BatchFeed
from latentDLM_mmdit.training.distributed import DistContext, bare_model
from latentDLM_mmdit.training.loop_settings import LoopSettings, TrainingError


class Severity(enum.IntEnum):
    """What a rank found wrong with a step, in increasing severity (the ranks agree on the MAX)."""

    SKIP = 1  # loss.on_nonfinite=upstream: the step is skipped, as upstream's training script did
    STOP = 2  # the run ends with a TrainingError


@dataclass(frozen=True)
class StepProblem:
    """Why an optimizer step cannot be taken (`severity`), and what was wrong (`what`)."""

    severity: Severity
    what: str


def _nonfinite_severity(policy: str) -> Severity:
    return Severity.SKIP if policy == "upstream" else Severity.STOP


def _loss_problem(
    loss: torch.Tensor | None, metrics: Mapping[str, Any], error: str | None, policy: str
) -> StepProblem | None:
    """What is wrong with one micro-batch's loss (`error`: the trainer's FloatingPointError), or None."""
    nonfinite = _nonfinite_severity(policy)
    if error is not None:
        return StepProblem(Severity.STOP, error)
    if not bool(torch.isfinite(loss.detach()).all()):
        return StepProblem(nonfinite, f"non-finite loss {float(loss.detach())}")
    if not loss.requires_grad:
        terms = metrics.get("nonfinite")
        if not terms:
            return StepProblem(
                Severity.STOP,
                "the trainer returned a loss without a graph and reported no non-finite term "
                "(nothing to train on; a trainer defect)",
            )
        return StepProblem(
            nonfinite,
            f"every loss term non-finite ({', '.join(terms)}); the trainer returned a "
            f"constant loss {float(loss.detach()):.6g} without a graph",
        )
    return None


def _agree(problem: StepProblem | None, dist_ctx: DistContext) -> StepProblem | None:
    """Every rank's worst problem (one all-reduce), so that all ranks skip or stop together."""
    flag = torch.tensor([0 if problem is None else int(problem.severity)], dtype=torch.int64, device=dist_ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    worst = int(flag.item())
    if worst == 0 or (problem is not None and problem.severity == worst):
        return problem
    return StepProblem(Severity(worst), "another rank's loss was unusable (see that rank's log)")


def _grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """The total 2-norm of the gradients, clipping them to `clip` when it is > 0 (torch's clip_grad_norm_)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))


def merge_metrics(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
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


@dataclass
class StepRunner:
    """What every optimizer step of a run works with; `run(step)` takes one.

    Args:
        trainer: the trainer (its `model` is DDP-wrapped under torchrun).
        run_step: what each micro-batch calls: the trainer or its compiled form.
        optimizer, scheduler, scaler: AdamW, its LambdaLR (at the loop's step) and the fp16 loss scaler.
        feed: this rank's batches.
        settings: the loop's settings (grad_accum, grad_clip_norm, on_nonfinite, mixed_precision).
        dist_ctx: this process's place in the run (rank, world size, device).
        ddp: the DDP wrapper of `trainer.model`, or None in a single process.
    """

    trainer: nn.Module
    run_step: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: LossScaler
    feed: BatchFeed
    settings: LoopSettings
    dist_ctx: DistContext
    ddp: DistributedDataParallel | None = None

    def __post_init__(self) -> None:
        self.last_outputs = LastOutputs(self.ddp) if self.ddp is not None else None

    def run(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` (0-based) over `settings.grad_accum` micro-batches; returns its
        metrics record.

        A micro-batch whose loss is non-finite, or a constant without a graph (the trainers'
        replacement when every term is non-finite), or a non-finite gradient norm: under
        loss.on_nonfinite=upstream the optimizer is not stepped and the gradients are cleared (the
        record gets `skipped`); under raise a TrainingError names the step and the term. Every rank
        runs every micro-batch's forward (DDP's forward is collective) and the ranks agree before
        the synchronised backward."""
        settings, optimizer, scaler, dist_ctx = self.settings, self.optimizer, self.scaler, self.dist_ctx
        if self.scheduler.last_epoch != step:
            raise RuntimeError(f"the LR scheduler is at step {self.scheduler.last_epoch}, the loop at {step}")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        parts = []
        problem = None
        for micro in range(settings.grad_accum):
            batch = self.feed.next_batch()
            last = micro == settings.grad_accum - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                loss, metrics, error = None, {}, None
                try:
                    with autocast(settings.mixed_precision, dist_ctx.device):
                        loss, metrics = self.run_step(batch, step=step)
                except FloatingPointError as exc:  # the trainer's own check under loss.on_nonfinite=raise
                    error = str(exc)
                parts.append(metrics)
                problem = problem or _loss_problem(loss, metrics, error, settings.on_nonfinite)
                if last and dist_ctx.distributed:
                    problem = _agree(problem, dist_ctx)
                if problem is None:
                    scaler.scale(loss / settings.grad_accum).backward()
                elif last and self.last_outputs is not None and problem.severity == Severity.SKIP:
                    self.last_outputs.zero_backward()  # gradients discarded below
        if self.last_outputs is not None:
            self.last_outputs.outputs = None
        grad_norm = None
        if problem is None:
            params = [p for p in bare_model(self.trainer.model).parameters() if p.grad is not None]
            if params:
                scaler.unscale_(optimizer)  # fp16: clip (and log) the true gradients
                grad_norm = float(_grad_norm(params, settings.grad_clip_norm))
                if not math.isfinite(grad_norm):  # the same on every rank: DDP averaged the gradients
                    problem = StepProblem(
                        _nonfinite_severity(settings.on_nonfinite), f"non-finite gradient norm {grad_norm}"
                    )
        if problem is not None and problem.severity == Severity.STOP:
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
        self.scheduler.step()  # a skipped step still advances the schedule (the step index moves on)
        record = merge_metrics(parts)
        if dist_ctx.distributed:  # the logged loss is the mean over ranks; other metrics are this rank's
            loss_mean = torch.tensor([record["loss"]], dtype=torch.float64, device=dist_ctx.device)
            dist.all_reduce(loss_mean)
            record["loss"] = float(loss_mean.item()) / dist_ctx.world_size
        record["lr"] = lr
        if scaler.enabled:
            record["amp_skipped"] = int(not stepped)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if problem is not None:
            record["skipped"] = problem.what
        return record
