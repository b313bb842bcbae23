"""A cycle trainer that draws the T2L latent time uniformly from
[loss.cycle_latent_t_min, loss.cycle_latent_t_max) whatever `loss.latent_t_mode` says: with
`full` (t = 1, how the stable trainer trained T2L) it still trains at t ~ U[0, 0.98). Otherwise
correct. It declares DRAW_NAMES and accepts `step=` and `draws=`; draws not injected come from its
own generator seeded by `training.seed`. A single file in a folder that is NOT a package,
importing its sibling by `import helpers`.

Load it by path: tests/foreign_trainers/uniform_t_cycle/uniform_t_trainer.py:UniformTimeCycleTrainer

Gate verdict expected: INCOMPATIBLE on the T2L latent timestep row (the observed T2L latent
timesteps are not all 1 under latent_t_mode: full); gate exit 1.
"""

from __future__ import annotations

import helpers
import torch
from torch import nn

from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion


class UniformTimeCycleTrainer(nn.Module):
    """Args:
    model: the MultimodalMMDiT.
    tokenizer: anything with `mask_token_id`.
    text_noise_schedule: kept as an attribute, unused.
    dtype: dtype of latents and timesteps fed to the model.
    config: OmegaConf config (`model.latent_*`, `loss.*` cycle keys, `training.seed`).
    """

    DRAW_NAMES = ("latent_t", "latent_noise", "cycle_latent_t", "cycle_latent_noise")

    def __init__(self, model, tokenizer, text_noise_schedule, dtype, config):
        super().__init__()
        self.model = model
        self.text_noise_schedule = text_noise_schedule
        self.dtype = dtype
        self.loss_cfg = config.loss
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.diffusion = ContinuousDiffusion(
            num_timesteps=config.model.latent_timesteps,
            beta_schedule=config.model.latent_beta_schedule,
            parameterization=config.model.latent_parameterization,
            device="cpu",
        )
        self.generator = torch.Generator().manual_seed(int(config.training.seed))

    def weight(self, term: str, step: int | None) -> float:
        base = float(self.loss_cfg[f"{term}_weight"])
        warmup, ramp = int(self.loss_cfg[f"{term}_warmup_steps"]), int(self.loss_cfg[f"{term}_ramp_steps"])
        if step is None:
            return base
        if base <= 0.0 or step < warmup:
            return 0.0
        return base if ramp <= 0 else base * min(1.0, (step - warmup) / ramp)

    def latent_time(self, draws: helpers.Draws, name: str, b: int, device) -> torch.Tensor:
        lo, hi = float(self.loss_cfg.cycle_latent_t_min), float(self.loss_cfg.cycle_latent_t_max)
        u = draws.take(name, (b,), normal=False).to(device)
        return (lo + (hi - lo) * u).clamp(max=0.9999)  # ignores latent_t_mode

    def run(self, ids, latents_2d, t_text, t_latent, keep):
        out = self.model(
            text_tokens=ids,
            latents=latents_2d.unsqueeze(1),
            text_timesteps=t_text,
            latent_timesteps=t_latent,
            attention_mask=keep,
        )
        return out[0], out[1]  # [B, S, V], [B, 1, D]

    def forward(self, batch, step=None, draws=None):
        source = helpers.Draws(self.generator, draws, self.DRAW_NAMES)
        ids = batch["input_ids"]
        keep = batch.get("attention_mask")
        keep = keep.bool() if keep is not None else None
        x0 = batch["latent"].reshape(ids.shape[0], -1).to(ids.device, self.dtype)  # [B, D]
        b, dim = x0.shape
        dev = ids.device
        zeros = torch.zeros(b, device=dev, dtype=self.dtype)
        ones = torch.ones(b, device=dev, dtype=self.dtype)

        t = self.latent_time(source, "latent_t", b, dev).to(self.dtype)
        noise = source.take("latent_noise", (b, dim), normal=True).to(dev)
        z_t, target = self.diffusion.add_noise(x0, t, noise)
        _, pred = self.run(ids, z_t, zeros, t, keep)
        t2l = helpers.normalized_mse(pred, target)

        masked = torch.full_like(ids, self.mask_token_id)
        l2t_logits, _ = self.run(masked, x0, ones, zeros, keep)
        l2t = helpers.full_ce(l2t_logits, ids)

        w_text, w_latent = self.weight("cycle_text", step), self.weight("cycle_latent", step)
        cycle_text = torch.zeros((), device=dev)
        if w_text > 0.0:
            x0_hat = self.diffusion.x0_from_prediction(z_t, t, pred.reshape(z_t.shape))
            if bool(self.loss_cfg.cycle_stop_grad_latent):
                x0_hat = x0_hat.detach()
            cycle_text = helpers.full_ce(self.run(masked, x0_hat.to(self.dtype), ones, zeros, keep)[0], ids)
        cycle_latent = torch.zeros((), device=dev)
        if w_latent > 0.0:
            with torch.no_grad():
                if str(self.loss_cfg.cycle_latent_sampling) == "categorical":
                    probs = l2t_logits.float().softmax(-1).reshape(-1, l2t_logits.shape[-1])
                    pseudo = torch.multinomial(probs.cpu(), 1, generator=self.generator).view(ids.shape).to(dev)
                else:
                    pseudo = l2t_logits.argmax(-1)
            t2 = self.latent_time(source, "cycle_latent_t", b, dev).to(self.dtype)
            noise2 = source.take("cycle_latent_noise", (b, dim), normal=True).to(dev)
            z_t2, target2 = self.diffusion.add_noise(x0, t2, noise2)
            cycle_latent = helpers.normalized_mse(self.run(pseudo, z_t2, zeros, t2, keep)[1], target2)

        loss = float(self.loss_cfg.latent_loss_weight) * t2l + l2t + w_text * cycle_text + w_latent * cycle_latent
        return loss, {"loss": loss.item(), "t2l": t2l.item(), "l2t": l2t.item(), "t_latent_mean": t.mean().item()}
