"""Row: dtype (bfloat16).

Cluster runs feed the model in bfloat16 (`training.dtype: bf16`) while the stable checkpoint and the
compat reference are float32. Both trainers must give the float32 losses within bfloat16 tolerance
(`tol('bfloat16')`) on the same batch and noise, term by term: stable l2t, stable t2l and the cycle
trainer in full mode with both cycle weights > 0 (all four terms). The bfloat16 run uses a
bfloat16 copy of the pretrained model and the trainers' own dtype setting; it must really run in
bfloat16 (the model is fed bfloat16 latents and timesteps, and the losses are not the float32 ones).

A `gpu` test in this module (skipped without CUDA) compares CUDA float32 against CPU float32 within
`tol('cuda_float32')`, and CUDA bfloat16 against CPU float32 within `tol('bfloat16')`, for the same
losses. The draws are made on the CPU and injected, so every device sees the same numbers.
"""
from __future__ import annotations

import pytest
import torch

from compat.harness import row_runner, row_settings, row_test, sensitivity_control
from compat.terms import cycle_terms
from compat.oracle import tol

pytestmark = pytest.mark.compat_row("dtype")

SEED = 100
CYCLE = row_settings(dict(latent_t_mode="full", cycle_text_weight=0.5, cycle_latent_weight=0.5, cycle_latent_sampling="argmax",
             cycle_text_warmup_steps=0, cycle_text_ramp_steps=0, cycle_latent_warmup_steps=0, cycle_latent_ramp_steps=0))
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def losses(ctx, model, dtype: torch.dtype, device: torch.device, spy: bool = False) -> dict[str, float]:
    """Every loss term of the three settings, with the trainers' dtype set to `dtype`, on `device`:
    the returned losses and each term recomputed by the oracle from the observed passes. Same batch
    and CPU-drawn draws whatever the device."""
    batch = {k: v.to(device) for k, v in ctx.batch(ctx.options.batch_size, seed=SEED).items()}
    draws = {k: v.to(device) for k, v in ctx.draws(batch, seed=SEED).items()}
    override = {"training.dtype": DTYPE_NAMES[dtype]}
    records = {
        "stable_l2t": ctx.run_stable("l2t", batch, settings=override, draws=draws, model=model, grad=False),
        "stable_t2l": ctx.run_stable("t2l", batch, settings=override, draws=draws, model=model, grad=False),
        "cycle": ctx.run_cycle(batch, settings={**CYCLE, **override}, draws=draws, model=model, grad=False),
    }
    x0 = ctx.x0_of(batch)
    out: dict[str, float] = {f"{name}.loss": float(r.loss) for name, r in records.items()}
    terms = cycle_terms(records["cycle"], batch, ctx.cycle_config_for({**CYCLE, **override}), None, x0,
                        "bfloat16" if dtype != torch.float32 else ctx.oracle_tolerance)
    out.update({f"cycle.{name}": float(getattr(terms, name)) for name in ("t2l", "l2t", "cycle_text", "cycle_latent")})
    if spy:
        fed = {str(t.dtype) for r in records.values() for p in r.passes for t in (p.text_t, p.latent_t)
               if t is not None}
        assert fed == {str(dtype)}, (f"trainers with training.dtype={DTYPE_NAMES[dtype]} fed the model timesteps "
                                     f"in {sorted(fed)}")
        # The stable t2l noises in the schedule's float32 (as upstream) and the model casts the latents.
        out["latents_fed"] = ",".join(sorted({str(p.latents.dtype).removeprefix("torch.")
                                              for r in records.values() for p in r.passes}))
    return out


def compare(got: dict[str, float], want: dict[str, float], tolerance: str, what: str, measure) -> None:
    rtol_atol = tol(tolerance)
    worst: dict[str, float] = {}
    bad = []
    for key, ref in want.items():
        if not isinstance(ref, float):
            continue
        value = got[key]
        rel = abs(value - ref) / max(abs(ref), 1e-12)
        setting = key.split(".")[0]
        worst[setting] = max(worst.get(setting, 0.0), rel)
        if not abs(value - ref) <= rtol_atol["atol"] + rtol_atol["rtol"] * abs(ref):
            bad.append(f"{key}: {value:.6g} vs float32 {ref:.6g} (rel {rel:.2e})")
    for setting, rel in worst.items():
        measure(f"{what}_{setting}_max_rel", rel)
    assert not bad, (f"{what} differs from the float32 reference beyond tol('{tolerance}') "
                     f"(rtol {rtol_atol['rtol']}, atol {rtol_atol['atol']}): " + "; ".join(bad))


def check_bf16_matches_fp32(ctx, measure):
    reference = ctx.semantic_model()
    fp32 = losses(ctx, reference, torch.float32, ctx.device)
    bf16_model = ctx.fresh_semantic_model().to(torch.bfloat16)
    bf16 = losses(ctx, bf16_model, torch.bfloat16, ctx.device, spy=True)
    measure("bf16_latents_fed", bf16.pop("latents_fed"))
    assert bf16 != fp32, "the bfloat16 run gave exactly the float32 losses: bfloat16 was not exercised"
    compare(bf16, fp32, "bfloat16", "bf16", measure)


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t", "latents", "text"),
    "bf16_matches_fp32": check_bf16_matches_fp32,
}


def check_cuda_matches_cpu(ctx, measure):
    """CUDA float32 and bfloat16 against CPU float32 (the `gpu` test)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    want = losses(ctx, ctx.fresh_semantic_model().to(cpu), torch.float32, cpu)
    got32 = losses(ctx, ctx.fresh_semantic_model().to(cuda), torch.float32, cuda, spy=True)
    got32.pop("latents_fed")
    compare(got32, want, "cuda_float32", "cuda_fp32", measure)
    got16 = losses(ctx, ctx.fresh_semantic_model().to(cuda, torch.bfloat16), torch.bfloat16, cuda, spy=True)
    got16.pop("latents_fed")
    compare(got16, want, "bfloat16", "cuda_bf16", measure)


GPU_CHECKS = {
    "cuda_matches_cpu": check_cuda_matches_cpu,
}


run_row = row_runner(CHECKS)
test_dtype = row_test(CHECKS)


test_dtype_gpu = pytest.mark.gpu(row_test(GPU_CHECKS))
