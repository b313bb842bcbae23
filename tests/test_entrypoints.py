"""The two entry points as users run them (subprocesses, module and file form): a few synthetic
steps, checkpoints and metrics written, --init-from across trainers, bit-exact resume on CPU, and
one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cycle_vae_impl.entrypoints import train_cycle_vae
from latentDLM_mmdit import train_stable
from latentDLM_mmdit.train_stable import STABLE
from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.factory import build_model
from compat.oracle import tol
from tests.builders import TINY_OVERRIDES as TINY

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--synthetic", "--no-progress", "--device", "cpu"]
STABLE_MODULE = [sys.executable, "-m", "latentDLM_mmdit.train_stable"]
STABLE_FILE = [sys.executable, str(REPO / "latentDLM_mmdit" / "train_stable.py")]
CYCLE_MODULE = [sys.executable, "-m", "cycle_vae_impl.entrypoints.train_cycle_vae"]


def _start(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=240):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{process.args} exited {process.returncode}\n{err[-3000:]}"
    return out, err


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs, two at a time:
    full    stable, 6 steps in one go (python -m), checkpoints at 3 and 6;
    first   stable, the same config stopped after step 3 (run as a file);
    resumed stable, resumed from first's step-3 checkpoint to step 6 (python -m);
    cycle   cycle, 2 steps initialised from full's final checkpoint with lr 1e-12 (python -m)."""
    root = tmp_path_factory.mktemp("entrypoints")
    dirs = {name: root / name for name in ("full", "first", "resumed", "cycle")}
    stable_args = COMMON + TINY + ["training.num_train_steps=6", "logging.save_every=3"]
    cycle_args = (
        COMMON
        + TINY
        + [
            "training.num_train_steps=2",
            "loss.cycle_text_ramp_steps=0",
            "loss.cycle_latent_ramp_steps=0",
            "loss.cycle_text_warmup_steps=0",
            "loss.cycle_latent_warmup_steps=0",
        ]
    )
    outputs = {}
    a = _start(STABLE_MODULE + stable_args + ["--output-dir", str(dirs["full"])], root)
    b = _start(STABLE_FILE + stable_args + ["--stop-at-step", "3", "--output-dir", str(dirs["first"])], root)
    outputs["full"], outputs["first"] = _finish(a), _finish(b)
    c = _start(
        STABLE_MODULE + stable_args + ["--resume", str(_ckpt(dirs["first"], 3)), "--output-dir", str(dirs["resumed"])],
        root,
    )
    d = _start(
        CYCLE_MODULE
        + cycle_args
        + ["optimizer.lr=1e-12", "--init-from", str(_ckpt(dirs["full"], 6)), "--output-dir", str(dirs["cycle"])],
        root,
    )
    outputs["resumed"], outputs["cycle"] = _finish(c), _finish(d)
    return dirs, outputs


@pytest.mark.slow
def test_stable_run_writes_metrics_and_checkpoints(runs):
    dirs, outputs = runs
    metrics = _metrics(dirs["full"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["training_mode"] for m in metrics] == ["l2t", "t2l"] * 3  # the sequential schedule
    assert all(torch.isfinite(torch.tensor([m["loss"], m["lr"], m["grad_norm"]])).all() for m in metrics)
    assert metrics[0]["lr"] == pytest.approx(1e-3 / 4, rel=1e-12, abs=0.0)  # warmup step 1 of 4
    for step in (3, 6):
        assert _ckpt(dirs["full"], step).is_file()
        assert _ckpt(dirs["full"], step).with_name(f"step_{step:08d}.train_state.pt").is_file()
    with safe_open(str(_ckpt(dirs["full"], 6)), "pt") as handle:
        meta = handle.metadata()
        assert meta["trainer_kind"] == "stable" and meta["step"] == "6"
        assert "text_encoder.token_embed.weight" in handle.keys()  # bare model keys
    assert "stable trainer: step 6" in outputs["full"][0]
    assert (dirs["full"] / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_is_bit_exact(runs):
    dirs, _ = runs
    full, first, resumed = (_metrics(dirs[k]) for k in ("full", "first", "resumed"))
    assert [m["step"] for m in first] == [1, 2, 3] and [m["step"] for m in resumed] == [4, 5, 6]
    assert first + resumed == full  # every metric of every step, exactly (JSON floats round-trip)
    assert len({m["loss"] for m in full}) == 6  # the steps differ: the comparison can fail
    end_full, end_resumed = load_file(str(_ckpt(dirs["full"], 6))), load_file(str(_ckpt(dirs["resumed"], 6)))
    assert end_full.keys() == end_resumed.keys()
    for key in end_full:
        assert torch.equal(end_full[key], end_resumed[key]), key
    start = load_file(str(_ckpt(dirs["first"], 3)))
    assert any(not torch.equal(start[k], end_full[k]) for k in end_full)  # training moved the weights


@pytest.mark.slow
def test_cycle_init_from_stable_checkpoint(runs):
    dirs, _ = runs
    metrics = _metrics(dirs["cycle"])
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["cycle_text_weight"] > 0 and m["cycle_latent_weight"] > 0 and m["model_passes"] == 4 for m in metrics)
    # lr 1e-12 (the schema refuses lr 0): two AdamW steps move a weight by ~1e-11 at most, so the
    # weights the cycle trainer trained with are the stable checkpoint's (a fresh init is ~1e-2 away).
    stable, cycle = load_file(str(_ckpt(dirs["full"], 6))), load_file(str(_ckpt(dirs["cycle"], 2)))
    assert stable.keys() == cycle.keys()
    for key in stable:
        torch.testing.assert_close(cycle[key], stable[key], **tol("negligible_update"), msg=key)
    with safe_open(str(_ckpt(dirs["cycle"], 2)), "pt") as handle:
        assert handle.metadata()["trainer_kind"] == "cycle"
    # Without --init-from the cycle run would start from the seeded initialisation instead.
    config = load_config(config_path("cycle"), TINY)
    scratch = build_model(config, seed=int(config.training.seed)).state_dict()
    assert not torch.equal(scratch["text_head.weight"], stable["text_head.weight"])


@pytest.mark.parametrize(
    "main, argv, expected",
    [
        (train_stable.main, ["--synthetic", "training.nope=1"], "unknown config key 'training.nope'"),
        (train_stable.main, ["--synthetic", "optimizer.lr=fast"], "expected a float"),
        (
            train_cycle_vae.main,
            ["--synthetic", "--config", "/nonexistent/c.yaml"],
            "/nonexistent/c.yaml does not exist",
        ),
        (
            train_cycle_vae.main,
            ["--data-tokens", "/nonexistent/t", "--data-latents", "/nonexistent/l"],
            "token directory /nonexistent/t does not exist",
        ),
        (train_stable.main, [], "no training data"),
        (
            train_cycle_vae.main,
            ["--synthetic", "--init-from", "/nonexistent/x.safetensors"],
            "/nonexistent/x.safetensors",
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, main, argv, expected):
    code = main(argv + ["--no-progress", "--device", "cpu", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.slow
def test_resume_with_the_other_trainer_is_refused(runs, tmp_path, capsys):
    dirs, _ = runs
    code = train_cycle_vae.main(
        ["--synthetic", "--no-progress", "--resume", str(_ckpt(dirs["full"], 3)), "--output-dir", str(tmp_path / "x")]
        + TINY
    )
    err = capsys.readouterr().err
    assert code != 0 and "written by the stable trainer" in err and "--init-from" in err


# -- the loop's arithmetic, in process ---------------------------------------------------------------
def test_learning_rate_schedule():
    from latentDLM_mmdit.training import LoopSettings, learning_rate

    settings = LoopSettings.from_config(
        load_config(
            config_path("stable"), ["training.num_train_steps=10", "training.warmup_steps=2", "optimizer.lr=1.0"]
        )
    )
    lrs = [learning_rate(step, settings) for step in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # warmup (step+1)/2, then the cosine starts at the base
    assert all(a > b for a, b in zip(lrs[2:10], lrs[3:11]))
    assert lrs[10] == pytest.approx(0.0, rel=0.0, abs=1e-12) and lrs[6] == pytest.approx(0.5, rel=1e-12, abs=0.0)
    constant = LoopSettings.from_config(
        load_config(
            config_path("stable"), ["training.lr_schedule=constant", "training.warmup_steps=0", "optimizer.lr=0.3"]
        )
    )
    assert {learning_rate(step, constant) for step in range(50)} == {0.3}


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """l2t draws nothing and averages over equal token counts: 2 micro-batches of 2 give the loss
    and the gradient norm of one batch of 4 (the data order is shared)."""
    from latentDLM_mmdit.training import run_training

    results = []
    for name, overrides in (
        ("big", ["training.train_batch_size=4", "training.gradient_accumulation_steps=1"]),
        ("accum", ["training.train_batch_size=2", "training.gradient_accumulation_steps=2"]),
    ):
        config = load_config(
            config_path("stable"),
            TINY + overrides + ["loss.loss_type=l2t", "training.num_train_steps=1", "optimizer.grad_clip_norm=1000.0"],
        )
        results.append(
            run_training(
                config, trainer=STABLE, output_dir=tmp_path / name, synthetic=True, progress=False, device="cpu"
            ).metrics[0]
        )
    big, accum = results
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(accum[key]), torch.tensor(big[key]), **tol("float32_split_batch"))
    # A different batch gives a different loss: the comparison above can fail.
    config = load_config(
        config_path("stable"),
        TINY + ["loss.loss_type=l2t", "training.num_train_steps=1", "training.train_batch_size=2"],
    )
    half = run_training(
        config, trainer=STABLE, output_dir=tmp_path / "half", synthetic=True, progress=False, device="cpu"
    ).metrics[0]
    assert half["loss"] != pytest.approx(big["loss"], rel=1e-4, abs=0.0)
