"""Masked (absorbing-state) diffusion for text, as in MDLM (Sahoo et al., 2024).

sigma(t) = -log1p(-(1 - eps) * clip(t, eps, 1)), move chance = 1 - exp(-sigma(t)): a token is
replaced by the mask id where a uniform draw is below the move chance.

The module's buffers (`log_prior`, `log_gamma`, `log_B`) are those upstream checkpoints carry as
`text_noise_schedule.*`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from latentDLM_mmdit.tokenizer import check_vocab


class MaskedDiffusion(nn.Module):
    """Args:
        tokenizer: anything with `mask_token_id`, `pad_token_id` and `__len__` (the vocab size).
        eps: clip and scale epsilon of sigma(t) (1e-4, as upstream).

    Upstream names: the constructor `MaskedDiffusion(tokenizer)`, `sample_zt(input_ids, t)` (with
    no generator it draws from torch's global RNG, as upstream's `torch.rand_like`), `mask_id`,
    `vocab_size`, the `log_prior` / `log_gamma` / `log_B` buffers, and the alias `get_sigmas`.
    """

    def __init__(self, tokenizer, eps: float = 1e-4):
        super().__init__()
        check_vocab(tokenizer)
        self.mask_id = int(tokenizer.mask_token_id)
        self.vocab_size = len(tokenizer)
        self.eps = eps
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_id} is outside the vocabulary [0, {self.vocab_size})")
        prior = torch.full((self.vocab_size,), -1e3)
        prior[self.mask_id] = 0
        self.register_buffer("log_prior", prior - prior.logsumexp(-1, keepdim=True))
        self.register_buffer("log_gamma", torch.tensor(0.0))
        self.register_buffer("log_B", torch.tensor(-20.0))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t.clip(self.eps, 1))

    def get_sigmas(self, t: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream alias: (dsigma/dt, sigma(t)), each shaped like t.

        sigma is `sigma(t)`; dsigma = (1 - eps) / (1 - (1 - eps) * clip(t, eps, 1)), its derivative
        inside the clip range (MDLM's loss weight).

        Args:
            t: diffusion times in [0, 1].
            eps: the clip and scale epsilon; None uses this schedule's (1e-4, upstream's default).
        """
        eps = self.eps if eps is None else eps
        clipped = t.clip(eps, 1)
        dsigma = (1 - eps) / (1 - (1 - eps) * clipped)
        sigma = -torch.log1p(-(1 - eps) * clipped)
        return dsigma, sigma

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t, [B]."""
        return 1 - torch.exp(-self.sigma(t))

    def sample_zt(
        self,
        input_ids: torch.Tensor,
        t: torch.Tensor,
        uniform: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masks each token of `input_ids` [B, S] with probability move_chance(t) [B].

        Args:
            input_ids: clean token ids [B, S].
            t: diffusion times in [0, 1], [B].
            uniform: the U[0, 1) draws [B, S] compared with the move chance; drawn from
                `generator` when None (injected draws make two runs see the same mask).
            generator: torch.Generator for the uniform draw when `uniform` is None.
        """
        if t.shape != input_ids.shape[:1]:
            raise ValueError(f"t must be [B]=[{input_ids.shape[0]}], got {tuple(t.shape)}")
        if uniform is None:
            gen_device = generator.device if generator is not None else input_ids.device
            uniform = torch.rand(input_ids.shape, generator=generator, device=gen_device).to(input_ids.device)
        elif uniform.shape != input_ids.shape:
            raise ValueError(f"uniform draws must be [B, S]={tuple(input_ids.shape)}, got {tuple(uniform.shape)}")
        is_masked = uniform < self.move_chance(t).unsqueeze(-1)  # [B, S]
        return torch.where(is_masked, torch.full_like(input_ids, self.mask_id), input_ids)
