"""Each loss term of an observed step, recomputed by the float64 oracle from what the model was
given and returned, and the total the config says the trainer must return.

The terms need no metric names and no trainer attributes: the T2L and cycle_latent terms are the
normalised MSE of the observed prediction to the target of the configured parameterization, built
from the batch's x0, the pass's own latent t and the noise the pass is shown to have used
(`StepRecord.noise_of`); the L2T and cycle_text terms are the cross entropy of the observed logits
over every position. The weights come from the config (`loss.*`), ramped by the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from compat import oracle
from compat.observe import CYCLE_LATENT, CYCLE_TEXT, L2T, T2L, ModelPass
from compat.subjects import StepRecord
from latentDLM_mmdit.latent_settings import resolve_latent_settings


@dataclass
class LatentSchedule:
    """The configured latent diffusion, in float64 (the oracle's own tables)."""

    alphas_cumprod: torch.Tensor  # [T] float64
    num_timesteps: int
    parameterization: str
    beta_schedule: str

    @classmethod
    def of(cls, config: DictConfig) -> "LatentSchedule":
        s = resolve_latent_settings(config)
        return cls(
            oracle.alphas_cumprod(s.beta_schedule, s.num_timesteps),
            s.num_timesteps,
            s.parameterization,
            s.beta_schedule,
        )

    def ab(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at continuous t [B]."""
        return self.alphas_cumprod[oracle.timestep_index(t, self.num_timesteps)]


@dataclass
class Terms:
    """Oracle values of the terms (None: the step made no such pass) and the expected total."""

    t2l: torch.Tensor | None = None
    l2t: torch.Tensor | None = None
    cycle_text: torch.Tensor | None = None
    cycle_latent: torch.Tensor | None = None
    weights: dict[str, float] = field(default_factory=dict)
    noise: dict[str, str] = field(default_factory=dict)  # pass kind -> which drawn noise it used
    total: torch.Tensor | None = None


def latent_term(
    record: StepRecord, p: ModelPass, x0: torch.Tensor, schedule: LatentSchedule, tolerance: str
) -> tuple[torch.Tensor, str]:
    """(normalised MSE of the pass's prediction to its target, name of the noise it used)."""
    name, noise = record.noise_of(p, x0, schedule.alphas_cumprod, schedule.num_timesteps, tolerance)
    target = oracle.target(x0, noise.double().cpu(), schedule.ab(p.timestep("latent")), schedule.parameterization)
    return oracle.normalized_mse(p.outputs[1].cpu(), target), name


def cycle_weights(config: DictConfig, step: int | None) -> dict[str, float]:
    """latent_loss_weight and the two cycle weights at `step` (None: the base weights), from the config."""
    loss = config.loss
    out = {"latent_loss_weight": float(loss.latent_loss_weight)}
    for term in ("cycle_text", "cycle_latent"):
        base = float(loss[f"{term}_weight"])
        out[term] = (
            base
            if step is None
            else oracle.ramp(step, base, int(loss[f"{term}_warmup_steps"]), int(loss[f"{term}_ramp_steps"]))
        )
    return out


def cycle_terms(
    record: StepRecord, batch: dict, config: DictConfig, step: int | None, x0: torch.Tensor, tolerance: str
) -> Terms:
    """The cycle step's four terms and its total (`latent_loss_weight * T2L + L2T + w_text *
    cycle_text + w_latent * cycle_latent`), each from its observed pass. A term whose weight is 0
    counts 0 (its pass, if made, is a cost the rows report)."""
    schedule = LatentSchedule.of(config)
    ids = batch["input_ids"].cpu()
    terms = Terms(weights=cycle_weights(config, step))
    terms.t2l, terms.noise[T2L] = latent_term(record, record.one(T2L), x0, schedule, tolerance)
    terms.l2t = oracle.ce_every_position(record.one(L2T).outputs[0].cpu(), ids)
    total = terms.weights["latent_loss_weight"] * terms.t2l + terms.l2t
    if terms.weights["cycle_text"] > 0:
        terms.cycle_text = oracle.ce_every_position(record.one(CYCLE_TEXT).outputs[0].cpu(), ids)
        total = total + terms.weights["cycle_text"] * terms.cycle_text
    if terms.weights["cycle_latent"] > 0:
        terms.cycle_latent, terms.noise[CYCLE_LATENT] = latent_term(
            record, record.one(CYCLE_LATENT), x0, schedule, tolerance
        )
        total = total + terms.weights["cycle_latent"] * terms.cycle_latent
    terms.total = total
    return terms


def stable_terms(
    record: StepRecord, batch: dict, config: DictConfig, mode: str, x0: torch.Tensor, tolerance: str
) -> Terms:
    """The stable l2t (CE over every position) or t2l (latent_loss_weight x normalised MSE) step."""
    ids = batch["input_ids"].cpu()
    terms = Terms(weights={"latent_loss_weight": float(config.loss.latent_loss_weight)})
    if mode == "l2t":
        terms.l2t = oracle.ce_every_position(record.one(L2T).outputs[0].cpu(), ids)
        terms.total = terms.l2t
    elif mode == "t2l":
        terms.t2l, terms.noise[T2L] = latent_term(record, record.one(T2L), x0, LatentSchedule.of(config), tolerance)
        terms.total = terms.weights["latent_loss_weight"] * terms.t2l
    else:
        raise ValueError(f"stable_terms covers l2t and t2l, not {mode!r}")
    return terms
