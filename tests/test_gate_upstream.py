"""The gate on upstream's own formats, untouched: a checkpoint folder written the way upstream's
stable training script writes it (`save_checkpoint(output_path, trainer, optimizer, state)`:
`checkpoint.pt` holding the trainer's state dict, the optimizer state, a `TrainingState` dataclass
instance and `config: None`), upstream's Hydra config folder shape for the stable config, an
upstream-shaped cycle config, and a tokenizer folder for the ids. The verdicts must be the
compatibility findings, never a format difference:

- upstream's cycle defaults (latent_t_mode random): T2L timestep and recommended settings
  INCOMPATIBLE, nothing else;
- epsilon + cosine + `latent_t_mode: full` with cycle_text on: x0 reconstruction INCOMPATIBLE,
  nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.tokenizer import read_tokenizer_folder
from tests.upstream_files import TrainingState, save_like_upstream

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
STABLE_YAML = DATA / "upstream_configs" / "mmdit_stable_tiny.yaml"
CYCLE_YAML = DATA / "upstream_configs" / "mmdit_cycle_vae_tiny.yaml"
TOKENIZER = DATA / "tokenizers" / "bert_tiny"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory):
    """A few upstream-style stable steps on the tiny upstream-shaped config, saved as upstream does."""
    folder = tmp_path_factory.mktemp("upstream_run")
    config = load_config(STABLE_YAML, tokenizer_dir=TOKENIZER)
    vocab = read_tokenizer_folder(TOKENIZER)
    model = build_model(config, seed=3)
    trainer = MultimodalDiffusionTrainer(
        model, config_vocab(config), MaskedDiffusion(config_vocab(config)), torch.float32, config
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(4, vocab.vocab_size, (2, 12), generator=gen)
        loss, _ = trainer(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "latent": torch.randn(2, 1, int(config.model.latent_dim), generator=gen),
            }
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = save_like_upstream(folder / "step_3", trainer, optimizer, TrainingState(step=3, epoch=0))
    return {"folder": checkpoint.parent, "config": config}


def config_vocab(config):
    from latentDLM_mmdit.tokenizer import SyntheticVocab

    return SyntheticVocab(
        int(config.tokenizer.vocab_size), int(config.tokenizer.mask_token_id), int(config.tokenizer.pad_token_id)
    )


def digest(paths: list[Path]) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def run_gate(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "compat", "--report", str(report), "--quiet", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    matrix = json.loads((report / "compat-matrix.json").read_text())
    return proc.returncode, matrix, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "cycle_overrides, incompatible",
    [
        ({}, {"t2l_latent_timestep", "recommended_settings"}),
        ({"loss": {"latent_t_mode": "full"}}, {"x0_reconstruction"}),
    ],
    ids=["upstream-cycle-defaults", "epsilon-cosine-full"],
)
def test_gate_on_upstream_files(tmp_path, upstream_run, cycle_overrides, incompatible):
    cycle_yaml = CYCLE_YAML
    if cycle_overrides:
        cycle_yaml = tmp_path / "cycle.yaml"
        OmegaConf.save(OmegaConf.merge(OmegaConf.load(CYCLE_YAML), cycle_overrides), cycle_yaml)
    inputs = [upstream_run["folder"], STABLE_YAML.parent, CYCLE_YAML, TOKENIZER]
    before = digest(inputs)
    code, matrix, output = run_gate(
        tmp_path,
        "--checkpoint",
        str(upstream_run["folder"]),
        "--stable-config",
        str(STABLE_YAML),
        "--cycle-config",
        str(cycle_yaml),
        "--tokenizer",
        str(TOKENIZER),
    )
    rows = {r["id"]: r for r in matrix["rows"]}
    got = {r for r, v in rows.items() if v["verdict"] == "INCOMPATIBLE"}
    assert got == incompatible, {r: rows[r]["measured"][:300] for r in got ^ incompatible}
    assert code == 1, output[-3000:]
    not_run = {r: v["measured"] for r, v in rows.items() if v["verdict"] == "NOT RUN"}
    assert not not_run, not_run
    assert digest(inputs) == before, "an input file changed"
    pretrained = rows["pretrained_checkpoint"]["measured"]
    assert "upstream training script (TrainingState step 3)" in pretrained
    assert "model_state_dict of checkpoint.pt" in pretrained and "optimizer_state_dict" in pretrained
    assert "tokenizer folder" in matrix["context"]["vocabulary"]


def test_gate_without_the_ids_names_what_to_pass(tmp_path, upstream_run):
    code, matrix, output = run_gate(
        tmp_path,
        "--checkpoint",
        str(upstream_run["folder"]),
        "--stable-config",
        str(STABLE_YAML),
        "--cycle-config",
        str(CYCLE_YAML),
    )
    assert code == 2, output[-3000:]
    assert "--tokenizer DIR" in " ".join(output.split()) and "--mask-token-id" in output
    assert all(r["verdict"] == "NOT RUN" for r in matrix["rows"])
