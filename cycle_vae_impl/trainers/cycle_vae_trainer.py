"""The cycle trainer: base T2L + base L2T + cycle_text (T2L2T) + cycle_latent (L2T2L).

Same terms as upstream's `CycleVAETrainer`, made to run on the real model (upstream defect 1:
latent_pred is [B,1,D], so the x0 reconstruction and the latent MSE must not broadcast against
[B,D]). Per step, with B samples:

    T2L          model(clean text, z_t = noised latent at t_lat, t_text=0, t_lat)      -> latent MSE
    L2T          model(all [MASK], clean latent, t_text=1, t_lat=0)                    -> CE, all positions
    cycle_text   x0 from the T2L output (stop-grad optional), model(all [MASK], x0)   -> CE
    cycle_latent pseudo tokens from the L2T logits, model(pseudo, z_t2 at t_lat2)     -> latent MSE

    loss = latent_loss_weight * T2L + L2T + w_text(step) * cycle_text + w_latent(step) * cycle_latent

A term whose weight is 0 at this step costs no model pass.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from latentDLM_mmdit.draws import DrawSource
from latentDLM_mmdit.trainer_base import (
    FALLBACK_TOTAL_LOSS,
    DiffusionTrainerBase,
    prepare_batch,
    split_model_outputs,
)
from latentDLM_mmdit.losses import is_finite, masked_text_ce, normalized_latent_mse
from latentDLM_mmdit.settings import CYCLE_LOSS_TYPE, LATENT_T_MODES, PSEUDO_TOKEN_SAMPLINGS, require

LATENT_T_CAP = 0.9999


def ramp_weight(step: int | None, base: float, warmup_steps: int, ramp_steps: int) -> float:
    """0 before `warmup_steps`, then linear from 0 to `base` over `ramp_steps` (upstream's ramp).
    With no step (evaluation) the base weight applies."""
    if step is None:
        return base
    if base <= 0.0 or step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return base
    return base * min(1.0, (step - warmup_steps) / float(ramp_steps))


def pseudo_tokens_from_logits(logits: torch.Tensor, sampling: str, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B, S] from logits [B, S, V]: argmax, or a categorical draw by inverse CDF of
    softmax(logits) at the uniforms `uniform` [B, S]."""
    if sampling == "argmax":
        return logits.argmax(dim=-1)
    if sampling == "categorical":
        if uniform is None or uniform.shape != logits.shape[:2]:
            raise ValueError(f"categorical pseudo tokens need uniforms of shape {tuple(logits.shape[:2])}")
        cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)  # [B, S, V]
        idx = torch.searchsorted(cdf, uniform.to(cdf.device, cdf.dtype).unsqueeze(-1).contiguous())
        return idx.squeeze(-1).clamp(max=logits.shape[-1] - 1)
    raise ValueError(f"unknown loss.cycle_latent_sampling {sampling!r}; valid: {', '.join(PSEUDO_TOKEN_SAMPLINGS)}")


class CycleVAETrainer(DiffusionTrainerBase):
    """Cycle trainer.

    Args:
        model: a `MultimodalMMDiT` (outputs [B,1,D] or [B,D] latents; a cluster head is fine).
        tokenizer: anything with `mask_token_id`, `pad_token_id`, `__len__`.
        text_noise_schedule: the text `MaskedDiffusion` (kept for checkpoint layout parity).
        dtype: dtype of latents and timesteps fed to the model.
        config: the run config (mapping or DictConfig), validated against the schema
            (`latentDLM_mmdit.settings`, where the defaults are stated: the review's recommended
            values, or upstream's under `profile: upstream`); reads `loss.loss_type` (must be
            cycle_vae), `loss.latent_loss_weight`, `loss.latent_t_mode` (full | random),
            `loss.cycle_latent_t_min` / `_t_max`, `loss.cycle_text_weight`,
            `loss.cycle_latent_weight`, their `*_warmup_steps` / `*_ramp_steps`,
            `loss.cycle_latent_sampling` (argmax | categorical), `loss.cycle_stop_grad_latent`,
            `loss.on_nonfinite` (upstream | raise), `training.seed` and `model.latent_*`.
    """

    DRAW_NAMES = ("latent_t", "latent_noise", "cycle_latent_t", "cycle_latent_noise", "pseudo_token_uniform")

    def __init__(
        self, model: nn.Module, tokenizer: Any, text_noise_schedule: nn.Module, dtype: torch.dtype, config: Any
    ):
        super().__init__(model, tokenizer, text_noise_schedule, dtype, config)
        require(self.settings, ["loss.loss_type"], type(self).__name__)
        loss = self.settings.loss  # validated: types, ranges and choices checked by the schema
        if loss.loss_type != CYCLE_LOSS_TYPE:
            raise ValueError(f"CycleVAETrainer needs loss.loss_type={CYCLE_LOSS_TYPE}, got {loss.loss_type!r}")
        self.latent_t_mode = LATENT_T_MODES[loss.latent_t_mode]
        self.latent_t_min = loss.cycle_latent_t_min
        self.latent_t_max = loss.cycle_latent_t_max
        self.weights = {
            term: (loss[f"{term}_weight"], loss[f"{term}_warmup_steps"], loss[f"{term}_ramp_steps"])
            for term in ("cycle_text", "cycle_latent")
        }
        self.pseudo_token_sampling = loss.cycle_latent_sampling
        self.stop_grad_latent = loss.cycle_stop_grad_latent
        self.last_model_passes = 0
        self.last_weights = (0.0, 0.0)  # (w_text, w_latent) of the last step, as Python floats

    # -- pieces ---------------------------------------------------------------------------------
    def term_weight(self, term: str, step: int | None) -> float:
        return ramp_weight(step, *self.weights[term])

    @torch.compiler.disable  # the step's weights enter a compiled step as tensors, never as Python floats
    def term_weights(self, step: int | None) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
        """(w_text, w_latent, text_on, latent_on) at `step`: the weights as 0-dim float32 tensors
        and whether each term runs (weight > 0). Under torch.compile a per-step Python float would be
        a constant of the graph (a recompilation at every step of a ramp); tensors are inputs, and
        only the two flags, which change once per term at the end of its warmup, are guarded. The
        product with a float32 loss is the one a Python float gives (the scalar is rounded to float32)."""
        w_text, w_latent = self.term_weight("cycle_text", step), self.term_weight("cycle_latent", step)
        self.last_weights = (w_text, w_latent)  # the exact values, for the metrics
        as_tensor = lambda w: torch.tensor(w, dtype=torch.float32)  # noqa: E731  (on the CPU; moved in the step)
        return as_tensor(w_text), as_tensor(w_latent), w_text > 0.0, w_latent > 0.0

    def sample_latent_t(self, source: DrawSource, name: str, batch_size: int, device) -> torch.Tensor:
        """t = 1 in `full` mode (no draw); U[t_min, t_max] clamped below 0.9999 in `random` mode."""
        if self.latent_t_mode == "full":
            return torch.ones(batch_size, device=device)
        u = source.uniform(name, (batch_size,), device)
        t = self.latent_t_min + (self.latent_t_max - self.latent_t_min) * u
        return torch.clamp(t, max=LATENT_T_CAP)

    def l2t_text_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2T as the stable trainer does it: every token [MASK] ([B,S]) and the CE over every
        position, padding included ([B,S] bool)."""
        return torch.full_like(input_ids, self.mask_token_id), torch.ones_like(input_ids, dtype=torch.bool)

    def _run(self, text_tokens, latents_2d, text_t, latent_t, attention_mask):
        return split_model_outputs(
            self.model(
                text_tokens=text_tokens,
                latents=latents_2d.unsqueeze(1),  # [B, 1, D]; x_t stays in the schedule's float32, as in stable T2L
                text_timesteps=text_t,
                latent_timesteps=latent_t,
                attention_mask=attention_mask,
            )
        )

    def _finite_or_zero(self, value: torch.Tensor, name: str, nonfinite: list[str], zero: torch.Tensor):
        if is_finite(value):
            return value
        nonfinite.append(name)
        return zero

    @torch.compiler.disable  # Python floats for the log: outside a compiled step's graph
    def _metrics(
        self,
        total,
        t2l_loss,
        l2t_loss,
        cycle_text_loss,
        cycle_latent_loss,
        t_lat,
        latent_pred,
        x0_pred,
        nonfinite,
    ) -> dict[str, Any]:
        with torch.no_grad():
            x0_gain = self.latent_diffusion.x0_error_gain(t_lat)
            metrics: dict[str, Any] = {
                "loss": float(total.item()),
                "base_t2l_latent_loss": float(t2l_loss.item()),
                "base_l2t_text_loss": float(l2t_loss.item()),
                "cycle_text_loss": float(cycle_text_loss.item()),
                "cycle_text_weight": self.last_weights[0],
                "cycle_latent_loss": float(cycle_latent_loss.item()),
                "cycle_latent_weight": self.last_weights[1],
                "cycle_latent_sampling": self.pseudo_token_sampling,
                "t_lat_mean": float(t_lat.float().mean().item()),
                "latent_pred_norm": float(latent_pred.float().norm(dim=-1).mean().item()),
                "x0_pred_norm": float(x0_pred.float().norm(dim=-1).mean().item()),
                "x0_error_gain_max": float(x0_gain.max().item()),
                "model_passes": self.last_model_passes,
            }
            if nonfinite:
                metrics["nonfinite"] = list(nonfinite)
        return metrics

    # -- the step -------------------------------------------------------------------------------
    # Under torch.compile (training.compile_model) dynamo skips this frame but traces what it calls:
    # the schedule (step -> weights) is host-side Python, `cycle_step` is the traced tensor program and
    # gets the weights as tensors, so a ramp reuses one graph.
    @torch.compiler.disable(recursive=False)
    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        step: int | None = None,
        draws: Mapping[str, torch.Tensor] | None = None,
    ):
        """One cycle step. Returns (loss, metrics).

        Args:
            batch: `input_ids` [B,S] int, `latent` [B,D] or [B,1,D], optional `attention_mask` [B,S].
            step: global step for the cycle weight warmup and ramp (None: base weights).
            draws: optional injected draws: `latent_t` [B] and `cycle_latent_t` [B] (U[0,1)
                uniforms, random mode only), `latent_noise` [B,D], `cycle_latent_noise` [B,D],
                `pseudo_token_uniform` [B,S] (categorical sampling only).
        """
        return self.cycle_step(batch, *self.term_weights(step), draws=draws)

    def cycle_step(
        self,
        batch: Mapping[str, torch.Tensor],
        w_text: torch.Tensor,
        w_latent: torch.Tensor,
        text_on: bool,
        latent_on: bool,
        draws: Mapping[str, torch.Tensor] | None = None,
    ):
        """The step with the cycle weights given (0-dim float32 tensors; Python floats are accepted, at the
        cost of a recompilation per value under torch.compile) and whether each term runs."""
        source = DrawSource(self.generator, draws, self.DRAW_NAMES, "cycle trainer")
        input_ids, attention_mask, latents = prepare_batch(batch, self.dtype, "cycle trainer")
        batch_size = input_ids.shape[0]
        device = input_ids.device
        zero = torch.zeros((), device=device, dtype=self.dtype)
        nonfinite: list[str] = []
        # [], []: 0-dim tensors (a Python float would be a constant of a compiled graph, see term_weights)
        w_text = torch.as_tensor(w_text, dtype=torch.float32, device=device)
        w_latent = torch.as_tensor(w_latent, dtype=torch.float32, device=device)
        t_text_clean = torch.zeros(batch_size, device=device, dtype=self.dtype)
        t_text_full = torch.ones(batch_size, device=device, dtype=self.dtype)
        t_latent_clean = torch.zeros(batch_size, device=device, dtype=self.dtype)
        all_masked, every_position = self.l2t_text_inputs(input_ids)

        # Base T2L: clean text, latent noised at t_lat.
        t_lat = self.sample_latent_t(source, "latent_t", batch_size, device).to(self.dtype)
        noise = source.normal("latent_noise", tuple(latents.shape), device).to(latents.dtype)
        z_t, latent_target = self.latent_diffusion.add_noise(latents, t_lat, noise)  # [B, D]
        _, latent_pred = self._run(input_ids, z_t, t_text_clean, t_lat, attention_mask)  # [B, 1, D]
        if is_finite(latent_pred):
            t2l_loss = self._finite_or_zero(
                normalized_latent_mse(latent_pred, latent_target), "base_t2l_latent_loss", nonfinite, zero
            )
        else:
            nonfinite.append("latent_pred")
            t2l_loss = zero

        # Base L2T: every token masked, clean latent, CE over every position.
        text_logits_l2t, _ = self._run(all_masked, latents, t_text_full, t_latent_clean, attention_mask)
        l2t_loss = self._finite_or_zero(
            masked_text_ce(text_logits_l2t, input_ids, every_position), "base_l2t_text_loss", nonfinite, zero
        )

        # x0 from the T2L prediction (the prediction given z_t's shape: no [B,B,D] broadcast).
        x0_pred = self.latent_diffusion.x0_from_prediction(z_t, t_lat, latent_pred.reshape(z_t.shape))  # [B, D]

        cycle_text_loss = zero
        if text_on:
            x0_cycle = x0_pred.detach() if self.stop_grad_latent else x0_pred
            text_logits_cycle, _ = self._run(
                all_masked, x0_cycle.to(self.dtype), t_text_full, t_latent_clean, attention_mask
            )
            cycle_text_loss = self._finite_or_zero(
                masked_text_ce(text_logits_cycle, input_ids, every_position), "cycle_text_loss", nonfinite, zero
            )

        cycle_latent_loss = zero
        if latent_on:
            with torch.no_grad():
                uniform = None
                if self.pseudo_token_sampling == "categorical":
                    uniform = source.uniform("pseudo_token_uniform", tuple(input_ids.shape), device)
                pseudo = pseudo_tokens_from_logits(text_logits_l2t.detach(), self.pseudo_token_sampling, uniform)
            t_lat2 = self.sample_latent_t(source, "cycle_latent_t", batch_size, device).to(self.dtype)
            noise2 = source.normal("cycle_latent_noise", tuple(latents.shape), device).to(latents.dtype)
            z_t2, latent_target2 = self.latent_diffusion.add_noise(latents, t_lat2, noise2)
            _, latent_pred2 = self._run(pseudo, z_t2, t_text_clean, t_lat2, attention_mask)
            if is_finite(latent_pred2):
                cycle_latent_loss = self._finite_or_zero(
                    normalized_latent_mse(latent_pred2, latent_target2), "cycle_latent_loss", nonfinite, zero
                )
            else:
                nonfinite.append("latent_pred2")
        self.unused_draws = source.unused()
        self.last_draws = source.used

        total = self.latent_loss_weight * t2l_loss + l2t_loss + w_text * cycle_text_loss + w_latent * cycle_latent_loss
        if not is_finite(total):
            nonfinite.append("loss")
            total = torch.tensor(FALLBACK_TOTAL_LOSS, device=device, dtype=self.dtype)
        self.report_nonfinite("cycle trainer", nonfinite)

        self.last_model_passes = 2 + int(text_on) + int(latent_on)
        metrics = self._metrics(
            total,
            t2l_loss,
            l2t_loss,
            cycle_text_loss,
            cycle_latent_loss,
            t_lat,
            latent_pred,
            x0_pred,
            nonfinite,
        )
        return total, metrics
