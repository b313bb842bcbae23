"""Golden values of the shared reference components, recorded by this project and committed.

The reference integrity row compares the shared components (noise schedules, masking, the loss
helpers, a model forward) with the float64 oracle AND with these recorded values, so that a change
to code both trainers share fails even where the oracle agrees with itself. Re-record deliberately
(after a reviewed change of the reference) with

    python -m compat.reference_golden --write

which rewrites `compat/data/reference_golden.json`; without `--write` it prints the differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "reference_golden.json"
SCHEDULES = ("linear", "cosine", "sigmoid")
T = 1000
INDICES = (0, 1, 250, 499, 998, 999)
MODEL_CONFIG = {
    "hidden_size": 32,
    "n_blocks": 1,
    "cond_dim": 32,
    "max_seq_len": 8,
    "dropout": 0.0,
    "num_residual_streams": 2,
    "qk_rmsnorm": True,
}
MODEL_SIZES = {"vocab_size": 12, "latent_dim": 6, "cluster_size": 0}
MODEL_SEED = 7


def golden_model():
    """The tiny model of the golden forward: fixed config and seed, every weight perturbed so that
    the zero-initialised time gates do not hide a change."""
    from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
    from latentDLM_mmdit.seeding import seed_everything

    seed_everything(MODEL_SEED)
    model = MultimodalMMDiT(MODEL_CONFIG, **MODEL_SIZES).eval()
    gen = torch.Generator().manual_seed(MODEL_SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def golden_inputs() -> dict:
    gen = torch.Generator().manual_seed(MODEL_SEED + 1)
    ids = torch.randint(0, MODEL_SIZES["vocab_size"], (2, MODEL_CONFIG["max_seq_len"]), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {
        "text_tokens": ids,
        "latents": torch.randn(2, 1, MODEL_SIZES["latent_dim"], generator=gen),
        "text_timesteps": torch.tensor([0.25, 0.8]),
        "latent_timesteps": torch.tensor([0.9, 0.1]),
        "attention_mask": mask,
    }


def record() -> dict:
    """The values as the installed reference computes them."""
    from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion

    out: dict = {"alphas_cumprod": {}}
    for schedule in SCHEDULES:
        ab = ContinuousDiffusion(T, schedule).alphas_cumprod
        out["alphas_cumprod"][schedule] = {str(i): float(ab[i]) for i in INDICES}
    with torch.no_grad():
        text_logits, latent_pred = golden_model()(**golden_inputs())
    out["model_forward"] = {
        "text_logits[:, :3, :5]": text_logits[:, :3, :5].tolist(),
        "latent_pred": latent_pred.tolist(),
    }
    from latentDLM_mmdit.checkpoints import installed_versions

    out["recorded_with"] = {k: installed_versions()[k] for k in ("torch", "mmdit", "hyper-connections")}
    return out


def load() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compat.reference_golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN_PATH.name}")
    args = parser.parse_args(argv)
    fresh = record()
    if args.write:
        GOLDEN_PATH.write_text(json.dumps(fresh, indent=1) + "\n")
        print(f"wrote {GOLDEN_PATH}")
        return 0
    same = GOLDEN_PATH.exists() and load() == fresh
    print("golden values unchanged" if same else f"golden values differ from {GOLDEN_PATH} (re-record with --write)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
