"""Row: mixed precision (autocast).

A cluster run trains under `torch.autocast` (`training.mixed_precision`, bf16 unless the cycle config
says fp16): matmuls in the low dtype, losses and weights in float32. On the same batch and injected
draws, with both trainers run under the autocast the training loop uses (`latentDLM_mmdit.precision`):

- autocast_exercised: every model pass of both trainers really ran under autocast (its outputs are
  in the autocast dtype): a trainer that turns autocast off (or casts its model to float32) would
  train at another precision than the one it is judged at;
- autocast_matches_fp32: every loss and the gradients of every parameter of stable l2t, stable t2l
  and the cycle trainer in full mode (all four terms) are within the table's autocast tolerances of
  the float32 run; the drift of each trainer is measured, and the cycle trainer's (its t2l and l2t
  terms, like for like, and its gradients) may not exceed the stable trainer's by more than the
  table's factor (the cycle trainer must not be the one that drifts);
- losses_computed_in_float32: the stable reference's loss under autocast equals the float64 oracle
  recomputed from the outputs it observed (a loss reduced in the low dtype fails); the cycle
  trainer's is measured the same way (its latent weights raised so that its latent terms dominate
  its total) and a reduction in the low dtype is REVIEW: CUDA autocast runs mse_loss and
  cross_entropy in float32 by itself, CPU autocast does not;
- bf16_cast_matches_fp32: `training.dtype: bf16` (the trainers cast their inputs, upstream's setting)
  with a bfloat16 copy of the model gives the float32 losses within `tol('bfloat16')`.

A `gpu` test in this module (skipped without CUDA) compares CUDA float32 and CUDA autocast against
CPU float32. The draws are made on the CPU and injected, so every device sees the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from compat.harness import AUTOCAST_TOLERANCES, row_runner, row_settings, row_test, sensitivity_control
from compat.oracle import TOLERANCES, tol
from compat.outcomes import control_failed, expect
from compat.terms import cycle_terms, stable_terms
from latentDLM_mmdit.factory import dtype_from_config
from latentDLM_mmdit.precision import autocast, autocast_dtype

pytestmark = pytest.mark.compat_row("mixed_precision")

SEED = 100
CYCLE = row_settings(
    dict(
        latent_t_mode="full",
        cycle_text_weight=0.5,
        cycle_latent_weight=0.5,
        cycle_latent_sampling="argmax",
        cycle_text_warmup_steps=0,
        cycle_text_ramp_steps=0,
        cycle_latent_warmup_steps=0,
        cycle_latent_ramp_steps=0,
    )
)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SETTINGS = ("stable_l2t", "stable_t2l", "cycle")
# The reduction check weighs the latent terms up so that they dominate the cycle step's total: a latent
# MSE reduced in bfloat16 must move the returned loss visibly, not vanish beside the text terms.
CYCLE_LATENT_HEAVY = row_settings({**CYCLE, "latent_loss_weight": 100.0, "cycle_latent_weight": 100.0})


def mixed_precision_of(ctx) -> str:
    """The autocast a cluster run of the user's cycle config uses: its own, or bf16 when it has none."""
    mode = str(ctx.cycle_config.training.get("mixed_precision", "no"))
    return mode if mode != "no" else "bf16"


def run_setting(ctx, model, device, name, *, mixed_precision="no", dtype=torch.float32, grad=False, cycle=CYCLE):
    """One setting (stable_l2t, stable_t2l or cycle) on the row's batch and draws, under
    `mixed_precision` autocast, with the trainer's `training.dtype` set to `dtype`: (record, config, batch)."""
    batch = {k: v.to(device) for k, v in ctx.batch(ctx.options.batch_size, seed=SEED).items()}
    draws = {k: v.to(device) for k, v in ctx.draws(batch, seed=SEED).items()}
    override = {"training.dtype": DTYPE_NAMES[dtype]}
    with autocast(mixed_precision, device):
        if name == "cycle":
            record = ctx.run_cycle(batch, settings={**cycle, **override}, draws=draws, model=model, grad=grad)
        else:
            mode = name.removeprefix("stable_")
            record = ctx.run_stable(mode, batch, settings=override, draws=draws, model=model, grad=grad)
    config = (
        ctx.cycle_config_for({**cycle, **override})
        if name == "cycle"
        else ctx.stable_config_for(name.removeprefix("stable_"), override)
    )
    return record, config, batch


def run_all(ctx, model, device, *, mixed_precision="no", dtype=torch.float32, grad=False, cycle=CYCLE) -> dict:
    """The three settings on the same batch and draws (see `run_setting`): {setting: (record, config, batch)}."""
    return {
        name: run_setting(
            ctx, model, device, name, mixed_precision=mixed_precision, dtype=dtype, grad=grad, cycle=cycle
        )
        for name in SETTINGS
    }


def oracle_terms(ctx, name, record, config, batch, tolerance):
    x0 = ctx.x0_of(batch, dtype_from_config(config))  # as this run's training.dtype fed it
    if name == "cycle":
        return cycle_terms(record, batch, config, None, x0, tolerance)
    return stable_terms(record, batch, config, name.removeprefix("stable_"), x0, tolerance)


def setting_values(ctx, name, run, tolerance) -> dict[str, float]:
    """A setting's returned loss and, for the cycle step, each term recomputed by the oracle from its passes."""
    record, config, batch = run
    out = {f"{name}.loss": float(record.loss)}
    if name == "cycle":
        terms = oracle_terms(ctx, "cycle", record, config, batch, tolerance)
        out.update({f"cycle.{t}": float(getattr(terms, t)) for t in ("t2l", "l2t", "cycle_text", "cycle_latent")})
    return out


def loss_values(ctx, runs, tolerance) -> dict[str, float]:
    """Every returned loss and every cycle term (recomputed by the oracle from the observed passes)."""
    return {
        key: value for name, run in runs.items() for key, value in setting_values(ctx, name, run, tolerance).items()
    }


def gradients(model, record) -> torch.Tensor:
    """The flattened gradient of the step's loss with respect to every parameter (zeros where unused)."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]  # a stable mode freezes a group for its step
    found = dict(zip(map(id, trained), torch.autograd.grad(record.loss, trained, allow_unused=True)))
    return torch.cat(
        [
            (found.get(id(p)) if found.get(id(p)) is not None else torch.zeros_like(p)).float().reshape(-1)
            for p in params
        ]
    )


def compare(got: dict[str, float], want: dict[str, float], tolerance: str, what: str, measure) -> dict[str, float]:
    rtol_atol = tol(tolerance)
    worst: dict[str, float] = {}
    bad = []
    for key, ref in want.items():
        value = got[key]
        rel = abs(value - ref) / max(abs(ref), 1e-12)
        setting = key.split(".")[0]
        worst[setting] = max(worst.get(setting, 0.0), rel)
        if not abs(value - ref) <= rtol_atol["atol"] + rtol_atol["rtol"] * abs(ref):
            bad.append(f"{key}: {value:.6g} vs float32 {ref:.6g} (rel {rel:.2e})")
    for setting, rel in worst.items():
        measure(f"{what}_{setting}_max_rel", rel)
    expect(
        not bad,
        f"the losses under {what} differ from the float32 losses by more than {tolerance} allows "
        f"(rtol {rtol_atol['rtol']}, atol {rtol_atol['atol']})",
        "compute the losses in float32 from the low-precision outputs, and keep the weights in float32",
        "; ".join(bad),
    )
    return worst


def check_autocast_exercised(ctx, measure):
    mode = mixed_precision_of(ctx)
    want = autocast_dtype(mode)
    runs = run_all(ctx, ctx.semantic_model(), ctx.device, mixed_precision=mode)
    measure("autocast", f"{mode} ({str(want).removeprefix('torch.')}, {ctx.device.type})")
    wrong = [
        f"{name} pass {p.kind} returned {sorted({str(o.dtype) for o in p.outputs})}"
        for name, (r, _, _) in runs.items()
        for p in r.passes
        if {o.dtype for o in p.outputs if o.is_floating_point()} != {want}
    ]
    expect(
        not wrong,
        f"under training.mixed_precision {mode} a trainer's model passes do not compute in {want} (it turned "
        "autocast off or ran its model in float32)",
        "run every model pass inside the loop's autocast (no autocast(enabled=False), no .float() model)",
        "; ".join(wrong),
    )


def check_autocast_matches_fp32(ctx, measure):
    mode = mixed_precision_of(ctx)
    model = ctx.fresh_semantic_model()
    loss_tol = AUTOCAST_TOLERANCES[mode][0]
    # One graph at a time, freed as its gradient is taken (with a 30k vocabulary a graph's saved logits are
    # the row's largest cost).
    want, got, grads32, grads_amp = {}, {}, {}, {}
    for name in SETTINGS:
        run = run_setting(ctx, model, ctx.device, name, grad=True)
        want.update(setting_values(ctx, name, run, ctx.oracle_tolerance))
        grads32[name] = gradients(model, run[0])
        run = run_setting(ctx, model, ctx.device, name, mixed_precision=mode, grad=True)
        got.update(setting_values(ctx, name, run, loss_tol))
        grads_amp[name] = gradients(model, run[0])
        del run
    if got == want:
        control_failed(f"the {mode} autocast run gave exactly the float32 losses: autocast was not exercised")
    drift = compare(got, want, loss_tol, AUTOCAST_TOLERANCES[mode][0], measure)
    rtol, atol = TOLERANCES[AUTOCAST_TOLERANCES[mode][1]]
    bad = []
    grad_drift = {}
    for name in SETTINGS:
        g32, gamp = grads32[name], grads_amp[name]
        rel = float((gamp - g32).norm() / g32.norm().clamp_min(1e-30))
        grad_drift[name] = rel
        measure(f"autocast_{mode}_grad_{name}_rel", rel)
        if not rel <= rtol:
            bad.append(f"{name}: ||g_{mode} - g_fp32|| / ||g_fp32|| = {rel:.3g} > {rtol}")
    expect(
        not bad,
        f"the gradients under {mode} autocast drift from float32 beyond {AUTOCAST_TOLERANCES[mode][1]}",
        "keep weights and gradients in float32 and reduce the losses in float32",
        "; ".join(bad),
    )
    factor = TOLERANCES["autocast_drift_factor"][0]
    # Like for like: the cycle step's own t2l and l2t terms against the stable steps' losses (its
    # cycle terms chain two passes, so they drift more by construction; they are bounded above).
    base = {key: abs(got[key] - want[key]) / max(abs(want[key]), 1e-12) for key in ("cycle.t2l", "cycle.l2t")}
    drift = {**drift, "cycle": max(base.values())}
    measure(f"autocast_{mode}_loss_cycle_base_terms_max_rel", drift["cycle"])
    stable_loss = max(drift["stable_l2t"], drift["stable_t2l"])
    stable_grad = max(grad_drift["stable_l2t"], grad_drift["stable_t2l"])
    floor_loss, floor_grad = tol(loss_tol)["rtol"] / 10, rtol / 10
    expect(
        drift["cycle"] <= factor * max(stable_loss, floor_loss),
        f"under {mode} autocast the cycle trainer's base losses drift {drift['cycle']:.3g} from float32, more than "
        f"{factor} x the stable trainer's {stable_loss:.3g}",
        "compute the cycle trainer's terms as the stable trainer does under autocast (losses in float32)",
    )
    expect(
        grad_drift["cycle"] <= factor * max(stable_grad, floor_grad),
        f"under {mode} autocast the cycle trainer's gradients drift {grad_drift['cycle']:.3g} from float32, more "
        f"than {factor} x the stable trainer's {stable_grad:.3g}",
        "compute the cycle trainer's terms as the stable trainer does under autocast (losses in float32)",
    )


def check_losses_computed_in_float32(ctx, measure):
    mode = mixed_precision_of(ctx)
    runs = run_all(ctx, ctx.semantic_model(), ctx.device, mixed_precision=mode, cycle=CYCLE_LATENT_HEAVY)
    limit = tol("autocast_loss_reduction")
    bad, low = [], {}
    for name, (record, config, batch) in runs.items():
        terms = oracle_terms(ctx, name, record, config, batch, AUTOCAST_TOLERANCES[mode][0])
        got, want = float(record.loss), float(terms.total)
        rel = abs(got - want) / max(abs(want), 1e-12)
        measure(f"{name}_loss_vs_oracle_rel", rel)
        if not abs(got - want) <= limit["atol"] + limit["rtol"] * abs(want):
            (bad if name.startswith("stable") else low.setdefault(name, [])).append(
                f"{name}: returned {got:.7g}, oracle from its own {mode} outputs {want:.7g} (rel {rel:.2e})"
            )
    expect(
        not bad,
        "under autocast the stable reference reduces its loss in the low dtype, not in float32 from the model's "
        "outputs (tol('autocast_loss_reduction'))",
        "cast the model's outputs to float32 before the loss reduction (.float())",
        "; ".join(bad),
    )
    if low:
        # The cycle trainer's own loss code: CUDA autocast runs mse_loss and cross_entropy in float32 by
        # itself, CPU autocast does not, so a reduction in the low dtype here is a risk, not a verdict.
        measure(
            "cycle_loss_reduced_in_low_precision",
            "; ".join(low["cycle"]) + " (cast the outputs with .float() "
            "before the loss to be the same on every device)",
            review=True,
        )


def check_bf16_cast_matches_fp32(ctx, measure):
    fp32 = loss_values(ctx, run_all(ctx, ctx.semantic_model(), ctx.device), ctx.oracle_tolerance)
    bf16_model = ctx.fresh_semantic_model().to(torch.bfloat16)
    runs = run_all(ctx, bf16_model, ctx.device, dtype=torch.bfloat16)
    fed = {str(t.dtype) for r, _, _ in runs.values() for p in r.passes for t in (p.text_t, p.latent_t) if t is not None}
    expect(
        fed == {"torch.bfloat16"},
        f"with training.dtype bf16 the trainers feed the model timesteps in {sorted(fed)}",
        "cast latents and timesteps to training.dtype before the model",
    )
    bf16 = loss_values(ctx, runs, "bfloat16")
    if bf16 == fp32:
        control_failed("the bfloat16 run gave exactly the float32 losses: bfloat16 was not exercised")
    compare(bf16, fp32, "bfloat16", "bf16_cast", measure)


CHECKS = {
    "control_sensitivity": sensitivity_control("text_t", "latent_t", "latents", "text"),
    "autocast_exercised": check_autocast_exercised,
    "autocast_matches_fp32": check_autocast_matches_fp32,
    "losses_computed_in_float32": check_losses_computed_in_float32,
    "bf16_cast_matches_fp32": check_bf16_cast_matches_fp32,
}


def check_cuda_matches_cpu(ctx, measure):
    """CUDA float32 and CUDA autocast against CPU float32 (the `gpu` test)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    mode = mixed_precision_of(ctx)
    want = loss_values(ctx, run_all(ctx, ctx.fresh_semantic_model().to(cpu), cpu), ctx.oracle_tolerance)
    got32 = loss_values(ctx, run_all(ctx, ctx.fresh_semantic_model().to(cuda), cuda), "cuda_float32")
    compare(got32, want, "cuda_float32", "cuda_fp32", measure)
    got_amp = loss_values(
        ctx, run_all(ctx, ctx.fresh_semantic_model().to(cuda), cuda, mixed_precision=mode), AUTOCAST_TOLERANCES[mode][0]
    )
    compare(got_amp, want, AUTOCAST_TOLERANCES[mode][0], f"cuda_autocast_{mode}", measure)


GPU_CHECKS = {
    "cuda_matches_cpu": check_cuda_matches_cpu,
}


run_row = row_runner(CHECKS)
test_mixed_precision = row_test(CHECKS)


test_mixed_precision_gpu = pytest.mark.gpu(row_test(GPU_CHECKS))
