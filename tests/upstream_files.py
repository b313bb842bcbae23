"""What a user of upstream gates, written at test time: a BERT-style tokenizer folder, upstream-layout
data and a stable-trainer checkpoint saved exactly as upstream's `save_checkpoint` writes it, next to
upstream's own configs in `tests/data/upstream_files/` (model shrunk, nothing else changed).

    python -m tests.upstream_files OUT_DIR     # writes tok/, data/, checkpoint/step_5/checkpoint.pt

Nothing here is downloaded: the tokenizer's 30,522 ids are BERT's layout ([PAD] 0, [UNK] 100, [CLS]
101, [SEP] 102, [MASK] 103) with placeholder words.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.tokenizer import SyntheticVocab, read_tokenizer_folder

FILES = Path(__file__).resolve().parent / "data" / "upstream_files"
STABLE_CONFIG = FILES / "stable" / "mmdit_stable.yaml"
CYCLE_CONFIGS = {"cluster": FILES / "mmdit_cycle_vae_cluster.yaml", "default": FILES / "mmdit_cycle_vae.yaml"}
BERT_VOCAB = 30522
BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
FIRST_WORD = 999  # ids below are BERT's [unused*] and specials
UPSTREAM_MODULE = "latentDLM_mmdit.checkpoints_mmdit"
PRETRAIN_STEPS = 5


@dataclasses.dataclass
class TrainingState:  # upstream's record, as its checkpoints module defines it
    epoch: int = 0
    epoch_start_step: int = 0
    step: int = 0
    total_tokens: int = 0
    total_flops: float = 0.0
    start_time: float = 0.0
    curr_time: float = 0.0


def write_tokenizer(folder: Path) -> Path:
    """A BERT-style slow-tokenizer folder (vocab.txt, special_tokens_map.json, tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = [BERT_SPECIALS.get(i, f"[unused{i}]" if i < FIRST_WORD else f"w{i}") for i in range(BERT_VOCAB)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "mask_token": "[MASK]"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **specials}))
    return folder


def write_data(folder: Path, latent_dim: int, samples: int = 16, seq_len: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Upstream-layout data: tokens/<stem>_tokens.npz (input_ids, attention_mask) and latents/<stem>.npy."""
    tokens, latents = folder / "tokens", folder / "latents"
    tokens.mkdir(parents=True, exist_ok=True)
    latents.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(samples):
        length = int(rng.integers(seq_len // 3, seq_len))  # padded tails: the padding checks see them
        ids = np.zeros(seq_len, np.int64)
        ids[:length] = rng.integers(FIRST_WORD, BERT_VOCAB, length)
        mask = (np.arange(seq_len) < length).astype(np.int64)
        np.savez(tokens / f"s{i:03d}_tokens.npz", input_ids=ids, attention_mask=mask)
        np.save(latents / f"s{i:03d}.npy", rng.standard_normal(latent_dim).astype(np.float32))
    return tokens, latents


def save_like_upstream(folder: Path, trainer, optimizer, state) -> Path:
    """upstream's checkpoints_mmdit.save_checkpoint: checkpoint.pt with the trainer's state dict, the
    optimizer state, a TrainingState instance and config None. TrainingState lives in a module of
    upstream's name only while saving (so that nothing can import it while loading)."""
    fake = types.ModuleType(UPSTREAM_MODULE)
    TrainingState.__module__ = UPSTREAM_MODULE
    fake.TrainingState = TrainingState
    previous = sys.modules.get(UPSTREAM_MODULE)
    sys.modules[UPSTREAM_MODULE] = fake
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model_state_dict": trainer.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "state": state,
                "config": None,
            },
            folder / "checkpoint.pt",
        )
    finally:
        TrainingState.__module__ = __name__
        if previous is None:
            del sys.modules[UPSTREAM_MODULE]
        else:
            sys.modules[UPSTREAM_MODULE] = previous
    return folder / "checkpoint.pt"


def write_checkpoint(folder: Path, tokenizer: Path, stable_config: Path = STABLE_CONFIG) -> Path:
    """A few steps of the stable trainer (upstream's l2t mode) from `stable_config`, saved as upstream
    does; returns the checkpoint folder."""
    config = load_config(stable_config, tokenizer_dir=tokenizer)
    read = read_tokenizer_folder(tokenizer)
    vocab = SyntheticVocab(read.vocab_size, read.mask_token_id, read.pad_token_id)
    model = build_model(config, seed=3)
    trainer = MultimodalDiffusionTrainer(model, vocab, MaskedDiffusion(vocab), torch.float32, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    latent_dim = int(config.model.latent_dim)
    for _ in range(PRETRAIN_STEPS):
        ids = torch.randint(FIRST_WORD, read.vocab_size, (2, 32), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        loss, _ = trainer({**batch, "latent": torch.randn(2, 1, latent_dim, generator=gen)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step = folder / f"step_{PRETRAIN_STEPS}"
    save_like_upstream(step, trainer, optimizer, TrainingState(step=PRETRAIN_STEPS))
    return step


def write_all(out: Path) -> dict[str, Path]:
    """The tokenizer folder, data and checkpoint a user of upstream holds, under `out`."""
    tokenizer = write_tokenizer(out / "tok")
    latent_dim = int(load_config(STABLE_CONFIG, tokenizer_dir=tokenizer).model.latent_dim)
    tokens, latents = write_data(out / "data", latent_dim)
    return {
        "tokenizer": tokenizer,
        "tokens": tokens,
        "latents": latents,
        "checkpoint": write_checkpoint(out / "checkpoint", tokenizer),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.upstream_files OUT_DIR")
    for name, path in write_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
