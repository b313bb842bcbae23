"""torch.compile of the trainers: the loop's `training.compile_model`, and the cycle trainer's
schedule kept out of the traced step (weights as tensors, the exact floats in the metrics)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from compat.oracle import tol
from cycle_vae_impl.configs import config_path
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.settings import ConfigError, validate_settings
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import run_training
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from tests.builders import TINY_MODEL, TINY_VOCAB, tiny_model

TINY = ["model.n_blocks=1", "model.hidden_size=32", "model.cond_dim=32", "model.max_seq_len=16"]
needs_dynamo = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported here")


def _run(tmp_path, name, extra):
    config = load_config(
        config_path("stable"),
        TINY
        + [
            "loss.loss_type=l2t",
            "training.num_train_steps=3",
            "logging.save_every=0",
            "data.synthetic_seq_len=8",
            "training.train_batch_size=2",
        ]
        + extra,
    )
    return run_training(
        config, trainer=STABLE, output_dir=tmp_path / name, synthetic=True, progress=False, device="cpu"
    )


@pytest.mark.slow
@needs_dynamo
def test_the_loop_compiles_the_trainer_and_trains_as_eager(tmp_path):
    """training.compile_model runs every step through torch.compile(trainer): the same losses and
    gradient norms as the eager loop (aot_eager: eager kernels), and checkpoints with the bare names."""
    torch._dynamo.reset()
    eager = _run(tmp_path, "eager", [])
    compiled = _run(tmp_path, "compiled", ["training.compile_model=true", "training.compile_backend=aot_eager"])
    assert len(compiled.metrics) == len(eager.metrics) == 3
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([m[key] for m in compiled.metrics], dtype=torch.float64),
            torch.tensor([m[key] for m in eager.metrics], dtype=torch.float64),
            **tol("compiled_aot_eager"),
        )
    from safetensors import safe_open

    with safe_open(str(compiled.checkpoints[-1]), "pt") as f:
        names = list(f.keys())
    assert names and not any("_orig_mod" in n for n in names), names[:3]


def test_compile_backend_is_checked_against_the_schema():
    config = OmegaConf.to_container(load_config(config_path("stable")), resolve=True)
    config["training"]["compile_backend"] = "indcutor"
    with pytest.raises(ConfigError, match="compile_backend"):
        validate_settings(config, "test")
    config["training"]["compile_backend"] = "aot_eager"
    config["training"]["compile_model"] = True
    assert validate_settings(config, "test").config.training.compile_model is True


def _cycle_trainer(settings: dict) -> CycleVAETrainer:
    config = {
        "model": dict(TINY_MODEL, latent_dim=4),
        "loss": {"loss_type": "cycle_vae", "latent_t_mode": "full", **settings},
        "training": {"seed": 0},
        "tokenizer": {
            "vocab_size": len(TINY_VOCAB),
            "mask_token_id": TINY_VOCAB.mask_token_id,
            "pad_token_id": TINY_VOCAB.pad_token_id,
        },
    }
    return CycleVAETrainer(tiny_model(), TINY_VOCAB, MaskedDiffusion(TINY_VOCAB), torch.float32, config)


@pytest.mark.parametrize("step, text, latent", [(0, 0.0, 0.0), (2, 0.1, 0.0), (5, 0.3, 0.15), (50, 0.3, 0.3)])
def test_cycle_weights_enter_the_step_as_tensors_and_the_metrics_keep_the_exact_floats(step, text, latent):
    trainer = _cycle_trainer(
        dict(
            cycle_text_weight=0.3,
            cycle_text_warmup_steps=1,
            cycle_text_ramp_steps=3,
            cycle_latent_weight=0.3,
            cycle_latent_warmup_steps=3,
            cycle_latent_ramp_steps=4,
        )
    )
    w_text, w_latent, text_on, latent_on = trainer.term_weights(step)
    for w, want in ((w_text, text), (w_latent, latent)):
        assert torch.is_tensor(w) and w.dim() == 0 and w.dtype == torch.float32
        torch.testing.assert_close(float(w), want, **tol("float32_arithmetic"))  # rounded to float32
    assert (text_on, latent_on) == (text > 0.0, latent > 0.0)
    assert trainer.last_weights == pytest.approx((text, latent), rel=1e-12, abs=0.0)
