"""Independent re-derivations of what the trainers compute, written from the papers and the
upstream facts, not from this project's library code. The rows compare the trainers against
these, so a defect planted in a shared library function cannot hide by being on both sides.

Everything here runs in float64 where it can; comparisons use the tolerances in `TOLERANCES`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

# Unit roundoff u (half the machine epsilon) of the dtypes the trainers compute in: a correctly rounded
# operation returns x(1 + d) with |d| <= u.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of `dtype` (float64, float32, float16, bfloat16)."""
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"no unit roundoff for {dtype}; known: {', '.join(map(str, UNIT_ROUNDOFF))}")
    return UNIT_ROUNDOFF[dtype]


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n rounded operations in a
    row (a sum of n + 1 terms in any order); inf once n u >= 1 (the bound says nothing)."""
    return n * u / (1 - n * u) if n * u < 1 else math.inf


@dataclass(frozen=True)
class Derived:
    """A tolerance that follows from the computation compared (dtype, number of terms, magnitudes)
    rather than a constant: `bound(**quantities)` gives (rtol, atol) for one comparison; `formula`
    states it and `reason` why it bounds the difference of two correct computations.

    Args:
        formula: the bound as written in the docs and in the row's measured values.
        reason: what makes two correct computations differ, and by at most this.
        bound: the quantities of the comparison -> (rtol, atol).
    """

    formula: str
    reason: str
    bound: Callable[..., tuple[float, float]]


def _float_norm_bound(n_max: int, n_tensors: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    u = unit_roundoff(dtype)
    return (gamma(n_max + 1, u) + gamma(n_tensors + 1, u)) / 2 + 2 * u, 0.0


def _update_bound(steps: int, weight_norm: float, update_norm: float, rtol_update: float) -> tuple[float, float]:
    return rtol_update, (steps + 1) * unit_roundoff(torch.float32) * weight_norm


def _loss_drift_bound(grad_norm: float, weight_drift: float, n_terms: int, dtype: torch.dtype) -> tuple[float, float]:
    return gamma(n_terms, unit_roundoff(dtype)), grad_norm * weight_drift


def _gain_measurement_bound(
    dtype: torch.dtype, x0_norm: float, delta_norm: float, gain: float, n_ops: int = 4
) -> tuple[float, float]:
    u = unit_roundoff(dtype)
    # Both runs' x0 carry a rounding error of at most n_ops u |x0| (the cast to `dtype` and the float32
    # arithmetic before it); the measured change gain |delta| is off by at most their sum.
    return 2 * n_ops * u * x0_norm / max(gain * delta_norm, 1e-300) + gamma(n_ops, 2.0**-24), 0.0


# One table of tolerances for every comparison the suite makes: (rtol, atol) constants, and `Derived`
# bounds computed from each comparison's own dtype, sizes and magnitudes (`derived_tol`).
TOLERANCES = {
    "bit_exact": (0.0, 0.0),
    "float32_loss": (1e-5, 1e-5),  # the same computation, reordered
    "float32_batching": (1e-5, 1e-5),  # batched vs one-at-a-time matmuls (TESTING_FACTS)
    "float32_oracle": (1e-4, 1e-5),  # float64 oracle vs float32 trainer
    # x0 from a float32 prediction for t < 0.99: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) multiplies the
    # float32 rounding of x_t and the prediction (2^-24 relative) by 1/sqrt(ab) <= 64 (cosine at t = 0.99),
    # and the difference of two terms of similar size loses their magnitude: absolute 1e-4 near x0 ~ 0.
    "float32_x0_from_prediction": (1e-4, 1e-4),
    "bfloat16": (1.6e-2, 1e-2),  # bfloat16 vs float32 losses
    "cuda_float32": (1e-4, 1e-4),  # CUDA kernels vs CPU
    # torch.autocast runs vs float32 (matmuls in the low dtype, losses reduced in float32).
    "autocast_bf16_loss": (1.6e-2, 1e-2),  # bfloat16 keeps 8 mantissa bits: 2^-7 relative per matmul
    "autocast_fp16_loss": (2e-3, 1e-3),  # float16 keeps 11 bits
    "autocast_bf16_grad": (8e-2, 0.0),  # ||g_amp - g_fp32|| / ||g_fp32|| over all parameters
    "autocast_fp16_grad": (1e-2, 0.0),
    # A trainer's loss under autocast against the float64 oracle on the SAME low-precision outputs:
    # a float32 reduction agrees to ~1e-7, one in bfloat16 misses by ~1e-3 (measured 4.8e-4).
    "autocast_loss_reduction": (1e-5, 1e-7),
    # The cycle trainer's drift from float32 under autocast may be at most this multiple of the
    # stable trainer's (the larger of its l2t and t2l drifts; floored at a tenth of the tolerance).
    "autocast_drift_factor": (3.0, 0.0),
    # LambdaLR's base * factor against learning_rate()'s own product: one unit in the last place.
    "lr_lambda_rounding": (2.3e-16, 0.0),
    # -- the training loop against the float64 replay of its optimizer (compat/trajectories.py) -----------
    # The loop logs torch's float32 total gradient norm (clip_grad_norm_: a norm per tensor, then the
    # norm of those); the replay sums the squares in float64. A float32 sum of n terms in any order is
    # within gamma_{n-1} of the exact sum (Higham 2002, eq. 4.4), a square root halves a relative error:
    # the bound grows with the largest tensor (torch's CPU vector_norm measured 2.6e-5 off at 2M values,
    # 1.7e-3 at 31M, both inside it).
    "trajectory_grad_norm": Derived(
        "(gamma(n_max + 1) + gamma(n_tensors + 1)) / 2 + 2u, u = 2^-24, n_max = the largest gradient tensor",
        "float32 reduction order and rounding against a float64 sum of the same gradients",
        _float_norm_bound,
    ),
    # Weights: the loop keeps float32 weights and AdamW state, the replay float64 master weights; each
    # step rounds every weight to float32 (u |w|), K + 1 roundings in all (the replay's final copy is
    # float32 too). On top, Adam divides each gradient by its own magnitude: a weight whose gradient is
    # within float32 noise of 0 can take its +-lr step either way, so the update's norm may differ by a
    # small fraction (rtol_update, below) of the update ||w_K - w_0|| itself. An optimizer defect (a
    # beta, the clipping norm, the schedule, a skipped accumulation) moves the update by 10% or more.
    "trajectory_weights": Derived(
        "||w_loop - w_replay|| <= (K + 1) u ||w|| + rtol_update ||w_replay - w_0||, u = 2^-24",
        "float32 storage of the loop's weights (K + 1 roundings) and sign flips of Adam steps on ~0 gradients",
        _update_bound,
    ),
    # The share of the update norm that Adam steps on ~0 gradients may flip (float32 gradients: last-bit
    # differences), and under autocast (bfloat16 kernels on the CPU are not bit-reproducible, and a
    # gradient differs by ~2^-8 relative: many more weights have a gradient within noise of 0).
    "trajectory_update_float32": (1e-2, 0.0),
    "trajectory_update_autocast": (1e-1, 0.0),
    # A logged loss against the replay's at the same step: the two runs' weights differ by the drift
    # above (first order: ||grad|| ||w_loop - w_replay||) and the loss is a float32 reduction over the
    # vocabulary and the batch (the same order on both sides: gamma_n covers reordering by another
    # torch build). Under autocast the autocast_*_loss entry applies instead.
    "trajectory_loss": Derived(
        "|L_loop - L_replay| <= ||grad|| drift + gamma(V + B S) |L|, drift = the weights bound at that step",
        "first-order effect of the weights' drift on the loss, and float32 reduction of the loss",
        _loss_drift_bound,
    ),
    # The x0 error gain measured through the trainer (a perturbation of the T2L prediction, the change of
    # the x0 fed to cycle_text observed) against its closed form. x0 = a x_t + b prediction is affine, so
    # the ratio is exact up to rounding: each run's fed x0 carries the trainer dtype's rounding (the cast
    # before the pass, a few float32 operations before it), n_ops u |x0| each; the perturbation is sized
    # so that this stays far below the change itself (bfloat16: 2^-8 relative of an x0 of ~6.4e4).
    "x0_gain_measurement": Derived(
        "2 n_ops u_fed ||x0|| / (gain ||delta||) + gamma(n_ops) float32, n_ops = 4, u_fed = the fed x0's dtype",
        "rounding of the reconstructed x0 to the dtype it is fed in, against the change the perturbation makes",
        _gain_measurement_bound,
    ),
    # The K steps moved the weights measurably when their update exceeds the float32 storage noise of
    # the weights by this factor (else the loop vs replay comparison could not tell a defect from noise).
    "trajectory_min_update": (20.0, 0.0),
    # A run against its committed golden values (another CPU may reorder float32 sums).
    "golden_trajectory": (1e-4, 1e-6),
    # The cycle run's base losses (stable l2t / t2l on a held-out batch) may rise at most this much
    # (relative) above the stable continuation's after K steps; gradient-norm spikes above the
    # factor times the stable run's largest are REVIEW.
    "trajectory_base_rise": (0.25, 0.0),
    "trajectory_grad_spike": (10.0, 0.0),
    # torch.compile of a trainer vs the same trainer eager. aot_eager and eager run eager kernels
    # (AOTAutograd's decompositions may reorder a reduction); inductor fuses and reorders float32 sums.
    "compiled_eager": (1e-6, 1e-7),
    "compiled_aot_eager": (1e-5, 1e-6),
    "compiled_inductor": (1e-4, 1e-5),
    # Recompilations of a compiled cycle step over a warmup + ramp schedule: one per term turning on.
    "compile_max_recompiles": (2, 0),
    # The control of a semantics row: an input the row compares must move the model's outputs by at
    # least this relative change (100 x the float32 loss tolerance), or the row could pass blind.
    "sensitivity": (1e-3, 0.0),
    # The resources row's budgets (rtol; bytes and FLOPs counted exactly). What the cycle trainer's own
    # code saves for backward vs what the stable trainer saves for the same loss terms: the cycle step's
    # own extras are a few [B, D] tensors (x0 reconstruction, weighted sums), 3% of the budget on the
    # tiny default's [B, S, V=64] cross entropies, nothing at a real vocabulary.
    "resources_saved_budget": (0.05, 0.0),
    # The cycle step's FLOPs vs its passes' stable counterparts: a pass's backward differs from its
    # counterpart's by the groups the stable mode freezes (the latent encoder's weight gradients in
    # l2t): 0.1% on the tiny default; a pass for a term weighted 0 adds 25-50%.
    "resources_flops_budget": (0.02, 0.0),
    # Bytes the FakeTensorMode trace counts as saved for backward vs what autograd saves in a real run
    # of the same step (tests/test_resources.py): the same tensors, but a CPU kernel returns some 0-dim
    # results inside the storage of its [B, D] work buffer (96 B where the fake tensor has 4): 184 B
    # of 2.9 MB on the tiny cycle step.
    "resources_saved_vs_real": (1e-3, 0.0),
    # The traced estimate vs torch.cuda.max_memory_allocated of a real step (tests/test_resources.py,
    # gpu): the issue's 10%; CUDA kernels' workspaces (cuBLAS) and CPU-vs-CUDA autocast op lists differ.
    "resources_cuda_peak": (0.10, 0.0),
    # -- used by the unit tests (tests/) -----------------------------------------------------------
    # A few float32 adds and multiplies of O(1) values vs the same arithmetic in another order or in
    # float64 (a loss total rebuilt from its logged terms, x_t from its formula): a few ulp.
    "float32_arithmetic": (1e-6, 1e-6),
    # A float32 alphas_cumprod table, or a value derived from it, vs the float64 oracle: relative down to
    # its smallest entries (~1e-9); measured 6.3e-5 on the cosine tail, 1.1e-4 on sqrt((1 - ab) / ab).
    "float32_schedule_table": (3e-4, 1e-12),
    # A closed form vs its leading-order approximation, the dropped factor 1 - O(1e-4) (e.g. sqrt(1 - ab)).
    "leading_order": (1e-3, 0.0),
    # A batch split over DDP ranks or accumulation steps and averaged back vs the whole batch at once
    # (loss, gradients): other matmul shapes and another summation order.
    "float32_split_batch": (1e-5, 1e-6),
    # One float32 closed form (a few elementwise ops) vs the same formula in float64; where the values'
    # magnitude is known, the test scales atol by it (`scaled_tol`).
    "float32_formula": (1e-5, 1e-6),
    # A float32 result whose rounding is amplified ~100x: log1p near -1 (sigma at t = 1), a loss's
    # last-bit difference carried through backward into the gradients.
    "float32_amplified": (1e-4, 1e-6),
    # This repo's forward pass and stable step vs the values upstream's code recorded: the same
    # weights, inputs and library versions, another torch build.
    "upstream_parity": (1e-5, 1e-5),
    # Weights after a few optimizer steps at lr 1e-12 vs before them: each step moves a weight ~1e-11.
    "negligible_update": (0.0, 1e-9),
}


# Statistical checks: significance level, sample size and the alternative the power is stated for.
STATISTICS = {
    "categorical_sampling": {
        "alpha": 1e-3,  # a correct sampler fails 1 run in 1000 (runs are seeded: deterministic)
        "min_draws": 3000,  # pseudo tokens drawn (steps x batch_size x S)
        "batch_size": 64,  # at most this many samples per step (fewer when S is long: ~min_draws a run)
        # and at most this many values per [B, S, V] logits tensor of a step (32 MiB of float32): a step
        # makes four such passes, so a 30k vocabulary at S = 128 takes 2 samples a step, not 24
        "max_logit_values": 2**23,
        "bins": 10,  # chi-square bins of the probability integral transform
        "alternative_temperature": 2.0,  # the power is stated against sampling softmax(logits / 2)
    },
    "stable_random_modes": {
        "alpha": 1e-3,  # a correct draw fails 1 run in 1000 (seeded: deterministic)
        "draws": 2000,  # modes drawn by the stable trainer in `random` mode
    },
}


def tol(name: str) -> dict[str, float]:
    entry = TOLERANCES[name]
    if isinstance(entry, Derived):
        raise TypeError(f"tolerance {name!r} is derived ({entry.formula}): use derived_tol({name!r}, ...)")
    rtol, atol = entry
    return {"rtol": rtol, "atol": atol}


def derived_tol(name: str, **quantities) -> dict[str, float]:
    """The derived tolerance `name` for one comparison, from its `quantities` (see the entry's formula)."""
    entry = TOLERANCES[name]
    if not isinstance(entry, Derived):
        raise TypeError(f"tolerance {name!r} is a constant: use tol({name!r})")
    rtol, atol = entry.bound(**quantities)
    return {"rtol": rtol, "atol": atol}


def scaled_tol(name: str, atol_scale: float) -> dict[str, float]:
    """tol(name) with its atol multiplied by `atol_scale`: for values whose magnitude or error
    amplification the caller knows (e.g. 1 / sqrt(alphas_cumprod)); the table's atol is then per
    unit of that scale. rtol is unchanged."""
    if not math.isfinite(atol_scale) or atol_scale <= 0:
        raise ValueError(f"scaled_tol({name!r}): atol_scale must be a finite number > 0, got {atol_scale!r}")
    rtol, atol = TOLERANCES[name]
    return {"rtol": rtol, "atol": atol * atol_scale}


def alphas_cumprod(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """alphas_cumprod in float64 for the linear, cosine (Nichol & Dhariwal 2021, s=0.008, betas
    clipped to [1e-4, 0.9999]) and sigmoid schedules."""
    T = num_timesteps
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        x = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos(((x / T) + s) / (1 + s) * math.pi / 2) ** 2
        f = f / f[0]
        betas = (1 - f[1:] / f[:-1]).clamp(1e-4, 0.9999)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"oracle: unknown schedule {schedule!r}")
    return torch.cumprod(1 - betas, dim=0)


def timestep_index(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Continuous t in [0, 1] -> floor(t * (T - 1))."""
    return (t.double() * (num_timesteps - 1)).floor().long().clamp(0, num_timesteps - 1)


def noised(x0: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, ab [B] broadcast over [B, D]."""
    ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()


def target(x0: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor, parameterization: str) -> torch.Tensor:
    ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
    if parameterization == "epsilon":
        return noise.double()
    if parameterization == "x0":
        return x0.double()
    if parameterization == "v_param":
        return ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()
    raise ValueError(f"oracle: unknown parameterization {parameterization!r}")


def x0_from_prediction(
    xt: torch.Tensor, prediction: torch.Tensor, ab: torch.Tensor, parameterization: str
) -> torch.Tensor:
    """Solves x_t = sqrt(ab) x0 + sqrt(1-ab) eps for x0 given eps, v (= sqrt(ab) eps - sqrt(1-ab) x0)
    or x0 itself."""
    ab = ab.reshape(-1, *([1] * (xt.dim() - 1)))
    xt, prediction = xt.double(), prediction.double()
    if parameterization == "epsilon":
        return (xt - (1 - ab).sqrt() * prediction) / ab.sqrt()
    if parameterization == "v_param":
        return ab.sqrt() * xt - (1 - ab).sqrt() * prediction
    if parameterization == "x0":
        return prediction
    raise ValueError(f"oracle: unknown parameterization {parameterization!r}")


def normalized_mse(prediction: torch.Tensor, target_: torch.Tensor) -> torch.Tensor:
    """mean((p/|p| - y/|y|)^2) per upstream (eps 1e-8), each sample's [D] vector on its own:
    prediction [B,1,D] or [B,D], target [B,D] or [B,1,D]."""
    p = prediction.double().reshape(prediction.shape[0], -1)
    y = target_.double().reshape(target_.shape[0], -1)
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return ((p - y) ** 2).mean().clamp(0, 10)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[ids] per position in float64, logits [B, S, V] and ids [B, S] -> [B, S],
    computed in blocks of positions (`PIT_BLOCK_VALUES` float64 values at a time): a 30k vocabulary
    makes a float64 [B, S, V] table alone the size of several model passes."""
    B, S, V = logits.shape
    flat, targets = logits.reshape(B * S, V), ids.reshape(B * S)
    out = torch.empty(B * S, dtype=torch.float64)
    for a, b in _row_blocks(B * S, V):
        logp = torch.log_softmax(flat[a:b].double(), dim=-1)  # [R, V]
        out[a:b] = -logp.gather(-1, targets[a:b, None].to(logp.device)).squeeze(-1).cpu()
    return out.reshape(B, S)


def ce_every_position(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token-mean cross entropy over all B*S positions (padding included), clamped to [0, 100]."""
    return _nll(logits, ids).mean().clamp(0, 100)


def masked_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Upstream's masked cross entropy: the summed NLL of the positions in `mask` over (their count,
    at least 1) + 1e-8, clamped to [0, 100]. Every id is a real class (no ignore index)."""
    nll = _nll(logits, ids)  # [B, S]
    count = max(int(mask.sum()), 1) + 1e-8
    return ((nll * mask.double().cpu()).sum() / count).clamp(0, 100)


def token_accuracy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the positions in `mask` whose argmax is the target; 0.0 for an empty mask."""
    hits = [bool(logits[b, s].argmax() == ids[b, s]) for b, s in mask.nonzero().tolist()]
    return sum(hits) / len(hits) if hits else 0.0


def ramp(step: int, base: float, warmup: int, ramp_steps: int) -> float:
    if base <= 0 or step < warmup:
        return 0.0
    if ramp_steps <= 0:
        return base
    return base * min(1.0, (step - warmup) / ramp_steps)


# float64 values held at once per [rows, V] block of the categorical checks (32 MiB): their memory is
# bounded whatever the vocabulary (a 30k vocabulary and 3,000 draws would otherwise hold GiBs).
PIT_BLOCK_VALUES = 2**22


def _row_blocks(rows: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, PIT_BLOCK_VALUES // vocab)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _pit_at(logits: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """PIT values of ids [R, K] under softmax(logits [R, V]) at the uniforms u [R, K] -> [R, K]."""
    probs = torch.softmax(logits.double(), dim=-1)  # [R, V]
    p = probs.gather(-1, ids)  # [R, K]
    cdf_below = probs.cumsum(-1).gather(-1, ids) - p  # [R, K]
    return (cdf_below + u * p).clamp(0.0, 1.0 - 1e-12)


def categorical_pit(logits: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomised probability integral transform of sampled ids under softmax(logits): for ids
    drawn from that categorical distribution the values are U[0, 1), whatever the distribution of
    each position. logits [N, V], ids [N] -> [N] float64 (computed in blocks of rows)."""
    u = torch.rand(ids.shape, generator=generator, dtype=torch.float64)  # [N]
    out = torch.empty(ids.shape, dtype=torch.float64)
    for a, b in _row_blocks(logits.shape[0], logits.shape[-1]):
        out[a:b] = _pit_at(logits[a:b], ids[a:b, None], u[a:b, None]).squeeze(-1)
    return out


def uniformity_chi2(values: torch.Tensor, bins: int) -> tuple[float, float]:
    """(chi-square statistic, p-value) of `values` against U[0, 1) in `bins` equal bins (scipy.stats)."""
    from scipy import stats

    counts = torch.histc(values.float(), bins=bins, min=0.0, max=1.0).double()
    result = stats.chisquare(counts.numpy())
    return float(result.statistic), float(result.pvalue)


def wrong_sampler_pit(
    logits: torch.Tensor, temperature: float, generator: torch.Generator, repeats: int = 200
) -> torch.Tensor:
    """PIT values under softmax(logits) of `repeats` ids per row drawn from softmax(logits /
    temperature) instead (by inverse CDF): what `uniformity_chi2` sees from a sampler at the wrong
    temperature. logits [N, V] -> [N, repeats] float64 (computed in blocks of rows)."""
    rows, vocab = logits.shape
    sample_u = torch.rand((rows, repeats), generator=generator, dtype=torch.float64)  # inverse-CDF draws
    pit_u = torch.rand((rows, repeats), generator=generator, dtype=torch.float64)
    pit = torch.empty((rows, repeats), dtype=torch.float64)
    for a, b in _row_blocks(rows, vocab):  # ids from the wrong distribution by its inverse CDF
        wrong_cdf = torch.softmax(logits[a:b].double() / temperature, dim=-1).cumsum(-1)  # [R, V]
        ids = torch.searchsorted(wrong_cdf, sample_u[a:b].contiguous()).clamp(max=vocab - 1)  # [R, repeats]
        pit[a:b] = _pit_at(logits[a:b], ids, pit_u[a:b])
    return pit


def rejection_rate(pit: torch.Tensor, alpha: float, bins: int) -> float:
    """Share of the columns of `pit` [N, repeats] whose `uniformity_chi2` rejects at `alpha`: the
    test's power against the alternative the columns were drawn from (`wrong_sampler_pit`)."""
    rejected = sum(uniformity_chi2(pit[:, r], bins)[1] < alpha for r in range(pit.shape[1]))
    return rejected / pit.shape[1]


def categorical_power(
    logits: torch.Tensor, temperature: float, alpha: float, bins: int, repeats: int = 200, seed: int = 0
) -> float:
    """Share of `repeats` simulated runs in which `uniformity_chi2` on the PIT rejects at `alpha`
    when the ids are drawn from softmax(logits / temperature) instead: the test's power against
    that mistake, at this sample size and on these logits. logits [N, V]."""
    gen = torch.Generator().manual_seed(seed)
    return rejection_rate(wrong_sampler_pit(logits, temperature, gen, repeats), alpha, bins)


def sequential_mode(schedule: list[tuple[str, int, int]], step: int | None, epoch: int) -> str:
    """The stable trainer's mode in `sequential` loss_type: `schedule` [(mode, steps, epochs)] run
    in turn, cyclically, each for `steps` optimizer steps (when the step is known) or `epochs`
    epochs (else); an empty schedule is `unconditional`."""
    if not schedule:
        return "unconditional"
    lengths = [steps if step is not None else epochs for _, steps, epochs in schedule]
    position = (step if step is not None else epoch) % sum(lengths)
    for (mode, _, _), end in zip(schedule, itertools.accumulate(lengths)):
        if position < end:
            return mode
    raise AssertionError("unreachable: position < sum(lengths)")


def move_chance(t: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """MDLM's masking probability at t: 1 - exp(-sigma), sigma = -log1p(-(1 - eps) clip(t, eps, 1)), float64."""
    sigma = -torch.log1p(-(1 - eps) * t.double().clamp(eps, 1))
    return 1 - torch.exp(-sigma)
