"""The data of the report's figures, as the rows record it (`measure(name, data, figure=True)`):
plain lists and numbers that compat-matrix.json holds, and `compat.figures` draws without
computing anything again. Each helper builds one figure's data from what its row already has.

What each figure reads (row: figure names):
- trajectories: `steps` (per-step losses and gradient norms of both loop runs), `base_losses`,
  `golden` (when a golden file was compared);
- t2l_latent_timestep: `stable_latent_t`, `cycle_latent_t`, `random_mode_latent_t`;
- x0_reconstruction: `x0_gain` (`x0_gain_curves`);
- gradient_flow: `reach_stable_l2t`, `reach_stable_t2l`, `reach_cycle` (`parameter_reach`);
- cycle_terms: `ramp_applied`; recommended_settings: `config_weights` (`weight_schedule`);
- resources: `memory`, {"stable": {part: bytes}, "cycle": {part: bytes}} (drawn when present).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from compat import oracle

GROUPS = ("text", "latent", "shared")
TERMS = ("cycle_text", "cycle_latent")


def _finite(value) -> float | None:
    value = None if value is None else float(value)
    return value if value is not None and math.isfinite(value) else None


def trajectory_steps(stable, cycle) -> dict:
    """Per-step losses and gradient norms of the stable and cycle loop runs (`Trajectory`s), and
    the loss type each trained with (a sequential stable run alternates l2t and t2l steps).

    Args:
        stable, cycle: the two runs (anything with `losses`, `grad_norms` and optionally `config`).
    """
    return {
        kind: {
            "losses": [_finite(v) for v in run.losses],
            "grad_norms": [_finite(v) for v in run.grad_norms],
            "mode": str(run.config.loss.get("loss_type", "")) if getattr(run, "config", None) is not None else "",
        }
        for kind, run in (("stable", stable), ("cycle", cycle))
    }


def x0_gain_curves(
    schedule, t_point: float, gain_point: float, review_above: float, incompatible_above: float, points: int = 240
) -> dict:
    """|d x0 / d prediction| against t for epsilon, v and x0 on the configured schedule (closed
    forms over `oracle.alphas_cumprod`), and the gain the row measured through the trainer.

    Args:
        schedule: the configured `compat.terms.LatentSchedule` (beta_schedule, num_timesteps, parameterization).
        t_point, gain_point: the row's measured point.
        review_above, incompatible_above: the row's thresholds on the gain.
        points: samples of t in [0, 1].
    """
    beta_schedule, num_timesteps = schedule.beta_schedule, schedule.num_timesteps
    parameterization = schedule.parameterization
    table = oracle.alphas_cumprod(beta_schedule, num_timesteps)
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    ab = table[oracle.timestep_index(t, num_timesteps)]
    gains = {
        "epsilon": ((1 - ab).sqrt() / ab.sqrt()).tolist(),
        "v_param": (1 - ab).sqrt().tolist(),
        "x0": torch.ones_like(ab).tolist(),
    }
    return {
        "schedule": beta_schedule,
        "num_timesteps": int(num_timesteps),
        "parameterization": parameterization,
        "t": t.tolist(),
        "gain": gains,
        "point": {"t": float(t_point), "gain": float(gain_point)},
        "review_above": float(review_above),
        "incompatible_above": float(incompatible_above),
    }


def parameter_reach(reached: Iterable[str], model: torch.nn.Module) -> dict[str, list[int]]:
    """{group: [parameter tensors reached, parameter tensors in the group]} for text / latent / shared.

    Args:
        reached: names of the parameters that got a non-zero gradient.
        model: the model they belong to.
    """
    from latentDLM_mmdit.improved_trainer_stable import parameter_group

    reached = set(reached)
    out = {g: [0, 0] for g in GROUPS}
    for name, _ in model.named_parameters():
        counts = out.setdefault(parameter_group(name), [0, 0])
        counts[1] += 1
        counts[0] += name in reached
    return out


def weight_schedule(loss: Mapping, checked_step: int | None, checked: Mapping[str, float]) -> dict:
    """The cycle weights the config gives at each step (`oracle.ramp`, past the end of both ramps)
    and the step at which the trainer's loss was shown to follow them.

    Args:
        loss: the cycle config's `loss` section.
        checked_step: the step the row ran the trainer at (None: the trainer takes no step).
        checked: the weights its loss was shown to follow there.
    """
    ends = [int(loss[f"{t}_warmup_steps"]) + int(loss[f"{t}_ramp_steps"]) for t in TERMS]
    last = max(10, int(max(ends) * 1.25) + 2)
    steps = list(range(last + 1))
    return {
        "settings": {
            f"{t}_{k}": (float if k == "weight" else int)(loss[f"{t}_{k}"])
            for t in TERMS
            for k in ("weight", "warmup_steps", "ramp_steps")
        },
        "steps": steps,
        **{
            t: [
                oracle.ramp(s, float(loss[f"{t}_weight"]), int(loss[f"{t}_warmup_steps"]), int(loss[f"{t}_ramp_steps"]))
                for s in steps
            ]
            for t in TERMS
        },
        "checked_step": checked_step,
        "checked": {t: float(checked[t]) for t in TERMS},
    }


def golden_band(runs: Mapping, rtol: float, atol: float, path) -> dict:
    """The golden file's per-step losses and gradient norms of both runs, with its margins.

    Args:
        runs: the golden file's `runs`.
        rtol, atol: its comparison margins.
        path: the file.
    """
    return {
        "file": str(path),
        "rtol": float(rtol),
        "atol": float(atol),
        **{kind: {what: list(runs[kind][what]) for what in ("losses", "grad_norms")} for kind in ("stable", "cycle")},
    }
