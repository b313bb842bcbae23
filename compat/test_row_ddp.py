"""Row: DDP (2 gloo processes).

Both trainers are run under DistributedDataParallel on clusters (torchrun). Two processes that each
run half of a batch through DDP must give what one process gives on the whole batch: the mean of
the two ranks' losses equals the full-batch loss, and the DDP-averaged gradients equal the full-batch
gradients (every term is a mean over equally sized halves), within `tol('float32_batching')`.
Checked for the stable trainer (t2l, which freezes the text group) and the cycle trainer (full mode,
both cycle weights > 0, all four terms), through the training loop's own DDP plumbing
(`latentDLM_mmdit.training.distributed.init_distributed` and `wrap_model_for_ddp`, find_unused_parameters=True),
with the draws injected and sliced per rank so both ranks and the single process see identical
numbers. Parameters without a gradient in the single process (the frozen text group) must get none
under DDP either: a zero gradient there would let AdamW's weight decay move frozen weights.

Each worker is a forked process (fork was reliable here, spawn aborted at teardown now and then)
that rebuilds the model from the checkpoint under test, joins a gloo group on a probed free port
with a 60 s timeout, and writes its losses and gradients to a file; every worker's exit code is
checked and the group is torn down.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from compat.harness import grads_by_name, row_runner, row_settings, row_test, sensitivity_control
from compat.outcomes import control_failed, expect, expect_close, not_applicable
from compat.subjects import CandidateError
from compat.oracle import tol
from latentDLM_mmdit.factory import dtype_from_config

pytestmark = [pytest.mark.compat_row("ddp"), pytest.mark.ddp]

WORLD = 2
SEED = 130
TIMEOUT_S = 60
CYCLE = row_settings(
    dict(
        latent_t_mode="full",
        cycle_text_weight=0.5,
        cycle_latent_weight=0.5,
        cycle_latent_sampling="argmax",
        cycle_text_warmup_steps=0,
        cycle_text_ramp_steps=0,
        cycle_latent_warmup_steps=0,
        cycle_latent_ramp_steps=0,
    )
)
SETTINGS = ("stable_t2l", "cycle")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_for(ctx, setting: str):
    return ctx.stable_config_for("t2l") if setting == "stable_t2l" else ctx.cycle_config_for(CYCLE)


def subject_of(ctx, setting: str):
    return ctx.stable_subject if setting == "stable_t2l" else ctx.cycle_subject


def inputs(ctx) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The full batch (even size) and its draws."""
    batch = ctx.batch(WORLD * max(1, ctx.options.batch_size // WORLD), seed=SEED)
    return batch, ctx.draws(batch, seed=SEED)


def shard(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        half = value.shape[0] // WORLD
        out[key] = value[rank * half : (rank + 1) * half]
    return out


def step(ctx, setting: str, batch, draws, model):
    """One single-process step and backward of the setting's trainer; its loss."""
    run = ctx.run_stable if setting == "stable_t2l" else ctx.run_cycle
    record = (
        run("t2l", batch, config=config_for(ctx, setting), draws=draws, model=model, grad=True)
        if setting == "stable_t2l"
        else run(batch, config=config_for(ctx, setting), draws=draws, model=model, grad=True)
    )
    record.loss.backward()
    return record.loss.detach()


def _worker(ctx, rank: int, port: int, out_dir: Path) -> None:
    """Runs in a forked child: joins the group, runs both settings on its shard, saves the results."""
    from latentDLM_mmdit.training import distributed  # the loop's DDP setup, looked up as the loop does

    try:
        torch.set_num_threads(1)
        os.environ.update(
            WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        dctx = distributed.init_distributed("cpu", timeout=timedelta(seconds=TIMEOUT_S))
        try:
            batch, draws = inputs(ctx)
            results = {}
            for setting in SETTINGS:
                model = ctx.fresh_semantic_model()  # a fresh load (or proxy) in this process
                config, subject = config_for(ctx, setting), subject_of(ctx, setting)
                trainer = subject.build(model, ctx.vocab, dtype_from_config(config), config)
                expect(
                    isinstance(getattr(trainer, "model", None), torch.nn.Module),
                    f"the {subject.role} trainer keeps no .model, which the training loop wraps in DDP",
                    "keep the model the trainer is given as self.model (upstream's protocol)",
                )
                distributed.wrap_model_for_ddp(trainer, dctx.device)
                loss, _, _, _ = subject.call(trainer, shard(batch, rank), draws=shard(draws, rank), seed=SEED + rank)
                loss.backward()
                results[setting] = {
                    "loss": loss.detach().clone(),
                    "grads": grads_by_name(distributed.bare_model(trainer.model)),
                }
            torch.save(results, out_dir / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported by the parent from this file; no traceback on the user's terminal
        (out_dir / f"rank{rank}.error").write_text(traceback.format_exc())
        if isinstance(exc, CandidateError):  # the trainer under test failed (its own frame named)
            (out_dir / f"rank{rank}.trainer").write_text(str(exc))
        sys.exit(1)


def run_ddp(ctx) -> list[dict]:
    """Starts WORLD forked workers, waits for all, checks every exit code, returns their results."""
    import torch.multiprocessing as mp

    out_dir = Path(ctx.workdir) / f"ddp_{os.getpid()}_{time.monotonic_ns()}"
    out_dir.mkdir(parents=True)
    port = free_port()
    mp_ctx = mp.get_context("fork")
    workers = [mp_ctx.Process(target=_worker, args=(ctx, rank, port, out_dir), daemon=True) for rank in range(WORLD)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + TIMEOUT_S + 10
    try:
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            if any(w.exitcode not in (None, 0) for w in workers):
                break  # one failed: the other would wait for it until the group's timeout
            time.sleep(0.05)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join(5)
    problems, trainer_failures = [], []
    for rank, w in enumerate(workers):
        error, trainer = out_dir / f"rank{rank}.error", out_dir / f"rank{rank}.trainer"
        if trainer.exists():
            trainer_failures.append(trainer.read_text())
            problems.append(f"rank {rank}: {trainer_failures[-1]}")
        elif error.exists():
            problems.append(f"rank {rank} raised: {error.read_text().strip().splitlines()[-1]}")
        elif w.exitcode != 0:
            problems.append(
                f"rank {rank} exited with code {w.exitcode}"
                + (" (stopped: it did not finish in time)" if w.exitcode and w.exitcode < 0 else "")
            )
    if trainer_failures and len(trainer_failures) == len(problems):  # the trainer under test failed, as in one process
        raise CandidateError(trainer_failures[0] + f" (in each of the {len(trainer_failures)} DDP ranks that ran it)")
    if problems:  # not the trainer (its failures are above): the processes themselves did not run through
        control_failed(f"the {WORLD} gloo DDP worker processes did not finish: " + "; ".join(problems))
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def check_ddp_matches_single_process(ctx, measure):
    if not dist.is_available() or not dist.is_gloo_available():
        not_applicable("torch.distributed with the gloo backend is not available in this torch build")
    if ctx.device.type != "cpu":
        not_applicable(f"the DDP row runs gloo on the CPU; --compat-device is {ctx.device}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        not_applicable(
            "this process has already used CUDA, and forked workers cannot (run the DDP row in a "
            "session that has not touched CUDA, e.g. without -m gpu)"
        )
    ctx.semantic_model()
    ranks = run_ddp(ctx)
    batch, draws = inputs(ctx)
    for setting in SETTINGS:
        model = ctx.fresh_semantic_model()
        loss = step(ctx, setting, batch, draws, model)
        want = grads_by_name(model)
        losses = torch.stack([r[setting]["loss"] for r in ranks])
        expect_close(
            losses.mean(),
            loss,
            **tol("float32_batching"),
            problem=f"under DDP the mean of the {WORLD} ranks' {setting} losses differs from the single-process "
            "full-batch loss",
            fix="reduce each rank's loss as a mean over its own samples (no cross-sample terms)",
        )
        got = ranks[0][setting]["grads"]
        for rank in range(1, WORLD):
            other = ranks[rank][setting]["grads"]
            expect(
                other.keys() == got.keys() and all(torch.equal(other[n], got[n]) for n in got),
                f"under DDP rank {rank}'s {setting} gradients after the all-reduce differ from rank 0's: the "
                "gradients are not synchronised",
                "wrap the model in DistributedDataParallel in the training loop (training.world_size > 1)",
            )
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got))
        expect(
            not extra,
            f"under DDP {len(extra)} parameter(s) get a {setting} gradient that the single process leaves None "
            f"({', '.join(extra[:3])}), so frozen weights would move (weight decay)",
            "freeze those parameters before DDP wraps the model, or leave their gradients None",
        )
        expect(
            not missing,
            f"under DDP {len(missing)} parameter(s) get no {setting} gradient ({', '.join(missing[:3])}): DDP did "
            "not synchronise them",
            "let DDP see every trained parameter (find_unused_parameters when terms switch on and off)",
        )
        worst = 0.0
        for name, g in want.items():
            worst = max(worst, float((got[name] - g).abs().max()))
            expect_close(
                got[name],
                g,
                **tol("float32_batching"),
                problem=f"under DDP the averaged {setting} gradient of {name} differs from the single-process "
                "full batch's",
                fix="average the gradients over ranks (DDP) and reduce each rank's loss per sample",
            )
        measure(f"{setting}_loss_abs_diff", float((losses.mean() - loss).abs()))
        measure(f"{setting}_grad_max_abs_diff", worst)


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t", "latents", "text"),
    "ddp_matches_single_process": check_ddp_matches_single_process,
}


run_row = row_runner(CHECKS)
test_ddp = row_test(CHECKS)
