"""CycleVAETrainer as upstream wrote it, with the [B, 1, D] vs [B, D] broadcast left in (see the
package docstring). Random numbers come from torch's global RNG."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion


class CycleVAETrainer(nn.Module):
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
        self.config = config
        self.mask_token_id = tokenizer.mask_token_id
        self.latent_diffusion = ContinuousDiffusion(
            num_timesteps=config.model.get("latent_timesteps", 1000),
            beta_schedule=config.model.get("latent_beta_schedule", "cosine"),
            parameterization=config.model.get("latent_parameterization", "epsilon"),
            device="cuda" if torch.cuda.is_available() else "cpu",
        )

    def _latent_t(self, batch_size, device):
        loss = self.config.loss
        if str(loss.latent_t_mode).lower() in ("full", "ones", "t1"):
            return torch.ones(batch_size, device=device)
        t = loss.cycle_latent_t_min + (loss.cycle_latent_t_max - loss.cycle_latent_t_min) * torch.rand(
            batch_size, device=device
        )
        return torch.clamp(t, max=0.9999)

    def _ramp(self, step, base, warmup, ramp):
        if step is None:
            return base
        if base <= 0.0 or step < warmup:
            return 0.0
        return base if ramp <= 0 else base * min(1.0, (step - warmup) / float(ramp))

    @staticmethod
    def _latent_mse(pred, target):
        # pred [B, 1, D], target [B, D]: the difference broadcasts to [B, B, D].
        pred = F.normalize(pred, p=2, dim=-1, eps=1e-8)
        target = F.normalize(target, p=2, dim=-1, eps=1e-8)
        return ((pred - target) ** 2).mean().clamp(0.0, 10.0)

    @staticmethod
    def _ce(logits, target):
        vocab = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1)).clamp(0.0, 100.0)

    def _x0(self, z_t, t, pred):
        param = self.latent_diffusion.parameterization
        if param == "epsilon":
            x0 = self.latent_diffusion.predict_x0_from_eps(z_t, t, pred)
        elif param == "v_param":
            x0 = self.latent_diffusion.predict_x0_from_v(z_t, t, pred)
        else:
            x0 = pred
        if x0.dim() == 3:  # [B, B, D] from the broadcast; averaged so that the model accepts it
            x0 = x0.mean(dim=1)
        return x0

    def forward(self, batch, step=None):
        loss_cfg = self.config.loss
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = mask.bool() if mask is not None else None
        latents = batch["latent"]
        latents = latents.squeeze(1) if latents.dim() == 3 else latents
        latents = latents.to(input_ids.device, self.dtype)  # [B, D]
        b, device = input_ids.shape[0], input_ids.device
        t_clean = torch.zeros(b, device=device, dtype=self.dtype)
        t_full = torch.ones(b, device=device, dtype=self.dtype)

        t_lat = self._latent_t(b, device).to(self.dtype)
        z_t, target = self.latent_diffusion.add_noise(latents, t_lat, torch.randn_like(latents))
        _, latent_pred = self.model(
            text_tokens=input_ids,
            latents=z_t.unsqueeze(1),
            text_timesteps=t_clean,
            latent_timesteps=t_lat,
            attention_mask=mask,
        )[:2]
        t2l = self._latent_mse(latent_pred, target)

        masked = torch.full_like(input_ids, self.mask_token_id)
        logits_l2t = self.model(
            text_tokens=masked,
            latents=latents.unsqueeze(1),
            text_timesteps=t_full,
            latent_timesteps=t_clean,
            attention_mask=mask,
        )[0]
        l2t = self._ce(logits_l2t, input_ids)

        x0 = self._x0(z_t, t_lat, latent_pred)
        if bool(loss_cfg.cycle_stop_grad_latent):
            x0 = x0.detach()
        logits_cycle = self.model(
            text_tokens=masked,
            latents=x0.to(self.dtype).unsqueeze(1),
            text_timesteps=t_full,
            latent_timesteps=t_clean,
            attention_mask=mask,
        )[0]
        cycle_text = self._ce(logits_cycle, input_ids)
        w_text = self._ramp(
            step,
            float(loss_cfg.cycle_text_weight),
            int(loss_cfg.cycle_text_warmup_steps),
            int(loss_cfg.cycle_text_ramp_steps),
        )

        w_latent = self._ramp(
            step,
            float(loss_cfg.cycle_latent_weight),
            int(loss_cfg.cycle_latent_warmup_steps),
            int(loss_cfg.cycle_latent_ramp_steps),
        )
        cycle_latent = torch.zeros((), device=device, dtype=self.dtype)
        if w_latent > 0.0:
            with torch.no_grad():
                if str(loss_cfg.cycle_latent_sampling) == "categorical":
                    probs = torch.softmax(logits_l2t.float(), dim=-1)
                    pseudo = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(b, -1)
                else:
                    pseudo = logits_l2t.argmax(dim=-1)
            t_lat2 = self._latent_t(b, device).to(self.dtype)
            z_t2, target2 = self.latent_diffusion.add_noise(latents, t_lat2, torch.randn_like(latents))
            _, latent_pred2 = self.model(
                text_tokens=pseudo,
                latents=z_t2.unsqueeze(1),
                text_timesteps=t_clean,
                latent_timesteps=t_lat2,
                attention_mask=mask,
            )[:2]
            cycle_latent = self._latent_mse(latent_pred2, target2)

        w_t2l = float(loss_cfg.latent_loss_weight)
        total = w_t2l * t2l + l2t + w_text * cycle_text + w_latent * cycle_latent
        metrics = {
            "loss": total.item(),
            "base_t2l_latent_loss": t2l.item(),
            "base_l2t_text_loss": l2t.item(),
            "cycle_text_loss": cycle_text.item(),
            "cycle_latent_loss": cycle_latent.item(),
        }
        return total, metrics
