"""Row: trajectories (K optimizer steps through the real training loop).

The other rows compare one step. A cluster run is thousands of steps of the shared training loop:
warmup, a cosine schedule, clipping, accumulation, autocast, AdamW. Here both trainer classes (the
built-in ones or the user's `--stable-trainer` / `--cycle-trainer`) train K steps from the
checkpoint under test through `latentDLM_mmdit.training.run_training`, each with its own config's
optimizer, schedule and precision (run length, batch size and synthetic data sized for the gate),
and the row checks:

- stable_loop_matches_oracle, cycle_loop_matches_oracle: each run against a replay of the same
  steps outside the loop (`compat.trajectories`): the same batches and the trainer's own gradients,
  then global-norm clipping, the documented LR schedule and AdamW written from their definitions in
  float64. Per-step losses, gradient norms, learning rates and the final weights agree within the
  table's `trajectory_oracle_*` tolerances: an optimizer setting, clipping norm, schedule or
  accumulation that differs from the config (in one entry point or both) moves them apart;
- cycle_keeps_base_losses: the stable trainer's own l2t and t2l losses, on a held-out batch with
  fixed draws, of the cycle run's final weights against the stable continuation's: non-finite, or a
  relative rise above `trajectory_base_rise`, is INCOMPATIBLE (fine-tuning with the cycle trainer
  would undo the pretraining); a cycle gradient norm above `trajectory_grad_spike` x the stable
  run's largest is REVIEW;
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
from pathlib import Path

import pytest
import torch

from compat import trajectories as T
from compat.figure_data import golden_band, trajectory_steps
from compat.harness import AUTOCAST_TOLERANCES, PROXY_SIZES, row_runner, row_test
from compat.oracle import TOLERANCES
from latentDLM_mmdit.settings import STABLE_LOSS_TYPES
from compat.outcomes import not_applicable
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
        if kind not in cache:
            cache[kind] = T.run_trajectory(
                kind,
                spec.cls,
                spec.accepts_step,
                cache["configs"][kind],
                cache["init"],
                cache["workdir"] / f"run-{len(cache)}",
                config_path=config_path,
                device=str(ctx.device),
                **data,
            )
        if part.endswith("_replay") and part not in cache:
            cache[part] = T.replay_with_oracle(
                cache[kind], spec.cls, spec.accepts_step, cache["init"], device=str(ctx.device)
            )
    return cache


def first_mismatch(got: list, want: list, rtol: float, atol: float):
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None or not math.isfinite(g) or not abs(g - w) <= atol + rtol * abs(w):
            return i, g, w
    return None


def check_loop_matches_oracle(kind: str):
    def check(ctx, measure):
        r = runs(ctx, kind, f"{kind}_replay")
        run, replay = r[kind], r[f"{kind}_replay"]
        measure(
            f"{kind}_steps",
            f"{len(run.metrics)} (K), batch {BATCH_SIZE}, "
            f"{'proxy model' if r['proxy'] else 'the checkpoint'}, mixed_precision "
            f"{run.config.training.mixed_precision}",
        )
        assert len(run.metrics) == T.STEPS, f"the {kind} loop ran {len(run.metrics)} steps, not {T.STEPS}"
        problems = []
        lrs = [m.get("lr") for m in run.metrics]
        bad = first_mismatch(lrs, replay.lrs, 1e-12, 0.0)
        if bad:
            problems.append(
                f"learning rate at step {bad[0] + 1}: the loop used {bad[1]}, the schedule of "
                f"training.lr_schedule/warmup_steps/optimizer.lr gives {bad[2]:.6g}"
            )
        precision = str(run.config.training.mixed_precision)
        if precision == "no":
            rtol, atol = TOLERANCES["trajectory_oracle_loss"]
            w_rtol, w_frac = TOLERANCES["trajectory_oracle_weights"]
        else:  # low-precision CPU kernels are not bit-reproducible: agreement at the autocast dtype's precision
            rtol, atol = TOLERANCES[AUTOCAST_TOLERANCES[precision][0]]
            w_rtol, w_frac = TOLERANCES["trajectory_oracle_weights_autocast"]
        measure(
            f"{kind}_stable_mode" if kind == "stable" else f"{kind}_precision",
            str(run.config.loss.loss_type) if kind == "stable" else precision,
        )
        bad = first_mismatch(run.losses, replay.losses, rtol, atol)
        if bad:
            problems.append(f"loss at step {bad[0] + 1}: loop {bad[1]:.7g}, replay {bad[2]:.7g}")
        if float(run.config.optimizer.grad_clip_norm) > 0:
            bad = first_mismatch(run.grad_norms, replay.grad_norms, rtol * 10, atol)
            if bad:
                problems.append(f"gradient norm at step {bad[0] + 1}: loop {bad[1]}, replay {bad[2]:.7g}")
        worst_name, worst = None, 0.0
        limits = {"rtol": w_rtol, "atol": w_frac * sum(replay.lrs)}
        off = []
        for name, want in replay.final_weights.items():
            got = run.final_weights[name].to(want.dtype)
            diff = float((got.double() - want.double()).abs().max())
            if diff > worst:
                worst_name, worst = name, diff
            if not torch.allclose(got.double(), want.double(), **limits):
                off.append(name)
        measure(f"{kind}_max_weight_diff_vs_oracle", f"{worst:.3g} ({worst_name})")
        if off:
            problems.append(
                f"final weights differ from the AdamW/clipping replay in {len(off)} tensors "
                f"(e.g. {off[0]}; largest difference {worst:.3g}); optimizer settings: "
                f"{dict(run.config.optimizer)}"
            )
        assert not problems, (
            f"the {kind} entry point's training loop does not step as its config says "
            f"(replayed outside the loop): " + "; ".join(problems)
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
    limit = TOLERANCES["trajectory_base_rise"][0]
    measure("steps", trajectory_steps(r["stable"], r["cycle"]), figure=True)
    measure("base_losses", {"start": before, "stable": stable, "cycle": cycle, "limit": limit}, figure=True)
    rises = {mode: (cycle[mode] - stable[mode]) / max(abs(stable[mode]), 1e-12) for mode in stable}
    for mode in stable:
        measure(
            f"base_{mode}",
            f"start {before[mode]:.5g}, stable {stable[mode]:.5g}, cycle {cycle[mode]:.5g} (rise {rises[mode]:+.2%})",
        )
    nonfinite = [m for m in cycle if not math.isfinite(cycle[m])] + [
        f"step {r['step']} loss" for r in r["cycle"].metrics if not math.isfinite(float(r["loss"]))
    ]
    assert not nonfinite, f"the cycle run went non-finite: {', '.join(nonfinite)}"
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
    assert rises[worst] <= limit, (
        f"after {T.STEPS} steps the cycle run's base {worst} loss is {cycle[worst]:.5g} against the stable "
        f"continuation's {stable[worst]:.5g} (+{rises[worst]:.1%} > {limit:.0%}, trajectory_base_rise): "
        "fine-tuning with this cycle trainer and config undoes the pretraining"
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
    default_inputs = not any((o.checkpoint, o.stable_config, o.cycle_config, o.cycle_trainer, o.stable_trainer, o.data))
    return GOLDEN if default_inputs and ctx.device.type == "cpu" else None


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
    assert not moved, (
        f"training numerics moved against {path} (tol('golden_trajectory')): "
        + "; ".join(moved)
        + ". If the change is deliberate, re-record: python -m compat --record-golden "
        + str(path)
    )


CHECKS = {
    "stable_loop_matches_oracle": check_loop_matches_oracle("stable"),
    "cycle_loop_matches_oracle": check_loop_matches_oracle("cycle"),
    "cycle_keeps_base_losses": check_cycle_keeps_base_losses,
    "golden_values": check_golden_values,
}

run_row = row_runner(CHECKS)
test_trajectories = row_test(CHECKS)
