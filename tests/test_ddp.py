"""DDP on CPU (gloo, 2 processes, "fork"): half a batch per rank gives the single-process
full-batch loss and gradients, for the cycle trainer with both cycle terms on and the stable trainer
in t2l mode (text group frozen); the shared training loop runs under torchrun-style environment
variables; the data order splits every global batch between the ranks; a non-finite step on one
rank is skipped (or stops the run) on every rank, without a hang."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.draws import make_generator
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.synthetic import synthetic_batch
from latentDLM_mmdit.tokenizer import vocab_from_config
from latentDLM_mmdit.training import (
    BatchOrder,
    TrainingError,
    bare_model,
    build_trainer,
    run_training,
    wrap_model_for_ddp,
)
from cycle_vae_impl.entrypoints.train_cycle_vae import CYCLE
from latentDLM_mmdit.train_stable import STABLE
from compat.oracle import tol
from tests.builders import TINY_OVERRIDES as TINY

ENTRIES = {"stable": STABLE, "cycle": CYCLE}

WORLD = 2
BATCH = 4  # full batch; each rank takes BATCH // WORLD
CASES = {
    # Both cycle terms active at this step (no ramp), every term's draws injected.
    "cycle": (
        "cycle",
        TINY
        + [
            "loss.cycle_text_weight=0.5",
            "loss.cycle_latent_weight=0.3",
            "loss.cycle_text_ramp_steps=0",
            "loss.cycle_latent_ramp_steps=0",
        ],
    ),
    "stable_t2l": ("stable", TINY + ["loss.loss_type=t2l"]),
}
TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setup(case: str):
    kind, overrides = CASES[case]
    config = load_config(config_path("cycle" if kind == "cycle" else "stable"), overrides)
    model = build_model(config, seed=int(config.training.seed))
    trainer = build_trainer(config, ENTRIES[kind].trainer_cls, model)
    gen = make_generator(11)
    dim = int(config.model.latent_dim)
    batch = synthetic_batch(vocab_from_config(config), BATCH, 16, dim, gen)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # equal counts per rank
    names = ("latent_noise", "cycle_latent_noise") if kind == "cycle" else ("latent_noise",)
    draws = {name: torch.randn(BATCH, dim, generator=gen) for name in names}
    return trainer, batch, draws


def _rows(mapping, rank):
    half = BATCH // WORLD
    return {k: v[rank * half : (rank + 1) * half] for k, v in mapping.items()}


def _gradient_worker(rank: int, port: int, case: str, out_dir: str) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=TIMEOUT
        )
        trainer, batch, draws = _setup(case)
        wrap_model_for_ddp(trainer, torch.device("cpu"))
        loss, metrics = trainer(_rows(batch, rank), step=100, draws=_rows(draws, rank))
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {
            n: (None if p.grad is None else p.grad.clone()) for n, p in bare_model(trainer.model).named_parameters()
        }
        torch.save(
            {"loss": mean_loss / WORLD, "grads": grads, "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt")
        )
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


# "fork" is reliable on CPU-only torch. Where CUDA is available, autograd starts device threads at
# the first backward of the test process, after which a forked child cannot run backward: there a
# fork server (a fresh process that forks the workers) is used instead.
START_METHOD = "forkserver" if torch.cuda.is_available() else "fork"


def _run_workers(target, args) -> None:
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(["torch", "latentDLM_mmdit.training", target.__module__])
    port = _free_port()
    workers = [ctx.Process(target=target, args=(rank, port, *args)) for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    codes = [w.exitcode for w in workers]
    assert codes == [0] * WORLD, f"worker exit codes {codes}"


@pytest.mark.ddp
@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_halves_equal_the_full_batch(tmp_path, case):
    _run_workers(_gradient_worker, (case, str(tmp_path)))
    trainer, batch, draws = _setup(case)
    loss, metrics = trainer(batch, step=100, draws=draws)
    loss.backward()
    expected = {n: p.grad for n, p in trainer.model.named_parameters()}
    if case == "cycle":
        assert metrics["cycle_text_weight"] == 0.5 and metrics["cycle_latent_weight"] == 0.3
        assert metrics["model_passes"] == 4 and metrics["cycle_text_loss"] > 0 and metrics["cycle_latent_loss"] > 0
    else:
        assert metrics["training_mode"] == "t2l"
        assert expected["text_head.weight"] is None and expected["latent_head.0.weight"] is not None
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], loss.detach(), **tol("float32_split_batch"))
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            got = result["grads"][name]
            assert (got is None) == (grad is None), name
            if grad is not None:
                torch.testing.assert_close(got, grad, **tol("float32_split_batch"), msg=lambda m, n=name: f"{n}: {m}")
        # The halves differ, so equality above is the averaging at work, not a coincidence.
        assert result["metrics"]["loss"] != pytest.approx(float(loss.detach()), rel=1e-4, abs=0.0)


def _loop_worker(rank: int, port: int, kind: str, out_dir: str) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(
            WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        config = load_config(
            config_path(kind),
            TINY
            + [
                "training.num_train_steps=4",
                "logging.save_every=2",
                "training.train_batch_size=2",
                "data.synthetic_num_samples=8",
                "loss.cycle_text_ramp_steps=1" if kind == "cycle" else "loss.latent_loss_weight=0.1",
            ],
        )
        result = run_training(
            config,
            trainer=ENTRIES[kind],
            output_dir=os.path.join(out_dir, "run"),
            synthetic=True,
            progress=False,
            device="cpu",
            dist_timeout=TIMEOUT,
        )
        torch.save(
            {
                "losses": [m["loss"] for m in result.metrics],
                "checkpoints": [str(p) for p in result.checkpoints],
                "initialized": dist.is_initialized(),
            },
            os.path.join(out_dir, f"loop{rank}.pt"),
        )
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["stable", "cycle"])
def test_training_loop_under_two_processes(tmp_path, kind):
    """Stable: l2t / t2l alternate, so the frozen group changes every step under DDP; cycle: the cycle
    terms are skipped at step 0 (ramp) and run afterwards."""
    _run_workers(_loop_worker, (kind, str(tmp_path)))
    results = [torch.load(tmp_path / f"loop{r}.pt", weights_only=True) for r in range(WORLD)]
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == 4  # mean over ranks
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    assert [os.path.basename(p) for p in results[0]["checkpoints"]] == [
        "step_00000002.safetensors",
        "step_00000004.safetensors",
    ]
    assert results[1]["checkpoints"] == []  # rank 0 writes
    assert not any(r["initialized"] for r in results)  # the loop leaves no process group behind
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004.train_state.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    assert not torch.equal(state["ranks"][0]["trainer_generator"], state["ranks"][1]["trainer_generator"])


def test_batch_order_splits_each_global_batch():
    single = BatchOrder(10, 4, 1, 0, seed=5)
    ranks = [BatchOrder(10, 2, 2, r, seed=5) for r in range(2)]
    for _ in range(5):  # crosses epochs (2 global batches per epoch)
        full = single.next_indices()
        parts = [order.next_indices() for order in ranks]
        assert parts[0] + parts[1] == full and not set(parts[0]) & set(parts[1])
    state = ranks[0].state_dict()
    again = BatchOrder(10, 2, 2, 0, seed=99)
    again.load_state_dict(state)
    assert again.next_indices() == ranks[0].next_indices()
    with pytest.raises(ValueError, match="world_size"):
        BatchOrder(10, 2, 1, 0, seed=5).load_state_dict(state)


# -- the DataLoader under DDP: worker processes per rank, bit-exact resume --------------------------
def _record_reader_pids(monkeypatch, pid_file) -> None:
    """Every UpstreamLatentDataset read appends its process id to `pid_file` (forked ranks and their
    loader workers inherit the patch)."""
    from latentDLM_mmdit.data import UpstreamLatentDataset

    original = UpstreamLatentDataset.__getitem__

    def reading(self, index):
        with open(pid_file, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        return original(self, index)

    monkeypatch.setattr(UpstreamLatentDataset, "__getitem__", reading)


def _resume_worker(
    rank: int, port: int, out_dir: str, run: str, data_dirs: tuple[str, str], stop: int | None, resume: str | None
) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(
            WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        config = load_config(
            config_path("stable"),
            TINY
            + [
                "model.dropout=0.1",
                "training.num_train_steps=6",
                "logging.save_every=3",
                "training.train_batch_size=2",
                "data.num_workers=1",
                "training.ddp_timeout_minutes=1.0",
            ],
        )
        run_training(
            config,
            trainer=STABLE,
            output_dir=os.path.join(out_dir, run),
            synthetic=False,
            token_dir=data_dirs[0],
            latent_dir=data_dirs[1],
            progress=False,
            device="cpu",
            stop_at_step=stop,
            resume=resume,
        )
        with open(os.path.join(out_dir, f"{run}.rank{rank}.pid"), "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))
    except BaseException:  # noqa: BLE001 (reported through the exit code)
        traceback.print_exc()
        code = 1
    os._exit(code)


@pytest.mark.ddp
def test_resume_under_two_processes_through_workers_is_bit_exact(tmp_path, monkeypatch):
    """2 ranks, one loader worker each, 16 samples in batches of 2 per rank (4 global batches an
    epoch): 6 steps in one go equal 3 steps plus 3 resumed, metric for metric and weight for weight;
    the samples are read by the loader workers, not by the ranks."""
    from latentDLM_mmdit.data import write_upstream_format

    config = load_config(config_path("stable"), TINY)
    batch = synthetic_batch(vocab_from_config(config), 16, 12, int(config.model.latent_dim), make_generator(3))
    data_dirs = tuple(str(d) for d in write_upstream_format(tmp_path / "data", batch))
    pid_file = tmp_path / "pids"
    _record_reader_pids(monkeypatch, pid_file)
    _run_workers(_resume_worker, (str(tmp_path), "full", data_dirs, None, None))
    _run_workers(_resume_worker, (str(tmp_path), "first", data_dirs, 3, None))
    checkpoint = tmp_path / "first" / "checkpoints" / "step_00000003.safetensors"
    _run_workers(_resume_worker, (str(tmp_path), "resumed", data_dirs, None, str(checkpoint)))

    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    full, first, resumed = metrics("full"), metrics("first"), metrics("resumed")
    assert [m["step"] for m in full] == [1, 2, 3, 4, 5, 6] and first + resumed == full
    assert len({m["loss"] for m in full}) == 6  # the steps differ: the comparison can fail
    end_full = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000006.safetensors"))
    end_resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_00000006.safetensors"))
    assert end_full.keys() == end_resumed.keys()
    for key in end_full:
        torch.testing.assert_close(end_resumed[key], end_full[key], rtol=0.0, atol=0.0, msg=key)
    rank_pids = {
        int((tmp_path / f"{run}.rank{r}.pid").read_text()) for run in ("full", "first", "resumed") for r in range(WORLD)
    }
    readers = [int(p) for p in pid_file.read_text().split()]
    assert len(readers) >= 12 * 2 * WORLD  # 12 steps of 2 samples per rank (workers may read ahead)
    assert not set(readers) & rank_pids and len(set(readers)) == 3 * WORLD  # one worker per rank and run


class _NanOnRank1(MultimodalDiffusionTrainer):
    """The stable trainer with NaN latents in rank 1's first micro-batch of step index 1 only;
    `weights_seen` keeps the weights each step's first micro-batch ran with."""

    poisoned = False
    weights_seen: dict = {}

    def forward(self, batch, step=None, draws=None):
        self.weights_seen.setdefault(step, torch.cat([p.detach().flatten() for p in self.model.parameters()]))
        if step == 1 and dist.get_rank() == 1 and not self.poisoned:
            self.poisoned = True
            batch = {**batch, "latent": torch.full_like(batch["latent"], float("nan"))}
        return super().forward(batch, step=step, draws=draws)


def _nonfinite_worker(rank: int, port: int, policy: str, out_dir: str) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(
            WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        config = load_config(
            config_path("stable"),
            TINY
            + [
                "training.num_train_steps=4",
                "logging.save_every=1",
                "training.train_batch_size=2",
                "training.gradient_accumulation_steps=2",
                "data.synthetic_num_samples=16",
                f"loss.on_nonfinite={policy}",
            ],
        )
        entry = dataclasses.replace(STABLE, trainer_cls=_NanOnRank1)
        outcome: dict = {"error": None}
        try:
            result = run_training(
                config,
                trainer=entry,
                output_dir=os.path.join(out_dir, "run"),
                synthetic=True,
                progress=False,
                device="cpu",
                dist_timeout=TIMEOUT,
            )
            outcome["skipped"] = ["skipped" in m for m in result.metrics]
            outcome["losses"] = [m["loss"] for m in result.metrics]
            outcome["weights_seen"] = _NanOnRank1.weights_seen
        except TrainingError as exc:
            outcome["error"] = str(exc)
        torch.save(outcome, os.path.join(out_dir, f"nonfinite{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


@pytest.mark.ddp
@pytest.mark.parametrize("policy", ["upstream", "raise"])
def test_nonfinite_step_on_one_rank(tmp_path, policy):
    """Rank 1's first micro-batch of step 2 is all NaN: under upstream every rank skips step 2
    (gradient accumulation over 2 micro-batches: the ranks agree before the synchronised backward);
    under raise every rank stops with a TrainingError naming step 2."""
    _run_workers(_nonfinite_worker, (policy, str(tmp_path)))
    results = [torch.load(tmp_path / f"nonfinite{r}.pt", weights_only=True) for r in range(WORLD)]
    if policy == "raise":
        assert all(r["error"] is not None and r["error"].startswith("step 2: ") for r in results), results
        assert "non-finite" in results[1]["error"] and "another rank" in results[0]["error"]
        return
    assert [r["error"] for r in results] == [None, None]
    assert results[0]["skipped"] == results[1]["skipped"] == [False, True, False, False]
    assert results[0]["losses"] == results[1]["losses"]
    checkpoints = tmp_path / "run" / "checkpoints"
    step1, step2, step3 = (load_file(str(checkpoints / f"step_{s:08d}.safetensors")) for s in (1, 2, 3))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)  # step 2 was not taken
    assert any(not torch.equal(step2[k], step3[k]) for k in step2)  # step 3 was
    # After the skip, DDP still averages the gradients: both ranks hold the same weights.
    seen = [r["weights_seen"] for r in results]
    assert sorted(seen[0]) == sorted(seen[1]) == [0, 1, 2, 3]
    assert all(torch.equal(seen[0][s], seen[1][s]) for s in range(4))
    assert not torch.equal(seen[0][2], seen[0][3])
