"""Short training runs through the real training loop (`latentDLM_mmdit.training.run_training`),
as a cluster run does them, and an independent replay of what that loop should have done.

`run_trajectory` trains a trainer class (the built-in one or the user's `--cycle-trainer` /
`--stable-trainer`) for K optimizer steps from the checkpoint under test, through the loop the entry
points use (optimizer, LR schedule, clipping, accumulation, autocast), recording every batch the
loop fed and the per-step metrics, and returns the final weights.

`replay_with_oracle` redoes those K steps outside the loop: the same trainer class, model and
recorded batches, its gradients, then clipping, the LR schedule and AdamW written here from their
definitions (Loshchilov & Hutter's decoupled weight decay, Kingma & Ba's bias-corrected moments,
global-norm clipping, linear warmup + cosine) in float64. A loop that steps differently from what the
config says (another beta, a clipping norm read from a different key, a schedule off by one, a
skipped accumulation) moves the weights away from the replay.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from latentDLM_mmdit.checkpoints import load_checkpoint_into, save_checkpoint
from latentDLM_mmdit.config import with_updates
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.precision import autocast
from latentDLM_mmdit.seeding import seed_everything
from latentDLM_mmdit.training import TrainerEntry, build_trainer, run_training

STEPS = 6  # K: past the warmups of the tiny configs (a ramp phase change) and into Adam's bias correction


@dataclass(frozen=True)
class Window:
    """The K optimizer steps of the schedule the row trains: [start, start + K)."""

    start: int
    steps: int
    reason: str

    @property
    def stop(self) -> int:
        return self.start + self.steps


def schedule_window(config: DictConfig, steps: int = STEPS) -> Window:
    """Where in `config`'s schedule K steps are trained (all of a run shorter than K). From step 0 when
    the warmup ends within them
    (they cross it into the decay); when training.warmup_steps exceeds K, steps 0..K-1 would run at
    most K / warmup of optimizer.lr (a 2,000-step warmup: 0.3% of it) and move nothing, so the window
    is placed across the end of warmup, where the schedule reaches its peak, as the cluster run spends
    nearly all its steps."""
    warmup = int(config.training.warmup_steps)
    total = int(config.training.num_train_steps)
    if total < steps:  # the whole run is shorter than K: all of it
        return Window(0, total, f"the whole run: training.num_train_steps is {total}")
    if warmup <= steps or total < warmup + steps:
        return Window(
            0, steps, "from the first step (the window crosses the end of warmup)" if warmup else "from step 0"
        )
    start = warmup - steps // 2
    return Window(
        start,
        steps,
        f"steps {start + 1}-{start + steps} of {total}, across the end of the {warmup}-step warmup (the "
        f"schedule's peak): steps 1-{steps} would train at most {steps / warmup:.2%} of optimizer.lr",
    )


@dataclass
class Trajectory:
    """What one run through the loop did."""

    kind: str
    config: DictConfig
    metrics: list[dict[str, Any]]
    batches: list[tuple[int, dict[str, torch.Tensor]]]  # (step, batch) per micro-batch, in order
    final_weights: dict[str, torch.Tensor] = field(repr=False)
    window: Window | None = None
    frozen: set[str] = field(default_factory=set)  # parameters the trainer left without gradients

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.metrics]

    @property
    def grad_norms(self) -> list[float | None]:
        return [r.get("grad_norm") for r in self.metrics]


def weights_checksum(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Order-independent float64 sums and a bit-level digest of a state dict (for golden files)."""
    total = sum(float(t.double().sum()) for t in weights.values())
    abs_total = sum(float(t.double().abs().sum()) for t in weights.values())
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return {"sum": total, "abs_sum": abs_total, "sha256": digest.hexdigest()}


def trajectory_config(
    config: DictConfig,
    *,
    batch_size: int,
    seq_len: int,
    steps: int = STEPS,
    model_overrides: dict[str, Any] | None = None,
    updates: dict[str, Any] | None = None,
) -> DictConfig:
    """`config` for a K-step run: its optimizer, schedule (training.num_train_steps kept: the run is a
    window of it, `schedule_window`), clipping, accumulation and precision as they are; the batch size
    and synthetic data sized for the gate."""
    accum = int(config.training.gradient_accumulation_steps)
    updates_run = {
        "training.train_batch_size": batch_size,
        "logging.save_every": 0,  # the window's last step only
        "logging.log_every": steps,
        "data.synthetic_seq_len": seq_len,
        "data.synthetic_num_samples": max(4 * batch_size, steps * batch_size * accum),
        # Loader workers change no sample and no order (tests/test_loader.py); K short steps
        # would spend their time starting processes.
        "data.num_workers": 0,
        # Eager steps: torch.compile of the trainers is the compiled_trainer row's subject (and inductor
        # on the gate's CPU would spend the run generating code).
        "training.compile_model": False,
    }
    updates_all = {**updates_run, **(updates or {})}
    updates_all.update({f"model.{k}": v for k, v in (model_overrides or {}).items()})
    return with_updates(config, updates_all, "the trajectories row")


def recording_class(trainer_cls: type, accepts_step: bool) -> type:
    """A subclass of `trainer_cls` that records each batch the loop feeds it (and passes `step=`
    only where the class takes it). The class itself is not modified."""

    class Recording(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.recorded: list[tuple[int, dict[str, torch.Tensor]]] = []
            if not isinstance(getattr(self, "generator", None), torch.Generator):
                self.generator = torch.Generator()  # the loop seeds one; this class draws globally

        def forward(self, batch, step=None, **kwargs):
            self.recorded.append((step, {k: v.detach().clone() for k, v in batch.items()}))
            out = super().forward(batch, step=step, **kwargs) if accepts_step else super().forward(batch, **kwargs)
            return out[0], (out[1] if len(out) > 1 and isinstance(out[1], dict) else {})

    Recording.__name__ = Recording.__qualname__ = f"Recording{trainer_cls.__name__}"
    return Recording


def run_trajectory(
    kind: str,
    trainer_cls: type,
    accepts_step: bool,
    config: DictConfig,
    init: Path,
    workdir: Path,
    *,
    config_path: str,
    device: str = "cpu",
    token_dir=None,
    latent_dir=None,
) -> Trajectory:
    """K steps of `trainer_cls` through the shared training loop from the weights in `init`, at
    the config's `schedule_window`."""
    window = schedule_window(config)
    recorded: list = []
    base = recording_class(trainer_cls, accepts_step)

    class Keep(base):  # hands the recording to this call, whichever instance the loop builds
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.recorded = recorded

    Keep.__name__ = Keep.__qualname__ = base.__name__
    entry = TrainerEntry(kind, Keep, Path(config_path), "compat.trajectories", f"{kind} trajectory")
    synthetic = token_dir is None
    result = run_training(
        config,
        trainer=entry,
        output_dir=workdir / kind,
        synthetic=synthetic,
        token_dir=token_dir,
        latent_dir=latent_dir,
        init_from=init,
        progress=False,
        device=device,
        start_at_step=window.start,
        stop_at_step=window.stop,
    )
    weights = load_file(str(result.checkpoints[-1]))
    return Trajectory(kind, config, list(result.metrics), list(recorded), weights, window)


def save_init(model: torch.nn.Module, config: DictConfig, path: Path) -> Path:
    """The starting weights of both runs, as this project's checkpoint."""
    return save_checkpoint(path, model, config=config, trainer_kind="stable", step=0)


# -- the oracle: clipping, schedule and AdamW from their definitions ------------------------------
def oracle_lr(step: int, config: DictConfig) -> float:
    """LR of the 0-based optimizer step: linear warmup (step+1)/warmup, then cosine to 0 at the
    last step (or constant), as `training.lr_schedule` documents."""
    base = float(config.optimizer.lr)
    warmup = int(config.training.warmup_steps)
    total = int(config.training.num_train_steps)
    if step < warmup:
        return base * (step + 1) / warmup
    if str(config.training.lr_schedule) == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class OracleAdamW:
    """AdamW (decoupled weight decay) in float64 over named parameters."""

    betas: tuple[float, float]
    eps: float
    weight_decay: float
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    t: dict[str, int] = field(default_factory=dict)

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> None:
        b1, b2 = self.betas
        for name, g in grads.items():
            p = params[name]
            self.t[name] = t = self.t.get(name, 0) + 1
            m = self.m.setdefault(name, torch.zeros_like(p))
            v = self.v.setdefault(name, torch.zeros_like(p))
            p.mul_(1 - lr * self.weight_decay)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))


def clip_global_norm(grads: dict[str, torch.Tensor], max_norm: float) -> float:
    """Scales `grads` in place to a global L2 norm of at most `max_norm`; returns the norm before."""
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    if max_norm > 0 and total > max_norm:
        for g in grads.values():
            g.mul_(max_norm / (total + 1e-6))
    return total


@dataclass
class Replay:
    """The replay's per-step values, and what the tolerances of the comparison are derived from."""

    losses: list[float]
    grad_norms: list[float]
    lrs: list[float]
    final_weights: dict[str, torch.Tensor]
    initial_weights: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    weight_norms: list[float] = field(default_factory=list)  # ||w|| after each step (float64)
    update_norms: list[float] = field(default_factory=list)  # ||w_k - w_0|| after each step
    largest_grad: int = 0  # elements of the largest gradient tensor (the float32 norm's longest sum)
    n_grads: int = 0  # gradient tensors in the total norm


def replay_with_oracle(
    run: Trajectory, trainer_cls: type, accepts_step: bool, init: Path, device: str = "cpu"
) -> Replay:
    """Redoes `run`'s steps outside the loop (see the module docstring)."""
    config = run.config
    seed = int(config.training.seed)
    seed_everything(seed)
    model = build_model(config)
    load_checkpoint_into(model, init)
    model.to(device)
    trainer = build_trainer(config, recording_class(trainer_cls, accepts_step), model).to(device)
    trainer.generator.manual_seed(seed)
    seed_everything(seed)
    master = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    initial = {n: t.clone() for n, t in master.items()}
    weight_norms, update_norms, largest, n_grads = [], [], 0, 0
    opt = config.optimizer
    adamw = OracleAdamW((float(opt.beta1), float(opt.beta2)), float(opt.eps), float(opt.weight_decay))
    accum = int(config.training.gradient_accumulation_steps)
    mixed_precision = str(config.training.mixed_precision)
    losses, norms, lrs = [], [], []
    by_step: dict[int, list[dict[str, torch.Tensor]]] = {}
    for step, batch in run.batches:
        by_step.setdefault(step, []).append(batch)
    for step in sorted(by_step):
        micro = by_step[step]
        if len(micro) != accum:
            raise AssertionError(
                f"the loop fed {len(micro)} micro-batches at step {step}, training.gradient_accumulation_steps={accum}"
            )
        for p in model.parameters():
            p.grad = None
        step_losses = []
        for batch in micro:
            with autocast(mixed_precision, device):
                loss, _ = trainer({k: v.to(device) for k, v in batch.items()}, step=step)
            (loss / accum).backward()
            step_losses.append(float(loss.detach()))
        grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
        largest = max([largest, *(g.numel() for g in grads.values())])
        n_grads = max(n_grads, len(grads))
        norms.append(clip_global_norm(grads, float(opt.grad_clip_norm)))
        lr = oracle_lr(step, config)
        lrs.append(lr)
        adamw.step(master, grads, lr)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(master[n].to(p.dtype))
        losses.append(sum(step_losses) / len(step_losses))
        weight_norms.append(math.sqrt(sum(float(t.pow(2).sum()) for t in master.values())))
        update_norms.append(math.sqrt(sum(float((t - initial[n]).pow(2).sum()) for n, t in master.items())))
    final = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    return Replay(losses, norms, lrs, final, initial, weight_norms, update_norms, largest, n_grads)
