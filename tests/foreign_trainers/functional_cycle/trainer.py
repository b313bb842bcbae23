"""FunctionalCycleTrainer: the cycle objective as a thin module over `ops`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion

from .ops import (
    direction_mse,
    every_token_ce,
    flat_latent,
    latent_times,
    pseudo_labels,
    ramped,
    recover_x0,
)


@dataclass(frozen=True)
class CycleSettings:
    latent_weight: float
    t_mode: str
    t_lo: float
    t_hi: float
    text_weight: tuple[float, int, int]  # (base, warmup, ramp)
    latent_cycle_weight: tuple[float, int, int]
    sampling: str
    stop_grad: bool

    @classmethod
    def from_loss_config(cls, loss) -> CycleSettings:
        mode = str(loss.latent_t_mode).lower()
        mode = "full" if mode in ("full", "ones", "t1") else mode
        if mode not in ("full", "random"):
            raise ValueError(f"loss.latent_t_mode must be full or random, got {loss.latent_t_mode!r}")
        return cls(
            latent_weight=float(loss.latent_loss_weight),
            t_mode=mode,
            t_lo=float(loss.cycle_latent_t_min),
            t_hi=float(loss.cycle_latent_t_max),
            text_weight=(
                float(loss.cycle_text_weight),
                int(loss.cycle_text_warmup_steps),
                int(loss.cycle_text_ramp_steps),
            ),
            latent_cycle_weight=(
                float(loss.cycle_latent_weight),
                int(loss.cycle_latent_warmup_steps),
                int(loss.cycle_latent_ramp_steps),
            ),
            sampling=str(loss.cycle_latent_sampling).lower(),
            stop_grad=bool(loss.cycle_stop_grad_latent),
        )


class FunctionalCycleTrainer(nn.Module):
    """Args:
        model: the MultimodalMMDiT, called with keywords; its second output is the latent guess.
        tokenizer: anything with `mask_token_id`.
        text_noise_schedule: kept as an attribute (checkpoint layout), not used by the objective.
        dtype: dtype of latents and times fed to the model.
        config: an OmegaConf config with `model.latent_*` and the `loss.*` cycle keys.

    Set `iteration` before a step to apply the warmup/ramp of the cycle weights; None (the
    default) uses the base weights.
    """

    def __init__(self, model, tokenizer, text_noise_schedule, dtype, config):
        super().__init__()
        self.model = model
        self.text_noise_schedule = text_noise_schedule
        self.dtype = dtype
        self.mask_id = int(tokenizer.mask_token_id)
        self.settings = CycleSettings.from_loss_config(config.loss)
        self.diffusion = ContinuousDiffusion(
            num_timesteps=int(config.model.latent_timesteps),
            beta_schedule=str(config.model.latent_beta_schedule),
            parameterization=str(config.model.latent_parameterization),
            device="cpu",
        )
        self.iteration: int | None = None

    def _call(self, tokens, latents_bd, t_text, t_latent, keep):
        text_logits, latent_guess = self.model(
            text_tokens=tokens,
            latents=latents_bd[:, None],
            text_timesteps=t_text,
            latent_timesteps=t_latent,
            attention_mask=keep,
        )[:2]
        return text_logits, latent_guess  # [B, S, V], [B, 1, D]

    def forward(self, batch):
        s = self.settings
        ids = batch["input_ids"]  # [B, S]
        n, dev = ids.shape[0], ids.device
        keep = batch.get("attention_mask")
        keep = None if keep is None else keep.bool()
        clean = flat_latent(batch["latent"]).to(dev, self.dtype)  # [B, D]
        zeros = torch.zeros(n, device=dev, dtype=self.dtype)
        ones = torch.ones(n, device=dev, dtype=self.dtype)
        w_text = ramped(*s.text_weight, self.iteration)
        w_latent = ramped(*s.latent_cycle_weight, self.iteration)

        t = latent_times(s.t_mode, s.t_lo, s.t_hi, n, dev).to(self.dtype)
        noisy, goal = self.diffusion.add_noise(clean, t, torch.randn_like(clean))  # [B, D]
        _, guess = self._call(ids, noisy, zeros, t, keep)
        t2l = direction_mse(guess, goal)

        all_masked = torch.full_like(ids, self.mask_id)
        l2t_logits, _ = self._call(all_masked, clean, ones, zeros, keep)
        l2t = every_token_ce(l2t_logits, ids)

        x0_hat = recover_x0(self.diffusion, noisy, t, guess)  # [B, D]
        if s.stop_grad:
            x0_hat = x0_hat.detach()
        cycle_logits, _ = self._call(all_masked, x0_hat.to(self.dtype), ones, zeros, keep)
        cycle_text = every_token_ce(cycle_logits, ids)

        cycle_latent = torch.zeros((), device=dev, dtype=self.dtype)
        if w_latent > 0.0:
            with torch.no_grad():
                pseudo = pseudo_labels(l2t_logits.detach(), s.sampling)  # [B, S]
            t2 = latent_times(s.t_mode, s.t_lo, s.t_hi, n, dev).to(self.dtype)
            noisy2, goal2 = self.diffusion.add_noise(clean, t2, torch.randn_like(clean))
            _, guess2 = self._call(pseudo, noisy2, zeros, t2, keep)
            cycle_latent = direction_mse(guess2, goal2)

        loss = s.latent_weight * t2l + l2t + w_text * cycle_text + w_latent * cycle_latent
        stats = {
            "loss": loss.item(),
            "t2l": t2l.item(),
            "l2t": l2t.item(),
            "cycle_text": cycle_text.item(),
            "cycle_latent": cycle_latent.item(),
            "w_cycle_text": w_text,
            "w_cycle_latent": w_latent,
        }
        return loss, stats
