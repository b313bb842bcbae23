"""Bench figure `loader_feed`: does the data loader feed the model?

Writes upstream-format files (`<stem>_tokens.npz` + `<stem>.npy`) into the workdir, then measures
samples/s of the training loop's `BatchFeed` (DataLoader over `UpstreamLatentDataset`, the run's
data order) with 0 and with N reader processes, and samples/s of the stable trainer's optimizer
step (forward, backward, AdamW; l2t and t2l alternating, as the default schedule) on the same batch
size, on CUDA when available. The ratio is loader samples/s / step samples/s: below 1 the model
waits for data (raise data.num_workers); the target is >= 1.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from bench.results import line


def _write_files(config, n: int, seq_len: int, root: Path) -> tuple[Path, Path]:
    from latentDLM_mmdit.data import write_upstream_format
    from latentDLM_mmdit.draws import make_generator
    from latentDLM_mmdit.synthetic import synthetic_batch
    from latentDLM_mmdit.tokenizer import vocab_from_config

    token_dir, latent_dir = root / "tokens", root / "latents"
    if token_dir.is_dir() and len(list(token_dir.iterdir())) == n:
        return token_dir, latent_dir  # written by an earlier run of this figure
    batch = synthetic_batch(vocab_from_config(config), n, seq_len, int(config.model.latent_dim), make_generator(0))
    return write_upstream_format(root, batch)


def _loader_rate(dataset, batch_size: int, workers: int, batches: int, device: torch.device) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch) of a BatchFeed."""
    from latentDLM_mmdit.training import BatchFeed, BatchOrder

    feed = BatchFeed(
        dataset, BatchOrder(len(dataset), batch_size, 1, 0, seed=0), num_workers=workers, device=device, seed=0
    )
    started = time.perf_counter()
    feed.next_batch()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        feed.next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = batches * batch_size / (time.perf_counter() - started)
    feed.close()
    return rate, first


def _step_rate(config, dataset, batch_size: int, steps: int, device: torch.device) -> tuple[float, int]:
    """(samples/s of the stable trainer's optimizer step, median over steps with l2t and t2l
    alternating; the model's parameter count)."""
    from latentDLM_mmdit.data import collate
    from latentDLM_mmdit.factory import build_model
    from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
    from latentDLM_mmdit.training import build_trainer

    model = build_model(config, seed=0).to(device).train()
    trainer = build_trainer(config, MultimodalDiffusionTrainer, model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in collate([dataset[i] for i in range(batch_size)]).items()}
    seconds = []
    for step in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer(batch, step=step)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            seconds.append(time.perf_counter() - started)
    return batch_size / statistics.median(seconds), sum(p.numel() for p in model.parameters())


def loader_figures(small: bool, workdir: Path) -> list[str]:
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import load_config
    from latentDLM_mmdit.data import UpstreamLatentDataset
    from latentDLM_mmdit.tokenizer import vocab_from_config

    sizes = (
        ["model.hidden_size=64", "model.cond_dim=64", "model.n_blocks=2", "model.max_seq_len=128"]
        if small
        else ["model.hidden_size=256", "model.cond_dim=256", "model.n_blocks=4", "model.max_seq_len=512"]
    )
    config = load_config(config_path("stable"), sizes)
    seq_len, batch_size = (128, 8) if small else (512, 16)
    n_files, batches, steps = (64, 8, 2) if small else (2048, 64, 8)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    token_dir, latent_dir = _write_files(config, n_files, seq_len, workdir / f"loader-data-{seq_len}")
    dataset = UpstreamLatentDataset(token_dir, latent_dir, int(config.model.max_seq_len), vocab_from_config(config))
    step, params = _step_rate(config, dataset, batch_size, steps, device)
    workers = max(1, min(4, (os.cpu_count() or 1) - 1))
    out = []
    for n in (0, workers):
        rate, first = _loader_rate(dataset, batch_size, n, batches, device)
        out.append(
            line(
                f"loader_feed_w{n}",
                rate / step,
                "target >= 1.0",
                f"loader {rate:.0f} samples/s ({n} workers, first batch {first:.2f} s) vs step "
                f"{step:.0f} samples/s on {device.type} ({params / 1e6:.1f}M params, B={batch_size}, "
                f"S={seq_len}, {n_files} file pairs)",
                rate >= step,
            )
        )
    return out
