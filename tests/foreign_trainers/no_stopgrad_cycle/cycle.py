"""NoStopGradCycleTrainer (see the package docstring for its defect)."""

from __future__ import annotations

import torch
from torch import nn

from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion
from no_stopgrad_cycle.terms import (
    categorical_tokens,
    latent_term,
    text_term,
    warm_ramp,
)


class NoStopGradCycleTrainer(nn.Module):
    """Args:
    model: the MultimodalMMDiT.
    tokenizer: anything with `mask_token_id`.
    text_noise_schedule: kept as an attribute, unused.
    dtype: dtype of latents and timesteps fed to the model.
    config: OmegaConf config (`model.latent_*`, `loss.*` cycle keys).
    """

    def __init__(self, model, tokenizer, text_noise_schedule, dtype, config):
        super().__init__()
        self.model = model
        self.text_noise_schedule = text_noise_schedule
        self.dtype = dtype
        self.cfg = config.loss
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.latent_diffusion = ContinuousDiffusion(
            num_timesteps=config.model.latent_timesteps,
            beta_schedule=config.model.latent_beta_schedule,
            parameterization=config.model.latent_parameterization,
        )

    def sample_t(self, n: int, device) -> torch.Tensor:
        if str(self.cfg.latent_t_mode) == "full":
            return torch.ones(n, device=device)
        lo, hi = float(self.cfg.cycle_latent_t_min), float(self.cfg.cycle_latent_t_max)
        return (lo + (hi - lo) * torch.rand(n, device=device)).clamp(max=0.9999)

    def t2l(self, ids, x0, t, noise, keep, zeros):
        z_t, target = self.latent_diffusion.add_noise(x0, t, noise)  # [B, D]
        pred = self.model(
            text_tokens=ids, latents=z_t.unsqueeze(1), text_timesteps=zeros, latent_timesteps=t, attention_mask=keep
        )[1]  # [B, 1, D]
        return z_t, pred, latent_term(pred, target)

    def l2t(self, latents_2d, ids, keep, ones, zeros):
        masked = torch.full_like(ids, self.mask_token_id)
        logits = self.model(
            text_tokens=masked,
            latents=latents_2d.unsqueeze(1),
            text_timesteps=ones,
            latent_timesteps=zeros,
            attention_mask=keep,
        )[0]  # [B, S, V]
        return logits, text_term(logits, ids)

    def forward(self, batch, step=None):
        ids = batch["input_ids"]
        keep = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else None
        x0 = batch["latent"].flatten(1).to(ids.device, self.dtype)  # [B, D]
        n, dev = ids.shape[0], ids.device
        zeros = torch.zeros(n, device=dev, dtype=self.dtype)
        ones = torch.ones(n, device=dev, dtype=self.dtype)
        w_text = warm_ramp(
            float(self.cfg.cycle_text_weight),
            int(self.cfg.cycle_text_warmup_steps),
            int(self.cfg.cycle_text_ramp_steps),
            step,
        )
        w_latent = warm_ramp(
            float(self.cfg.cycle_latent_weight),
            int(self.cfg.cycle_latent_warmup_steps),
            int(self.cfg.cycle_latent_ramp_steps),
            step,
        )

        t = self.sample_t(n, dev).to(self.dtype)
        z_t, pred, base_t2l = self.t2l(ids, x0, t, torch.randn_like(x0), keep, zeros)
        l2t_logits, base_l2t = self.l2t(x0, ids, keep, ones, zeros)

        x0_hat = self.latent_diffusion.x0_from_prediction(z_t, t, pred.reshape(z_t.shape))
        if bool(self.cfg.cycle_stop_grad_latent):
            x0_hat.detach()  # the defect: the detached copy is thrown away
        _, cycle_text = self.l2t(x0_hat.to(self.dtype), ids, keep, ones, zeros)

        cycle_latent = torch.zeros((), device=dev, dtype=self.dtype)
        if w_latent > 0.0:
            with torch.no_grad():
                if str(self.cfg.cycle_latent_sampling) == "categorical":
                    pseudo = categorical_tokens(l2t_logits)
                else:
                    pseudo = l2t_logits.argmax(-1)
            t2 = self.sample_t(n, dev).to(self.dtype)
            _, _, cycle_latent = self.t2l(pseudo, x0, t2, torch.randn_like(x0), keep, zeros)

        loss = float(self.cfg.latent_loss_weight) * base_t2l + base_l2t + w_text * cycle_text + w_latent * cycle_latent
        return loss, {
            "loss": loss.item(),
            "base_t2l": base_t2l.item(),
            "base_l2t": base_l2t.item(),
            "cycle_text": cycle_text.item(),
            "cycle_latent": cycle_latent.item(),
        }
