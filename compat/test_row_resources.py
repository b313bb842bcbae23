"""Row: resources.

Will the cycle run fit, and what will it cost? Peak memory per rank and FLOPs of one stable step
(each mode its schedule runs) and of one cycle step with the weights at their largest (a step past
every warmup and ramp), at the config's full size: the real model (`model.*`, the checkpoint's
vocabulary and latent width), `training.train_batch_size`, the sequence length (`--seq-len`, else the
data files' length, else `model.max_seq_len`), `training.dtype`, `training.mixed_precision`,
gradient accumulation, clipping and AdamW as the loop builds them. Each step is traced under
FakeTensorMode (`compat/resources.py`: nothing is allocated, the trainer under test is driven through
the same protocol as in every row; a small step, such as the tiny default's, is run for real and
counted the same way) and its memory split into parameters, gradients, optimizer state, activations
and temporaries.

- memory: the headline numbers; the cycle trainer's own code (between model passes: losses,
  reconstructions) may save for backward at most what its loss terms need, i.e. what the stable
  trainer saves for the same losses (L2T and cycle_text: stable l2t's cross entropy; T2L and
  cycle_latent: stable t2l's latent MSE), within `resources_saved_budget`: more is a graph kept past a
  stop-grad.
- flops: the cycle step costs at most the passes its weights need (T2L + L2T, + cycle_text /
  cycle_latent while weighted > 0), each at its stable counterpart's FLOPs, within
  `resources_flops_budget`: with the weights at their largest and at the schedule's first step.
- fit (`--gpu-memory`, or the CUDA device's memory): INCOMPATIBLE when the cycle step does not fit
  where the stable step did, naming the largest per-rank batch that fits and the accumulation that
  keeps the global batch; REVIEW with less than 10% free.
- cost (`--gpu-tflops`): GPU-hours per rank for `training.num_train_steps`, stable vs cycle, at an
  assumed utilisation.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)

from compat.harness import row_runner, row_test
from compat.inputs import gpu_memory_bytes
from compat.oracle import TOLERANCES
from compat.outcomes import cannot_check, expect, incompatible, not_applicable
from compat.resources import (
    ASSUMED_MFU,
    GRADIENTS,
    HEADROOM_REVIEW,
    OPTIMIZER,
    OWN_CODE,
    PARAMETERS,
    REAL_STEP_BYTES,
    REAL_STEP_FLOPS,
    RowMeasurements,
    StepCost,
    batch_candidates,
    ddp_bucket_bytes,
    flops_text,
    size_text,
    gpu_hours,
)
from compat.subjects import CandidateError

pytestmark = pytest.mark.compat_row("resources")

# What only a trace without data fails on (a large step; a small one is run for real): a value the
# step reads that no answer covers (torch.equal, torch.unique), an op FakeTensorMode cannot run,
# `.numpy()` of a fake tensor.
UNTRACEABLE = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)
UNTRACEABLE_MESSAGES = ("tensor subclass", "FakeTensor", "fake tensor", "meta tensor")


def _untraceable(exc: BaseException) -> bool:
    return isinstance(exc, UNTRACEABLE) or any(m in str(exc) for m in UNTRACEABLE_MESSAGES)


def measurements(ctx) -> RowMeasurements:
    return RowMeasurements(ctx)


def traced(compute):
    """`compute()`, with a trainer that cannot be traced without data NOT RUN ("could not check")."""
    try:
        return compute()
    except CandidateError as error:
        cause = error.__cause__
        while cause is not None and not _untraceable(cause):
            cause = cause.__cause__
        if cause is None:
            raise
        cannot_check(
            f"the step cannot be traced without data under FakeTensorMode ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0][:200]}): {str(error).splitlines()[0][:300]}"
        )


def precision_of(config) -> str:
    mp = str(config.training.mixed_precision)
    return f"{config.training.dtype} inputs, " + ("no autocast" if mp == "no" else f"{mp} autocast")


def _traced_how(cost: StepCost) -> str:
    if cost.extrapolated:
        depths = "-".join(str(d) for d in sorted(cost.traces))
        return f"depths {depths} of {cost.depth} traced, extrapolated (identical blocks)"
    return f"all {cost.depth} blocks traced"


def check_memory(ctx, measure):
    run = measurements(ctx)
    cycle = traced(run.cycle)
    stable = traced(run.stable)
    parts = traced(run.counterparts)
    worst = max(stable.values(), key=lambda c: c.peak)
    act_ratio = cycle.activations / max(max(c.activations for c in stable.values()), 1)
    measure(
        "per_rank",
        f"cycle {size_text(cycle.peak)} vs stable {size_text(worst.peak)} (x{cycle.peak / worst.peak:.2f}), "
        f"activations x{act_ratio:.2f}",
    )
    at = f"step {run.full_step}" if run.full_step is not None else "base weights (no step=)"
    measure(
        "cycle",
        f"{cycle.describe_split()}; {cycle.passes} passes at {at}; B={cycle.batch_size}, S={cycle.seq_len} "
        f"({run.seq_len_source}), {precision_of(ctx.cycle_config)}",
    )
    measure(
        "stable",
        ", ".join(f"{label.removeprefix('stable ')} {size_text(c.peak)}" for label, c in stable.items())
        + f" ({run.modes_source}); {worst.label.removeprefix('stable ')}: {worst.describe_split()}; "
        f"B={worst.batch_size}, {precision_of(ctx.stable_config)}",
    )
    reads = cycle.host_reads + sum(c.host_reads for c in stable.values())
    steps = [cycle, *stable.values()]
    if all(c.real for c in steps):
        how = f"run for real (small steps: under {size_text(REAL_STEP_BYTES)} and {flops_text(REAL_STEP_FLOPS)})"
    elif not any(c.real for c in steps):
        how = "FakeTensorMode (nothing allocated)"
    else:
        how = "FakeTensorMode where a step is large, for real where small"
    measure(
        "traced",
        f"{how}, {_traced_how(cycle)}, {reads} host reads answered finite / in range, {run.seconds():.1f} s",
    )
    # The trainer's own code saves for backward what its loss terms need, like the stable trainer's.
    w = run.weights
    n_text, n_latent = 1 + int(w["cycle_text"] > 0), 1 + int(w["cycle_latent"] > 0)
    own_l2t, own_t2l = parts["l2t"].saved[OWN_CODE], parts["t2l"].saved[OWN_CODE]
    budget = n_text * own_l2t + n_latent * own_t2l
    own = cycle.saved[OWN_CODE]
    measure("own_code_saved", f"{size_text(own)} of a {size_text(budget)} budget")
    rtol = TOLERANCES["resources_saved_budget"][0]
    expect(
        own <= budget * (1 + rtol),
        f"the cycle trainer's own code saves {size_text(own)} for backward where its loss terms need "
        f"{size_text(budget)}: it keeps a graph past a stop-grad (e.g. a softmax of the L2T logits attached to the "
        "loss)",
        "detach what the config's stop-grad (loss.cycle_stop_grad_latent) and the pseudo tokens say is not trained",
        f"what the stable trainer saves for the same losses: {n_text} x l2t's {size_text(own_l2t)} + {n_latent} x "
        f"t2l's {size_text(own_t2l)}; {own} bytes vs a budget of {budget} x {1 + rtol:g}",
    )


def _flops_budget(parts: dict[str, int], weights: dict[str, float]) -> tuple[int, list[str]]:
    """FLOPs of the passes the weights need, each at its stable counterpart's (`parts`: t2l, l2t), and
    their names."""
    needed = [("T2L", "t2l"), ("L2T", "l2t")]
    if weights["cycle_text"] > 0:
        needed.append(("cycle_text", "l2t"))
    if weights["cycle_latent"] > 0:
        needed.append(("cycle_latent", "t2l"))
    return sum(parts[mode] for _, mode in needed), [name for name, _ in needed]


def _flops_against_budget(flops: int, passes: int, parts: dict[str, int], weights, when: str) -> tuple[str, str | None]:
    """(the step's FLOPs as a share of the passes its weights need, and, when it costs more, why: a pass
    made for a term weighted 0 is a cost, not a difference: REVIEW, as the cycle_terms row says of it)."""
    budget, needed = _flops_budget(parts, weights)
    rtol = TOLERANCES["resources_flops_budget"][0]
    zero = [t for t, v in weights.items() if v <= 0]
    share = f"{flops / budget:.3f} of {' + '.join(needed)}"
    if flops <= budget * (1 + rtol):
        return share, None
    return share, (
        f"the cycle step {when} costs {flops / budget:.2f}x the FLOPs of the passes its weights need "
        f"({' + '.join(needed)}; {', '.join(zero) or 'no term'} weighted 0): it makes {passes} model passes, a pass "
        f"for a term weighted 0; skip a term's pass while its weight is 0 ({flops_text(flops)} vs "
        f"{flops_text(budget)} x {1 + rtol:g})"
    )


def check_flops(ctx, measure):
    run = measurements(ctx)
    parts = traced(run.counterparts)
    first = traced(run.cycle_first_step)  # checked first: a warmup pass needs no full-weight trace to show
    at_first = None
    if first is not None:
        trace, weights = first
        shallow = {mode: cost.traces[trace.depth].flops for mode, cost in parts.items()}
        at_first, waste_first = _flops_against_budget(
            trace.flops, trace.passes, shallow, weights, "at step 0 of the schedule"
        )
    cycle = traced(run.cycle)
    traced(run.stable)
    stable_flops = run.stable_flops_per_step()
    measure(
        "flops",
        f"x{cycle.flops / stable_flops:.2f}: cycle {flops_text(cycle.flops)} vs stable {flops_text(stable_flops)} "
        "per step (forward + backward; the stable schedule's average)",
    )
    full, waste_full = _flops_against_budget(
        cycle.flops,
        cycle.passes,
        {m: c.flops for m, c in parts.items()},
        run.weights,
        "with the weights at their largest",
    )
    if at_first is None:
        measure("flops_budget", f"{full} (no step of the schedule weights a term 0)")
    else:
        measure("flops_budget", f"full weights {full}; step 0 (depth {first[0].depth}) {at_first}")
    waste = [w for w in (waste_full, waste_first if first is not None else None) if w]
    if waste:
        measure("passes_for_terms_weighted_0", "; ".join(waste), review=True)


def gpu_limit(ctx) -> tuple[int, str]:
    """Bytes of one GPU and where they came from; the fit check is not applicable without them."""
    if ctx.options.gpu_memory is not None:
        return gpu_memory_bytes(ctx.options.gpu_memory), f"--gpu-memory {ctx.options.gpu_memory}"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        return int(props.total_memory), f"{props.name}'s total memory"
    not_applicable("no GPU memory to fit: pass --gpu-memory SIZE (e.g. 80GiB), or run the gate with --device cuda")


def fitting_batch(run: RowMeasurements, limit: int, ddp: int) -> tuple[int, int, StepCost] | None:
    """The largest per-rank batch whose traced cycle step fits `limit` (with 10% free when one does),
    keeping the global batch with an integer accumulation: (batch, accumulation, its step). A
    candidate is traced only when a lower bound of its peak fits: each phase's parameters, gradients
    and AdamW state as they are, the rest scaled by b / B (the rest is a batch-independent part, e.g.
    autocast's weight copies, plus a part proportional to the batch, so scaling all of it down
    underestimates)."""
    B, A = run.cycle_batch, run.cycle_accumulation
    full = run.cycle()

    def lower_bound(b: int) -> int:
        bound = 0
        for peak in full.peaks.values():
            fixed = peak.split[PARAMETERS] + peak.split[GRADIENTS] + peak.split[OPTIMIZER]
            bound = max(bound, fixed + (peak.total - fixed) * b // B)
        return bound

    for free in (HEADROOM_REVIEW, 0.0):
        for b in batch_candidates(B, A):
            if lower_bound(b) + ddp <= limit * (1 - free):
                cost = run.cycle(b)
                if cost.peak + ddp <= limit * (1 - free):
                    return b, B * A // b, cost
    return None


def check_fit(ctx, measure):
    limit, source = gpu_limit(ctx)
    run = measurements(ctx)
    cycle = traced(run.cycle)
    worst = max(traced(run.stable).values(), key=lambda c: c.peak)
    ddp = ddp_bucket_bytes(cycle.params_total)
    need_cycle, need_stable = cycle.peak + ddp, worst.peak + ddp
    numbers = (
        f"cycle {size_text(need_cycle)}, stable {size_text(need_stable)} per rank with DDP's gradient buckets "
        f"({size_text(ddp)}; a single-GPU run has none) against {size_text(limit)} ({source})"
    )
    if need_cycle <= limit:
        free = 1 - need_cycle / limit
        measure("fit", f"fits {size_text(limit)}, {free:.0%} free; {numbers}", review=free < HEADROOM_REVIEW)
        if free < HEADROOM_REVIEW:
            measure(
                "fit_headroom",
                f"the cycle step leaves {free:.1%} of {size_text(limit)} free (< {HEADROOM_REVIEW:.0%}): allocator "
                "fragmentation and the CUDA context can take that; a smaller training.train_batch_size with "
                "more accumulation leaves room",
                review=True,
            )
        return
    found = traced(lambda: fitting_batch(run, limit, ddp))
    if found is None:
        advice = (
            f"even {min(batch_candidates(run.cycle_batch, run.cycle_accumulation) or [run.cycle_batch])} sample(s) "
            f"per rank do not fit: shorten the sequences (S={run.seq_len}, {run.seq_len_source}) or shard the model"
        )
    else:
        b, a, cost = found
        advice = (
            f"set training.train_batch_size {b} and training.gradient_accumulation_steps {a} (same global batch; "
            f"{size_text(cost.peak + ddp)} per rank)"
        )
    if need_stable > limit:  # the estimate says the stable run did not fit either: another setup trained it
        measure(
            "fit",
            f"neither step fits {size_text(limit)} at S={run.seq_len} ({run.seq_len_source}): the stable run must have "
            f"used shorter sequences or another batch (pass --seq-len with your data's length); for the cycle "
            f"step: {advice}; {numbers}",
            review=True,
        )
        return
    measure("fit", f"does not fit {size_text(limit)}; {numbers}")
    incompatible(
        f"the cycle step needs {size_text(need_cycle)} per rank and does not fit {size_text(limit)} where the stable "
        f"step ({size_text(need_stable)}) did",
        advice,
        f"{numbers}; cycle {cycle.describe_split()}",
    )


def check_cost(ctx, measure):
    tflops = ctx.options.gpu_tflops
    if tflops is None:
        not_applicable("no GPU throughput: pass --gpu-tflops X (the GPU's dense bf16 TFLOP/s) to project GPU-hours")
    run = measurements(ctx)
    cycle = traced(run.cycle)
    traced(run.stable)
    ct, st = ctx.cycle_config.training, ctx.stable_config.training
    cycle_steps, stable_steps = int(ct.num_train_steps), int(st.num_train_steps)
    cycle_hours = gpu_hours(cycle.flops * run.cycle_accumulation, cycle_steps, tflops)
    stable_accumulation = int(st.get("gradient_accumulation_steps", 1) or 1)
    stable_hours = gpu_hours(run.stable_flops_per_step() * stable_accumulation, stable_steps, tflops)
    cheap = run.steps_with_a_term_off()
    warmup = f"; its first {cheap} step(s), a term weighted 0, cost less" if cheap else ""
    measure(
        "gpu_hours",
        f"cycle {cycle_hours:.3g} vs stable {stable_hours:.3g} GPU-hours per rank (x{cycle_hours / stable_hours:.2f}) "
        f"for {cycle_steps} / {stable_steps} steps at {ASSUMED_MFU:.0%} of {tflops:g} TFLOP/s (assumed "
        f"utilisation; x the ranks of your torchrun){warmup}",
    )


CHECKS = {
    "memory": check_memory,
    "flops": check_flops,
    "fit": check_fit,
    "cost": check_cost,
}

run_row = row_runner(CHECKS)
test_resources = row_test(CHECKS)
