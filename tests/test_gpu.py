"""CUDA against CPU (marked `gpu`; skipped cleanly where CUDA is absent).

The trainers draw on a CPU generator and move the draws, so a CUDA step sees exactly the random
numbers a CPU step sees; differences come only from the kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compat.oracle import tol
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.tokenizer import SyntheticVocab
from tests.builders import TINY_MODEL, tiny_batch, tiny_model

pytestmark = pytest.mark.gpu

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "upstream_parity" / "tiny_eps_cosine.safetensors"
# Larger than the CPU tests' tiny model (hidden 64, 2 blocks, V 48): enough work for the CUDA kernels to differ.
CONFIG = dict(TINY_MODEL, hidden_size=64, n_blocks=2, cond_dim=64, max_seq_len=16)
VOCAB = SyntheticVocab(48, mask_token_id=47, pad_token_id=0)
FP32 = tol("cuda_float32")  # CUDA kernels vs CPU, float32 (TF32 off)
BF16 = tol("bfloat16")  # bfloat16 model vs float32 reference


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_model() -> MultimodalMMDiT:
    return tiny_model(0, vocab_size=len(VOCAB), latent_dim=8, base=CONFIG).eval()


def batch_on(device) -> dict:
    batch = tiny_batch(3, 12, 8, 0, VOCAB)
    return {k: v.to(device) for k, v in batch.items()}


def losses(model, device, dtype=torch.float32) -> dict[str, float]:
    model = model.to(device)
    batch = batch_on(device)
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in ("l2t", "t2l", "unconditional"):
        trainer = MultimodalDiffusionTrainer(
            model, VOCAB, MaskedDiffusion(VOCAB).to(device), dtype, {"loss": {"loss_type": mode}}
        )
        draws = {} if mode == "l2t" else {"latent_noise": noise}
        out[mode] = float(trainer(batch, draws=draws)[0])
    for p in model.parameters():
        p.requires_grad_(True)
    cycle = CycleVAETrainer(
        model,
        VOCAB,
        MaskedDiffusion(VOCAB).to(device),
        dtype,
        {
            "loss": {
                "loss_type": "cycle_vae",
                "latent_t_mode": "full",
                "cycle_text_weight": 0.5,
                "cycle_latent_weight": 0.5,
            }
        },
    )
    out["cycle"] = float(cycle(batch, step=None, draws={"latent_noise": noise, "cycle_latent_noise": noise})[0])
    return out


def test_trainer_losses_cuda_float32_match_cpu():
    want = losses(make_model(), "cpu")
    got = losses(make_model(), "cuda")
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), **FP32)


def test_trainer_losses_cuda_bfloat16_match_cpu_float32():
    want = losses(make_model(), "cpu")
    got = losses(make_model().to(torch.bfloat16), "cuda", torch.bfloat16)
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), **BF16)


@pytest.mark.skipif(not PARITY.exists(), reason=f"parity fixture {PARITY} is absent")
def test_upstream_parity_forward_on_cuda():
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = json.loads(safe_open(str(PARITY), "pt").metadata()["config"])
    tensors = load_file(str(PARITY))
    model_config = {k: v for k, v in config.items() if k not in ("vocab_size", "mask_token_id", "latent_loss_weight")}
    model = MultimodalMMDiT(model_config, config["vocab_size"], config["latent_dim"], config["cluster_size"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model = model.eval().cuda()
    ids, mask, latent = (tensors[f"inputs.{k}"].cuda() for k in ("input_ids", "attention_mask", "latent"))
    with torch.no_grad():
        text_logits, latent_pred = model(ids, latent, None, None, mask)
    torch.testing.assert_close(text_logits.cpu(), tensors["forward.none_none.text_logits"], **FP32)
    torch.testing.assert_close(latent_pred.cpu(), tensors["forward.none_none.latent_pred"], **FP32)


def test_training_step_on_cuda_updates_weights():
    model = make_model().train().cuda()
    trainer = CycleVAETrainer(
        model,
        VOCAB,
        MaskedDiffusion(VOCAB).cuda(),
        torch.float32,
        {
            "loss": {
                "loss_type": "cycle_vae",
                "latent_t_mode": "full",
                "cycle_text_weight": 0.1,
                "cycle_latent_weight": 0.1,
            }
        },
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, metrics = trainer(batch_on("cuda"), step=None)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and metrics["model_passes"] == 4
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "latent_head.3.weight" in changed and "text_head.weight" in changed
