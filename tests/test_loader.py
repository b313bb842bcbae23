"""The training loop's data loader and LR schedule: batches read by DataLoader worker processes
(`data.num_workers`) in the data order of the loop, bit-exact resume although the workers read
ahead, a bad file met by a worker is a one-line error naming it, the dataset reads one pair at
startup; the LambdaLR schedule gives `learning_rate()`'s numbers and travels in the train state;
`training.ddp_timeout_minutes` reaches the process group."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compat.oracle import tol
from cycle_vae_impl.configs import config_path
from latentDLM_mmdit import data as data_module
from latentDLM_mmdit.checkpoints import train_state_path
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.data import DataError, UpstreamLatentDataset, write_upstream_format
from latentDLM_mmdit.draws import make_generator
from latentDLM_mmdit.synthetic import synthetic_batch
from latentDLM_mmdit.tokenizer import vocab_from_config
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import (
    LoopSettings,
    TrainingError,
    build_lr_scheduler,
    learning_rate,
    run_training,
)

# dropout > 0: the global RNG matters, so a resume that restored it wrongly would show.
TINY = ["model.n_blocks=1", "model.hidden_size=32", "model.cond_dim=32", "model.dropout=0.1"]
N_SAMPLES, SEQ_LEN = 24, 12  # batch 4: 6 batches an epoch, so 8 steps cross an epoch


def write_data(root: Path, n: int = N_SAMPLES) -> tuple[Path, Path]:
    config = load_config(config_path("stable"), TINY)
    batch = synthetic_batch(vocab_from_config(config), n, SEQ_LEN, int(config.model.latent_dim), make_generator(5))
    return write_upstream_format(root, batch)


def stable_config(*overrides: str):
    return load_config(config_path("stable"), TINY + ["training.num_train_steps=8", "logging.save_every=3", *overrides])


def train(config, output_dir: Path, data_dirs, **kwargs):
    token_dir, latent_dir = data_dirs
    return run_training(
        config,
        trainer=STABLE,
        output_dir=output_dir,
        synthetic=False,
        token_dir=token_dir,
        latent_dir=latent_dir,
        progress=False,
        device="cpu",
        **kwargs,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.safetensors"


def record_reader_pids(monkeypatch, pid_file: Path) -> None:
    """Every UpstreamLatentDataset read appends its process id to `pid_file` (forked workers inherit
    the patch)."""
    original = UpstreamLatentDataset.__getitem__

    def reading(self, index):
        with open(pid_file, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        return original(self, index)

    monkeypatch.setattr(UpstreamLatentDataset, "__getitem__", reading)


def reader_pids(pid_file: Path) -> set[int]:
    return {int(line) for line in pid_file.read_text().split()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Upstream-format data and four stable runs of 8 steps on it:
    full     2 workers, in one go;  first   2 workers, stopped after step 3;
    resumed  2 workers, from first's step 3 to 8;  inline  0 workers, in one go."""
    root = tmp_path_factory.mktemp("loader")
    data_dirs = write_data(root / "data")
    dirs = {name: root / name for name in ("full", "first", "resumed", "inline")}
    workers = stable_config("data.num_workers=2")
    train(workers, dirs["full"], data_dirs)
    train(workers, dirs["first"], data_dirs, stop_at_step=3)
    train(workers, dirs["resumed"], data_dirs, resume=ckpt(dirs["first"], 3))
    train(stable_config("data.num_workers=0"), dirs["inline"], data_dirs)
    return dirs, data_dirs


def test_workers_read_the_samples(tmp_path, monkeypatch):
    data_dirs = write_data(tmp_path / "data")
    for workers in (0, 2):
        pid_file = tmp_path / f"pids{workers}"
        record_reader_pids(monkeypatch, pid_file)
        config = stable_config(f"data.num_workers={workers}", "training.num_train_steps=2")
        train(config, tmp_path / f"run{workers}", data_dirs)
        pids = reader_pids(pid_file)
        if workers == 0:
            assert pids == {os.getpid()}
        else:  # every sample of every batch read by one of the 2 workers (they may read ahead)
            assert len(pid_file.read_text().split()) >= 2 * 4
            assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_resume_through_workers_is_bit_exact(runs):
    dirs, _ = runs
    full, first, resumed, inline = (metrics(dirs[k]) for k in ("full", "first", "resumed", "inline"))
    assert [m["step"] for m in first] == [1, 2, 3] and [m["step"] for m in resumed] == [4, 5, 6, 7, 8]
    assert first + resumed == full  # every metric of every step, exactly
    assert inline == full  # the number of workers changes nothing but the speed
    assert len({m["loss"] for m in full}) == 8  # the steps differ: the comparison can fail
    end_full, end_resumed = load_file(str(ckpt(dirs["full"], 8))), load_file(str(ckpt(dirs["resumed"], 8)))
    assert end_full.keys() == end_resumed.keys()
    for key in end_full:
        torch.testing.assert_close(end_resumed[key], end_full[key], rtol=0.0, atol=0.0, msg=key)
    # The saved position is that of the batches consumed (3), not of those the workers read ahead.
    state = torch.load(train_state_path(ckpt(dirs["first"], 3)), weights_only=True)
    assert (state["data_order"]["epoch"], state["data_order"]["position"]) == (0, 3)


def test_bad_file_read_by_a_worker_is_one_line_naming_it(tmp_path, capsys):
    from latentDLM_mmdit import train_stable

    token_dir, latent_dir = write_data(tmp_path / "data", n=8)
    bad = latent_dir / "sample_000005.npy"
    bad.write_bytes(b"not numpy")
    config = stable_config("data.num_workers=2", "training.num_train_steps=2")
    with pytest.raises(DataError, match="cannot be read as .npy") as info:
        train(config, tmp_path / "run", (token_dir, latent_dir))
    assert str(bad) in str(info.value) and "\n" not in str(info.value) and "Traceback" not in str(info.value)
    code = train_stable.main(
        TINY
        + [
            "data.num_workers=2",
            "training.num_train_steps=2",
            "--data-tokens",
            str(token_dir),
            "--data-latents",
            str(latent_dir),
            "--no-progress",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path / "cli"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: latent file ") and str(bad) in err[0], err


def test_dataset_reads_one_pair_at_startup(tmp_path, monkeypatch):
    """Upstream's data sets hold millions of pairs: building the dataset lists the directories and
    reads the first pair only; every other file is read (and checked) when its sample is."""
    token_dir, latent_dir = write_data(tmp_path / "data", n=40)
    reads = []
    original = data_module._read_latent
    monkeypatch.setattr(data_module, "_read_latent", lambda path: reads.append(path) or original(path))
    config = load_config(config_path("stable"), TINY)
    dataset = UpstreamLatentDataset(token_dir, latent_dir, 32, vocab_from_config(config))
    assert len(dataset) == 40 and [p.name for p in reads] == ["sample_000000.npy"]
    dataset[17]
    assert [p.name for p in reads][1:] == ["sample_000017.npy"]


# -- the LR schedule -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        ["training.num_train_steps=10", "training.warmup_steps=2", "optimizer.lr=1.0"],
        ["training.num_train_steps=5000", "training.warmup_steps=1000", "optimizer.lr=5e-5"],
        ["training.num_train_steps=300", "training.warmup_steps=7", "optimizer.lr=3e-4"],
        [
            "training.num_train_steps=50",
            "training.warmup_steps=0",
            "optimizer.lr=3e-4",
            "training.lr_schedule=constant",
        ],
    ],
)
def test_lr_scheduler_gives_learning_rate(overrides):
    """LambdaLR multiplies the base by learning_rate/base: equal to learning_rate() to the last bit
    or one unit in it (measured: 332 of 100000 steps differ by 1 ulp, in the warmup)."""
    settings = LoopSettings.from_config(load_config(config_path("stable"), overrides))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=settings.lr)
    scheduler = build_lr_scheduler(optimizer, settings)
    got = []
    for _ in range(settings.num_train_steps + 3):  # past the end: cosine stays at 0
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [learning_rate(step, settings) for step in range(len(got))]
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), **tol("lr_lambda_rounding")
    )
    assert len(set(got)) > (1 if "constant" not in overrides[-1] else 0)


def test_scheduler_state_travels_in_the_train_state(runs, tmp_path):
    dirs, data_dirs = runs
    state = torch.load(train_state_path(ckpt(dirs["first"], 3)), weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == 3 and state["lr_scheduler"]["base_lrs"] == [1e-3]
    settings = LoopSettings.from_config(stable_config())
    assert [m["lr"] for m in metrics(dirs["full"])] == pytest.approx(
        [learning_rate(step, settings) for step in range(8)], rel=2.3e-16, abs=0.0
    )

    with pytest.raises(TrainingError, match=r"base learning rate 0.001, this run has optimizer.lr=0.002"):
        train(stable_config("optimizer.lr=2e-3"), tmp_path / "other_lr", data_dirs, resume=ckpt(dirs["first"], 3))

    old = tmp_path / "old" / ckpt(dirs["first"], 3).name  # a train state without the scheduler
    old.parent.mkdir()
    shutil.copy(ckpt(dirs["first"], 3), old)
    del state["lr_scheduler"]
    torch.save(state, train_state_path(old))
    with pytest.raises(TrainingError, match="has no lr_scheduler.*--init-from"):
        train(stable_config(), tmp_path / "old_run", data_dirs, resume=old)


# -- the DDP timeout -------------------------------------------------------------------------------
def test_ddp_timeout_comes_from_the_config(tmp_path, monkeypatch):
    """Rank 0 of 2 alone: the process group does not form, and the run fails after
    training.ddp_timeout_minutes (3 s here), not after the default 30 minutes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(key, value)
    config = load_config(config_path("stable"), TINY + ["training.ddp_timeout_minutes=0.05"])
    started = time.monotonic()
    with pytest.raises(
        TrainingError,
        match=r"rank 0 of 2 could not form the process group .* within 0:00:03 "
        r"\(training.ddp_timeout_minutes\)",
    ):
        run_training(config, trainer=STABLE, output_dir=tmp_path / "run", synthetic=True, progress=False, device="cpu")
    assert time.monotonic() - started < 30


def test_ddp_timeout_setting_is_checked():
    from latentDLM_mmdit.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"training.ddp_timeout_minutes=0.0 \(from override\) must be a finite number > 0"
    ):
        load_config(config_path("stable"), ["training.ddp_timeout_minutes=0"])
    assert LoopSettings.from_config(load_config(config_path("stable"), [])).ddp_timeout.total_seconds() == 1800


def test_file_pairs_are_compact_and_exact(tmp_path):
    """3000 pairs (only the first is read): the dataset holds their paths in well under 150 bytes a
    pair (a list of Path tuples took ~560), so forked loader workers share them; every pair is
    the right one, `_tokens` suffix or not."""
    import tracemalloc

    token_dir, latent_dir = write_data(tmp_path / "data", n=1)
    for i in range(1, 3000):
        stem = f"sample_{i:06d}"
        (token_dir / (f"{stem}_tokens.npz" if i % 2 else f"{stem}.npz")).touch()
        (latent_dir / f"{stem}.npy").touch()
    vocab = vocab_from_config(load_config(config_path("stable"), TINY))
    UpstreamLatentDataset(token_dir, latent_dir, 32, vocab)  # first-use imports and caches, not measured
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        dataset = UpstreamLatentDataset(token_dir, latent_dir, 32, vocab)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(dataset) == 3000 and held / 3000 < 150, f"{held / 3000:.0f} bytes a pair"
    assert dataset.pairs[1] == (token_dir / "sample_000001_tokens.npz", latent_dir / "sample_000001.npy")
    assert dataset.pairs[2] == (token_dir / "sample_000002.npz", latent_dir / "sample_000002.npy")
    assert dataset.pairs[-1] == dataset.pairs[2999] and dataset.pairs[2999][1].name == "sample_002999.npy"
    with pytest.raises(DataError, match=r"sample_000002.npz cannot be read as .npz"):
        dataset[2]
    with pytest.raises(IndexError):
        dataset.pairs[3000]
