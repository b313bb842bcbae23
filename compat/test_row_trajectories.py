"""Row: trajectories (K optimizer steps through the real training loop).

The other rows compare one step. A cluster run is thousands of steps of the shared training loop:
warmup, a cosine schedule, clipping, accumulation, autocast, AdamW. Here both trainer classes (the
built-in ones or the user's `--stable-trainer` / `--cycle-trainer`) train K steps from the
checkpoint under test through `latentDLM_mmdit.training.run_training`, each with its own config's
optimizer, schedule and precision (batch size and synthetic data sized for the gate). The K steps are
a window of the config's own schedule (`compat.trajectories.schedule_window`): from step 0 when the
warmup ends within them, else across the end of the warmup, where the learning rate peaks (K steps of
a 2,000-step warmup would train at 0.3% of optimizer.lr and move nothing). The row checks:

- stable_loop_matches_oracle, cycle_loop_matches_oracle: each run against a replay of the same
  steps outside the loop (`compat.trajectories`): the same batches and the trainer's own gradients,
  then global-norm clipping, the documented LR schedule and AdamW written from their definitions in
  float64. Learning rates equal; losses, gradient norms and the final weights within bounds derived
  from the computation (`trajectory_loss`, `trajectory_grad_norm`, `trajectory_weights`: float32's
  unit roundoff, the number of terms each float32 reduction sums, the weights' own norm and the
  update's): an optimizer setting, clipping norm, schedule or accumulation that differs from the
  config moves them apart. The stable run is the reference's own loop: its mismatch is a failed
  harness control (NOT RUN, could not check), the cycle run's is INCOMPATIBLE; the cycle run is
  judged only after the stable run matched the same replay (else the replay, not the trainer, may be
  what is wrong: could not check). When the K steps move
  the weights by less than float32 resolves, the comparison could not tell a defect from noise: NOT RUN;
- cycle_keeps_base_losses: the stable trainer's own l2t and t2l losses, on a held-out batch with
  fixed draws, of the cycle run's final weights against the stable continuation's: non-finite, or a
  relative rise above `trajectory_base_rise`, is INCOMPATIBLE (fine-tuning with the cycle trainer
  would undo the pretraining); a cycle gradient norm above `trajectory_grad_spike` x the stable
  run's largest is REVIEW. Reported only when the stable continuation moved its base losses by more
  than float32 resolves (else NOT RUN: a rise could not have shown);
- golden_values: per-step losses, gradient norms and final-weight checksums against a golden file
  (`--golden FILE`; the committed `compat/data/golden_trajectories.json` for the embedded default;
  `--record-golden FILE` writes one). The first step and value that moved are named. Without a
  golden file for the inputs this check is NOT RUN (not applicable).

Re-recording the committed golden file after a deliberate change of training numerics:
`python -m compat --record-golden compat/data/golden_trajectories.json` (on the embedded default,
CPU), then review and commit the diff.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from compat import trajectories as T
from compat.figure_data import golden_band, trajectory_steps
from compat.harness import AUTOCAST_TOLERANCES, PROXY_SIZES, row_runner, row_test
from compat.oracle import TOLERANCES, derived_tol, gamma, unit_roundoff
from latentDLM_mmdit.settings import STABLE_LOSS_TYPES
from compat.outcomes import cannot_check, control_failed, expect, not_applicable
from compat.subjects import CandidateError, trainer_failure
from latentDLM_mmdit.checkpoints import installed_versions

pytestmark = pytest.mark.compat_row("trajectories")

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_trajectories.json"
BATCH_SIZE = 2
EVAL_SEED = 7070
GOLDEN_FORMAT = 1


def runs(ctx, *parts: str) -> dict:
    """The trajectories `parts` ("stable", "cycle", "stable_replay", "cycle_replay") and the shared
    start, each computed once per session and per trainer class (cached on the context)."""
    cache = ctx.trajectories.setdefault((ctx.stable_subject.spec.cls, ctx.cycle_subject.spec.cls), {})
    if "init" not in cache:
        large = ctx.large
        model = ctx.proxy_model() if large else ctx.require_model()
        # The proxy's sizes as proxy_model() builds it (its position table covers the gate's seq-len).
        overrides = {**PROXY_SIZES, "max_seq_len": max(ctx.seq_len, int(PROXY_SIZES["max_seq_len"]))} if large else None
        vocab = ctx.gate_vocab.vocab  # the gate's vocabulary (a config's tokenizer.path need not exist here)
        fixed = {
            "tokenizer.vocab_size": vocab.vocab_size,
            "tokenizer.mask_token_id": vocab.mask_token_id,
            "tokenizer.pad_token_id": vocab.pad_token_id,
        }
        workdir = Path(tempfile.mkdtemp(prefix="trajectories-", dir=ctx.workdir))  # one per cache, never reused
        # The stable continuation trains in the stable config's own mode; a config whose loss_type is
        # not a stable mode (e.g. the cycle config given for both) continues in unconditional mode.
        stable_mode = str(ctx.stable_config.loss.loss_type)
        stable_mode = stable_mode if stable_mode in STABLE_LOSS_TYPES else "unconditional"
        configs = {
            kind: T.trajectory_config(
                config, batch_size=BATCH_SIZE, seq_len=ctx.seq_len, model_overrides=overrides, updates=extra
            )
            for kind, config, extra in (
                ("stable", ctx.stable_config, {**fixed, "loss.loss_type": stable_mode}),
                ("cycle", ctx.cycle_config, fixed),
            )
        }
        cache.update(
            model=model,
            proxy=large,
            configs=configs,
            workdir=workdir,
            init=T.save_init(model, configs["stable"], workdir / "init.safetensors"),
        )
    subjects = {
        "stable": (ctx.stable_subject, ctx.stable_config_path),
        "cycle": (ctx.cycle_subject, ctx.cycle_config_path),
    }
    data = {"token_dir": ctx.options.data_tokens, "latent_dir": ctx.options.data_latents} if ctx.options.data else {}
    for part in parts:
        kind = part.removesuffix("_replay")
        subject, config_path = subjects[kind]
        spec = subject.spec
        if part not in cache:
            try:
                if kind not in cache:  # each run in a folder of its own, never one an earlier attempt wrote
                    cache[kind] = T.run_trajectory(
                        kind,
                        spec.cls,
                        spec.accepts_step,
                        cache["configs"][kind],
                        cache["init"],
                        Path(tempfile.mkdtemp(prefix=f"{kind}-run-", dir=cache["workdir"])),
                        config_path=config_path,
                        device=str(ctx.device),
                        **data,
                    )
                if part.endswith("_replay"):
                    cache[part] = T.replay_with_oracle(
                        cache[kind], spec.cls, spec.accepts_step, cache["init"], device=str(ctx.device)
                    )
            except Exception as exc:  # the same failure for every check that needs this run
                cache[part] = run_failure(subject, exc)
        if isinstance(cache[part], Exception):
            raise CandidateError(str(cache[part])) if isinstance(cache[part], CandidateError) else cache[part]
    return cache


def run_failure(subject, exc: Exception) -> Exception:
    """A failure inside the trainer's own code (its frames in the traceback) as the trainer's failure
    (CandidateError, its own frame named); anything else as it is."""
    frames = traceback.extract_tb(exc.__traceback__)
    source = subject.spec.source_file
    inside = source is not None and any(Path(f.filename).resolve() == source.resolve() for f in frames)
    if isinstance(exc, CandidateError) or not inside:
        return exc
    return trainer_failure(subject.role, subject.spec, "step in the training loop", exc)


def first_mismatch(got: list, want: list, rtol, atol):
    """The first (index, got, want) outside `atol + rtol |want|` (each may be a list, per step)."""
    for i, (g, w) in enumerate(zip(got, want)):
        r = rtol[i] if isinstance(rtol, list) else rtol
        a = atol[i] if isinstance(atol, list) else atol
        if g is None or w is None or not math.isfinite(g) or not abs(g - w) <= a + r * abs(w):
            return i, g, w
    return None


def weights_distance(run: T.Trajectory, replay: T.Replay) -> tuple[float, str, float]:
    """||w_loop - w_replay|| over every weight, and the tensor with the largest difference (max |.|)."""
    total, worst_name, worst = 0.0, "-", 0.0
    for name, want in replay.final_weights.items():
        diff = run.final_weights[name].double() - want.double()
        total += float(diff.pow(2).sum())
        largest = float(diff.abs().max()) if diff.numel() else 0.0
        if largest > worst:
            worst_name, worst = name, largest
    return math.sqrt(total), worst_name, worst


def update_tolerance_name(precision: str) -> str:
    return "trajectory_update_float32" if precision == "no" else "trajectory_update_autocast"


def update_is_resolvable(run: T.Trajectory, replay: T.Replay) -> tuple[bool, str]:
    """Whether the K steps moved the weights by more than float32 can resolve (see trajectory_min_update)."""
    steps = len(replay.update_norms)
    noise = (steps + 1) * unit_roundoff(torch.float32) * replay.weight_norms[-1]
    factor = TOLERANCES["trajectory_min_update"][0]
    moved = replay.update_norms[-1]
    lrs = ", ".join(f"{lr:.3g}" for lr in (replay.lrs[0], replay.lrs[-1]))
    return moved >= factor * noise, (
        f"||w_K - w_0|| = {moved:.3g} over steps {run.window.start + 1}-{run.window.stop} (lr {lrs}), "
        f"float32 storage noise of the weights {noise:.3g}"
    )


def loop_vs_replay(ctx, kind: str, measure) -> tuple:
    """(the run, what differs from its replay) of `kind`'s K loop steps; the measured values go to `measure`."""
    r = runs(ctx, kind, f"{kind}_replay")
    run, replay = r[kind], r[f"{kind}_replay"]
    precision = str(run.config.training.mixed_precision)
    measure(
        f"{kind}_steps",
        f"{len(run.metrics)} (K), batch {BATCH_SIZE}, {'proxy model' if r['proxy'] else 'the checkpoint'}, "
        f"mixed_precision {precision}, training.dtype {run.config.training.dtype}",
    )
    measure(f"{kind}_window", run.window.reason)
    if kind == "stable":
        measure("stable_stable_mode", str(run.config.loss.loss_type))
    expect(
        len(run.metrics) == run.window.steps,
        f"the {kind} entry point's loop ran {len(run.metrics)} optimizer steps where it was asked for "
        f"{run.window.steps}",
        "step the optimizer once per training.gradient_accumulation_steps micro-batches, up to the stop step",
    )
    resolvable, moved = update_is_resolvable(run, replay)
    measure(f"{kind}_update", moved)
    if not resolvable:
        cannot_check(
            f"the {kind} run's {run.window.steps} steps moved the weights by less than "
            f"{TOLERANCES['trajectory_min_update'][0]:g}x float32's resolution of them ({moved}): a loop that "
            "steps differently could not be told apart; optimizer.lr or the schedule is too small anywhere "
            "near these steps (pass a config whose schedule trains)"
        )
    problems = []
    lrs = [m.get("lr") for m in run.metrics]
    bad = first_mismatch(lrs, replay.lrs, 1e-12, 0.0)
    if bad:
        problems.append(
            f"learning rate at step {run.window.start + bad[0] + 1}: the loop used {bad[1]}, "
            f"training.lr_schedule/warmup_steps/optimizer.lr give {bad[2]:.6g}"
        )
    # Weights: the drift float32 storage and Adam's steps on ~0 gradients allow (trajectory_weights).
    rtol_update = TOLERANCES[update_tolerance_name(precision)][0]
    steps = len(replay.update_norms)
    limits = derived_tol(
        "trajectory_weights",
        steps=steps,
        weight_norm=replay.weight_norms[-1],
        update_norm=replay.update_norms[-1],
        rtol_update=rtol_update,
    )
    distance, worst_name, worst = weights_distance(run, replay)
    allowed = limits["atol"] + limits["rtol"] * replay.update_norms[-1]
    measure(
        f"{kind}_weights_vs_replay",
        f"||w_loop - w_replay|| {distance:.3g} of an update {replay.update_norms[-1]:.3g} (bound {allowed:.3g}: "
        f"{TOLERANCES['trajectory_weights'].formula.split(',')[0]}); largest |diff| {worst:.3g} ({worst_name})",
    )
    if not distance <= allowed:
        problems.append(
            f"final weights {distance:.3g} away from the replay's (||w_loop - w_replay||, "
            f"{distance / max(replay.update_norms[-1], 1e-300):.1%} of the update; allowed {allowed:.3g}), "
            f"largest in {worst_name}"
        )
    # Losses: the same computation on weights that differ by at most the drift bound at that step.
    if precision == "no":
        vocab = int(ctx.model_sizes()["vocab_size"])
        n_terms = vocab + BATCH_SIZE * ctx.seq_len
        rtols, atols = [], []
        for i, norm in enumerate(replay.grad_norms):
            drift = (
                0.0
                if i == 0
                else (i + 1) * unit_roundoff(torch.float32) * replay.weight_norms[i - 1]
                + rtol_update * replay.update_norms[i - 1]
            )
            bound = derived_tol(
                "trajectory_loss", grad_norm=norm, weight_drift=drift, n_terms=n_terms, dtype=torch.float32
            )
            rtols.append(bound["rtol"])
            atols.append(bound["atol"])
        loss_bound = f"trajectory_loss (rtol {rtols[0]:.2g} + ||grad|| drift)"
    else:  # low-precision CPU kernels are not bit-reproducible: agreement at the autocast dtype's precision
        rtols, atols = TOLERANCES[AUTOCAST_TOLERANCES[precision][0]]
        loss_bound = AUTOCAST_TOLERANCES[precision][0]
    bad = first_mismatch(run.losses, replay.losses, rtols, atols)
    if bad:
        problems.append(
            f"loss at step {run.window.start + bad[0] + 1}: loop {bad[1]:.7g}, replay {bad[2]:.7g} ({loss_bound})"
        )
    # Gradient norms: torch's float32 norm against the replay's float64 one (trajectory_grad_norm).
    if float(run.config.optimizer.grad_clip_norm) > 0:
        norm_tol = derived_tol("trajectory_grad_norm", n_max=replay.largest_grad, n_tensors=replay.n_grads)
        if precision != "no":
            norm_tol["rtol"] += TOLERANCES[AUTOCAST_TOLERANCES[precision][1]][0]
        measure(f"{kind}_grad_norm_rtol", f"{norm_tol['rtol']:.2g} (n_max {replay.largest_grad})")
        bad = first_mismatch(run.grad_norms, replay.grad_norms, norm_tol["rtol"], norm_tol["atol"])
        if bad:
            problems.append(
                f"gradient norm at step {run.window.start + bad[0] + 1}: loop {bad[1]}, replay {bad[2]:.7g} "
                f"(trajectory_grad_norm rtol {norm_tol['rtol']:.2g})"
            )
    return run, problems


STABLE_BASELINE = (
    "the stable reference's training loop does not match its AdamW/clipping/schedule replay, so the "
    "cycle run has no trustworthy baseline: "
)


def check_loop_matches_oracle(kind: str):
    def check(ctx, measure):
        if kind == "cycle":  # the replay is judged first on the reference's own loop (its control)
            _, baseline = loop_vs_replay(ctx, "stable", lambda *args, **kwargs: None)
            if baseline:
                control_failed(STABLE_BASELINE + "; ".join(baseline))
        run, problems = loop_vs_replay(ctx, kind, measure)
        opt = run.config.optimizer
        if problems and kind == "stable":  # the reference's own loop: the baseline the row measures against
            control_failed(STABLE_BASELINE + "; ".join(problems))
        expect(
            not problems,
            f"the {kind} entry point's training loop does not train as its config says (optimizer.lr {opt.lr}, "
            f"beta1/beta2 {opt.beta1}/{opt.beta2}, weight_decay {opt.weight_decay}, grad_clip_norm "
            f"{opt.grad_clip_norm}, {run.config.training.lr_schedule} schedule with {run.config.training.warmup_steps} "
            f"warmup steps, gradient_accumulation_steps {run.config.training.gradient_accumulation_steps})",
            f"make the {kind} entry point's optimizer, clipping and schedule read these keys",
            "replayed outside the loop: " + "; ".join(problems),
        )

    return check


def base_losses(ctx, weights: dict[str, torch.Tensor], template: torch.nn.Module) -> dict[str, float]:
    """The stable trainer's l2t and t2l losses of `weights` on the held-out batch with fixed draws."""
    model = copy.deepcopy(template)
    model.load_state_dict(weights, strict=True)
    model.eval()
    batch = ctx.batch(ctx.options.batch_size, seed=EVAL_SEED)
    draws = ctx.draws(batch, seed=EVAL_SEED)
    return {
        mode: float(ctx.run_stable(mode, batch, draws=draws, model=model, grad=False).loss) for mode in ("l2t", "t2l")
    }


def check_cycle_keeps_base_losses(ctx, measure):
    r = runs(ctx, "stable", "cycle")
    before = base_losses(ctx, {k: v for k, v in r["model"].state_dict().items()}, r["model"])
    stable = base_losses(ctx, r["stable"].final_weights, r["model"])
    cycle = base_losses(ctx, r["cycle"].final_weights, r["model"])
    window = r["cycle"].window
    measure("window", window.reason)
    nonfinite = [m for m in cycle if not math.isfinite(cycle[m])] + [
        f"step {r['step']} loss" for r in r["cycle"].metrics if not math.isfinite(float(r["loss"]))
    ]
    expect(
        not nonfinite,
        f"fine-tuning with this cycle trainer and config diverges: its run goes non-finite within {window.steps} steps "
        f"({', '.join(nonfinite)})",
        "lower loss.cycle_*_weight or ramp them in (*_warmup_steps, *_ramp_steps), and check the x0 gain",
    )
    # The stable continuation must have moved its own base losses by more than the float32 resolution of
    # a loss (a reduction over the vocabulary and the batch), or a rise could not have shown either.
    n_terms = int(ctx.model_sizes()["vocab_size"]) + ctx.options.batch_size * ctx.seq_len
    resolution = gamma(n_terms, unit_roundoff(torch.float32))
    moved = {mode: abs(stable[mode] - before[mode]) / max(abs(before[mode]), 1e-12) for mode in stable}
    measure(
        "stable_base_change", ", ".join(f"{m} {v:.2g}" for m, v in moved.items()) + f" (resolution {resolution:.2g})"
    )
    if max(moved.values()) <= resolution:
        cannot_check(
            f"the {window.steps} stable steps ({window.reason}) did not move the base losses measurably (relative change "
            f"{max(moved.values()):.2g} <= {resolution:.2g}, float32's resolution of a loss over {n_terms} terms): "
            "a rise of the cycle run could not show; the config's optimizer.lr / schedule trains too little there"
        )
    limit = TOLERANCES["trajectory_base_rise"][0]
    measure("steps", trajectory_steps(r["stable"], r["cycle"]), figure=True)
    measure("base_losses", {"start": before, "stable": stable, "cycle": cycle, "limit": limit}, figure=True)
    rises = {mode: (cycle[mode] - stable[mode]) / max(abs(stable[mode]), 1e-12) for mode in stable}
    for mode in stable:
        measure(
            f"base_{mode}",
            f"start {before[mode]:.5g}, stable {stable[mode]:.5g}, cycle {cycle[mode]:.5g} (rise {rises[mode]:+.2%})",
        )
    worst = max(rises, key=rises.get)
    measure("largest_base_rise", f"{rises[worst]:+.2%} ({worst})", headline=True)
    stable_norms = [n for n in r["stable"].grad_norms if n is not None]
    cycle_norms = [n for n in r["cycle"].grad_norms if n is not None]
    if stable_norms and cycle_norms:
        factor = max(cycle_norms) / max(max(stable_norms), 1e-12)
        spike = factor > TOLERANCES["trajectory_grad_spike"][0]
        measure(
            "grad_norm_max",
            f"cycle {max(cycle_norms):.4g}, stable {max(stable_norms):.4g} (x{factor:.2g})",
            review=spike,
        )
    expect(
        rises[worst] <= limit,
        f"fine-tuning with this cycle trainer and config undoes the pretraining: after {window.steps} steps its base "
        f"{worst} loss is {rises[worst]:+.1%} above the stable continuation's (more than {limit:.0%})",
        "lower loss.cycle_*_weight or ramp them in (*_warmup_steps, *_ramp_steps)",
        f"cycle {cycle[worst]:.5g}, stable {stable[worst]:.5g} (trajectory_base_rise)",
    )


def golden_record(ctx) -> dict:
    r = runs(ctx, "stable", "cycle")
    return {
        "format": GOLDEN_FORMAT,
        "inputs": golden_inputs(ctx),
        "versions": {"torch": torch.__version__.split("+")[0], **installed_versions()},
        "steps": T.STEPS,
        "runs": {
            kind: {
                "losses": r[kind].losses,
                "grad_norms": r[kind].grad_norms,
                "weights": T.weights_checksum(r[kind].final_weights),
            }
            for kind in ("stable", "cycle")
        },
    }


def golden_inputs(ctx) -> dict:
    o = ctx.options
    return {
        "checkpoint": "embedded" if o.embedded else Path(o.checkpoint).name,
        "stable_config": Path(ctx.stable_config_path).name,
        "cycle_config": Path(ctx.cycle_config_path).name,
        "stable_trainer": ctx.stable_subject.spec.describe().split(" ")[0],
        "cycle_trainer": ctx.cycle_subject.spec.describe().split(" ")[0],
        "data": "synthetic" if not o.data else "user",
        "device": ctx.device.type,
        "batch_size": BATCH_SIZE,
        "seq_len": ctx.seq_len,
    }


def golden_file(ctx) -> Path | None:
    o = ctx.options
    if o.golden:
        return Path(o.golden)
    return GOLDEN if not o.user_inputs and ctx.device.type == "cpu" else None


def check_golden_values(ctx, measure):
    o = ctx.options
    if o.record_golden:
        record = golden_record(ctx)
        Path(o.record_golden).write_text(json.dumps(record, indent=1) + "\n")
        measure("golden", f"recorded to {o.record_golden}")
    path = golden_file(ctx)
    if path is None:
        not_applicable("no golden file for these inputs (pass --golden FILE, recorded with --record-golden)")
    golden = json.loads(Path(path).read_text())
    got = golden_record(ctx)
    if golden.get("inputs") != got["inputs"]:
        not_applicable(f"{path} was recorded for other inputs ({golden.get('inputs')})")
    rtol, atol = TOLERANCES["golden_trajectory"]
    measure("golden", golden_band(golden["runs"], rtol, atol, path), figure=True)
    moved = []
    for kind in ("stable", "cycle"):
        want, have = golden["runs"][kind], got["runs"][kind]
        for what in ("losses", "grad_norms"):
            bad = first_mismatch(have[what], want[what], rtol, atol)
            if bad:
                moved.append(f"{kind} {what[:-1].replace('_', ' ')} at step {bad[0] + 1}: {bad[1]} (golden {bad[2]})")
        for what in ("sum", "abs_sum"):
            g, w = have["weights"][what], want["weights"][what]
            if not abs(g - w) <= atol + rtol * abs(w):
                moved.append(f"{kind} final weights {what}: {g:.10g} (golden {w:.10g})")
        measure(f"golden_{kind}_bit_identical", have["weights"]["sha256"] == want["weights"]["sha256"])
    measure("golden_file", f"{path} (torch {golden['versions'].get('torch')})")
    expect(
        not moved,
        f"training numerics moved against the golden trajectories {path}",
        "find what changed (dependency versions, data order, a numerics change); if it is deliberate, re-record: "
        f"python -m compat --record-golden {path}",
        "; ".join(moved) + " (tol('golden_trajectory'))",
    )


CHECKS = {
    "stable_loop_matches_oracle": check_loop_matches_oracle("stable"),
    "cycle_loop_matches_oracle": check_loop_matches_oracle("cycle"),
    "cycle_keeps_base_losses": check_cycle_keeps_base_losses,
    "golden_values": check_golden_values,
}

run_row = row_runner(CHECKS)
test_trajectories = row_test(CHECKS)
