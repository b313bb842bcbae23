"""A cycle trainer that raises inside its first step: after its first model pass it reads
`self.current_step`, which nothing ever set (the constructor sets `self.global_step`), the same
AttributeError as upstream's older trainer class. A single file in a folder that is NOT a package;
it imports its sibling by `import helpers`, as a script in a user's repository would.

Load it by path: tests/foreign_trainers/raises_cycle/train_cycle.py:CycleTrainer

Gate verdict expected: every row that needs a cycle step INCOMPATIBLE (or NOT RUN) with the
AttributeError and its message reported, never OK; gate exit 1 and no traceback for the user.
"""

from __future__ import annotations

import helpers
import torch
from torch import nn

from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion


class CycleTrainer(nn.Module):
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
        self.loss_cfg = config.loss
        self.mask_token_id = tokenizer.mask_token_id
        self.diffusion = ContinuousDiffusion(
            num_timesteps=config.model.latent_timesteps,
            beta_schedule=config.model.latent_beta_schedule,
            parameterization=config.model.latent_parameterization,
        )
        self.global_step = 0

    def forward(self, batch):
        ids = batch["input_ids"]
        keep = batch["attention_mask"].bool()
        x0 = helpers.latents_2d(batch["latent"]).to(ids.device, self.dtype)  # [B, D]
        b, dev = ids.shape[0], ids.device
        t = torch.ones(b, device=dev, dtype=self.dtype)
        t_zero = torch.zeros(b, device=dev, dtype=self.dtype)
        z_t, target = self.diffusion.add_noise(x0, t, torch.randn_like(x0))
        _, pred = self.model(
            text_tokens=ids, latents=z_t[:, None], text_timesteps=t_zero, latent_timesteps=t, attention_mask=keep
        )[:2]
        t2l = helpers.unit_mse(pred, target)
        ramp = max(1, int(self.loss_cfg.cycle_text_ramp_steps))
        w_text = float(self.loss_cfg.cycle_text_weight) * min(1.0, self.current_step / ramp)  # AttributeError
        masked = torch.full_like(ids, self.mask_token_id)
        logits = self.model(
            text_tokens=masked, latents=x0[:, None], text_timesteps=t, latent_timesteps=t_zero, attention_mask=keep
        )[0]
        loss = float(self.loss_cfg.latent_loss_weight) * t2l + helpers.ce_all(logits, ids) + 0.0 * w_text
        return loss, {"loss": loss.item()}
