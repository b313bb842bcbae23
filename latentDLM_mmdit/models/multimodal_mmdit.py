"""MultimodalMMDiT: the joint text/latent denoiser of the upstream stable trainer.

Built on the real `mmdit` library (`mmdit.mmdit_generalized_pytorch.MMDiT`). The state-dict
layout and the computation follow upstream exactly so that pretrained checkpoints load strictly
and give the same numbers:

    text_encoder.token_embed.weight      [V, H]
    text_encoder.position_embed          [1, max_seq_len, H]
    latent_encoder.projection.{0,1,3}    Linear(D, 2H), LayerNorm(2H), GELU, Linear(2H, H)
    latent_encoder.position_embed        [1, 1, H]
    conditioning.{text,latent}_sigma_map.mlp.{0,2}
    conditioning.combine.{0,2}
    mmdit.*                              the backbone (layout depends on the mmdit version)
    text_head                            Linear(H, V)
    latent_head.{0,3}                    Linear(H, 2H), GELU, Dropout, Linear(2H, D)
    text_head_clusters                   Linear(H, V), only when cluster_size > 0
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdit.mmdit_generalized_pytorch import MMDiT
from omegaconf import DictConfig, OmegaConf

from latentDLM_mmdit.settings import ModelSettings, is_sealed_section, validate_settings

logger = logging.getLogger(__name__)

REQUIRED_MODEL_KEYS = ("hidden_size", "n_blocks", "cond_dim", "max_seq_len")


def model_settings(config: Any) -> ModelSettings:
    """The `model` section validated against the schema (read as `ModelSettings`); `config` is a
    mapping or a DictConfig (only read). Raises ValueError naming unknown, mistyped, out-of-range
    and missing required keys. The `model` section of a sealed validated config (what the factory
    hands over) is taken as it is."""
    if is_sealed_section(config, "model"):
        model = config
    else:
        model = _validated_model_section(config)
    missing = [k for k in REQUIRED_MODEL_KEYS if OmegaConf.is_missing(model, k)]
    if missing:
        raise ValueError(f"model config is missing required key(s): {', '.join(missing)}")
    return model


def _validated_model_section(config: Any) -> ModelSettings:
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
    if not isinstance(config, Mapping):
        raise TypeError(f"model config must be a mapping or an OmegaConf DictConfig, got {type(config).__name__}")
    return validate_settings({"model": config}, "the model config given to MultimodalMMDiT", shared=True).config.model


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> sinusoidal features (float32) -> MLP. `mlp.{0,2}` as upstream."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # [B, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb.to(t.dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # [B, C]


class TextEncoder(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, max_length: int):
        super().__init__()
        self.max_length = max_length
        self.token_embed = nn.Embedding(vocab_size, hidden_size)
        self.position_embed = nn.Parameter(torch.randn(1, max_length, hidden_size) * 0.02)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        seq_len = token_ids.shape[1]
        return self.token_embed(token_ids) + self.position_embed[:, :seq_len]  # [B, S, H]


class LatentEncoder(nn.Module):
    """Projects one latent vector [B, 1, D] to one backbone token [B, 1, H]."""

    def __init__(self, latent_dim: int, hidden_size: int, max_latent_len: int = 1):
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(latent_dim, hidden_size * 2),
            nn.LayerNorm(hidden_size * 2),
            nn.GELU(),
            nn.Linear(hidden_size * 2, hidden_size),
        )
        self.position_embed = nn.Parameter(torch.randn(1, max_latent_len, hidden_size) * 0.02)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() == 2:
            latents = latents.unsqueeze(1)  # [B, 1, D]
        seq_len = latents.shape[1]
        return self.projection(latents) + self.position_embed[:, :seq_len]  # [B, 1, H]


class MultimodalConditioning(nn.Module):
    """c = combine(cat(silu(text_map(t_text)), silu(latent_map(t_latent))))."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.text_sigma_map = TimestepEmbedder(cond_dim)
        self.latent_sigma_map = TimestepEmbedder(cond_dim)
        self.combine = nn.Sequential(
            nn.Linear(cond_dim * 2, cond_dim * 4),
            nn.SiLU(),
            nn.Linear(cond_dim * 4, cond_dim),
        )

    def forward(self, text_timesteps: torch.Tensor, latent_timesteps: torch.Tensor) -> torch.Tensor:
        dtype = self.combine[0].weight.dtype
        text_cond = F.silu(self.text_sigma_map(text_timesteps.to(dtype)))  # [B, C]
        latent_cond = F.silu(self.latent_sigma_map(latent_timesteps.to(dtype)))  # [B, C]
        return self.combine(torch.cat([text_cond, latent_cond], dim=-1))  # [B, C]


class MultimodalMMDiT(nn.Module):
    """Joint text/latent MMDiT.

    Args:
        config: the `model` section (mapping or DictConfig), validated against
            `settings.ModelSettings`: `hidden_size`, `n_blocks`, `cond_dim`, `max_seq_len`
            (required), `dropout`, `qk_rmsnorm` (accepted but inert, as upstream: the generalized
            block does not pass it on) and `num_residual_streams`, defaults stated in the schema.
            `n_heads` is accepted and read by nothing: the backbone uses the library's 8 heads of
            64 dims, as upstream.
        vocab_size: number of token ids V (text embedding rows and logits width).
        latent_dim: width D of the latent vector.
        cluster_size: when > 0, adds `text_head_clusters` and returns a third output.
    """

    def __init__(self, config: Any, vocab_size: int, latent_dim: int, cluster_size: int = 0):
        super().__init__()
        settings = model_settings(config)
        if int(vocab_size) <= 0 or int(latent_dim) <= 0 or int(cluster_size) < 0:
            raise ValueError(
                f"invalid sizes: vocab_size={vocab_size}, latent_dim={latent_dim}, "
                f"cluster_size={cluster_size} (need vocab_size > 0, latent_dim > 0, cluster_size >= 0)"
            )
        hidden = settings.hidden_size
        cond_dim = settings.cond_dim
        self.vocab_size = int(vocab_size)
        self.latent_dim = int(latent_dim)
        self.cluster_size = int(cluster_size)
        self.max_seq_len = settings.max_seq_len
        self.num_residual_streams = settings.num_residual_streams

        self.text_encoder = TextEncoder(self.vocab_size, hidden, self.max_seq_len)
        self.latent_encoder = LatentEncoder(self.latent_dim, hidden, max_latent_len=1)
        self.conditioning = MultimodalConditioning(cond_dim)
        self.mmdit = MMDiT(
            depth=settings.n_blocks,
            dim_modalities=(hidden, hidden),
            dim_cond=cond_dim,
            qk_rmsnorm=settings.qk_rmsnorm,
            num_residual_streams=self.num_residual_streams,
        )
        self.text_head = nn.Linear(hidden, self.vocab_size)
        self.latent_head = nn.Sequential(
            nn.Linear(hidden, hidden * 2),
            nn.GELU(),
            nn.Dropout(settings.dropout),
            nn.Linear(hidden * 2, self.latent_dim),
        )
        self.text_head_clusters = nn.Linear(hidden, self.vocab_size) if self.cluster_size > 0 else None
        self._init_heads()
        logger.debug(
            "MultimodalMMDiT: V=%d H=%d D=%d blocks=%s streams=%d cluster_size=%d",
            self.vocab_size,
            hidden,
            self.latent_dim,
            settings.n_blocks,
            self.num_residual_streams,
            self.cluster_size,
        )

    def _init_heads(self) -> None:
        heads = [self.text_head, self.latent_head[-1]]
        if self.text_head_clusters is not None:
            heads.append(self.text_head_clusters)
        for head in heads:
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    # ----------------------------------------------------------------------------------------
    def _check_inputs(self, text_tokens, latents, text_timesteps, latent_timesteps, attention_mask):
        if not torch.is_tensor(text_tokens) or text_tokens.dim() != 2:
            shape = tuple(text_tokens.shape) if torch.is_tensor(text_tokens) else type(text_tokens).__name__
            raise ValueError(f"text_tokens must be a [B, S] tensor of token ids, got {shape}")
        if text_tokens.dtype.is_floating_point or text_tokens.dtype == torch.bool:
            raise ValueError(f"text_tokens must hold integer token ids, got dtype {text_tokens.dtype}")
        batch, seq_len = text_tokens.shape
        if seq_len > self.max_seq_len:
            raise ValueError(f"text_tokens has sequence length {seq_len}, longer than max_seq_len={self.max_seq_len}")
        if text_tokens.numel() > 0:
            lo, hi = int(text_tokens.min()), int(text_tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"text_tokens holds ids in [{lo}, {hi}], outside the vocabulary [0, {self.vocab_size})"
                )
        if latents is None:
            raise ValueError(
                "latents is required: the backbone has two modalities (text, latent); "
                "upstream's latents=None path passes one modality and cannot run"
            )
        if latents.dim() not in (2, 3) or latents.shape[0] != batch or latents.shape[-1] != self.latent_dim:
            raise ValueError(
                f"latents must be [B, D], [B, 1, D] or [B, S, D] with B={batch} and D={self.latent_dim}, "
                f"got {tuple(latents.shape)}"
            )
        for name, t in (("text_timesteps", text_timesteps), ("latent_timesteps", latent_timesteps)):
            if t is not None and (t.dim() != 1 or t.shape[0] != batch):
                raise ValueError(f"{name} must have shape [B]=[{batch}], got {tuple(t.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"attention_mask must have shape [B, S]=[{batch}, {seq_len}], got {tuple(attention_mask.shape)}"
            )

    def timesteps_or_zeros(self, t: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """A timestep given as None means zeros(B) in the model's dtype (upstream's convention)."""
        if t is not None:
            return t
        return torch.zeros(batch, device=device, dtype=self.conditioning.combine[0].weight.dtype)

    def forward(
        self,
        text_tokens: torch.Tensor,
        latents: torch.Tensor,
        text_timesteps: torch.Tensor | None,
        latent_timesteps: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
    ):
        """Returns `(text_logits [B,S,V], latent_pred [B,1,D])`, plus `text_cluster_logits
        [B,S,V]` when `cluster_size > 0`. A timestep given as None means zeros(B)."""
        if not torch.compiler.is_compiling():  # data-dependent checks (ids in range) would break the graph
            self._check_inputs(text_tokens, latents, text_timesteps, latent_timesteps, attention_mask)
        batch = text_tokens.shape[0]
        device = text_tokens.device
        text_emb = self.text_encoder(text_tokens)  # [B, S, H]

        latents = latents.to(dtype=text_emb.dtype)
        if latents.dim() == 2:
            latents = latents.unsqueeze(1)  # [B, 1, D]
        elif latents.shape[1] > 1:
            latents = latents.mean(dim=1, keepdim=True)  # [B, 1, D]
        latent_emb = self.latent_encoder(latents)  # [B, 1, H]

        text_timesteps = self.timesteps_or_zeros(text_timesteps, batch, device)
        latent_timesteps = self.timesteps_or_zeros(latent_timesteps, batch, device)
        c = self.conditioning(text_timesteps, latent_timesteps).to(text_emb.dtype)  # [B, C]

        if attention_mask is None:
            text_mask = torch.ones(text_tokens.shape, device=device, dtype=torch.bool)
        else:
            text_mask = attention_mask.bool()  # [B, S]
        latent_mask = torch.ones(latent_emb.shape[:2], device=device, dtype=torch.bool)  # [B, 1]

        text_out, latent_out = self.mmdit(
            modality_tokens=(text_emb, latent_emb),
            modality_masks=(text_mask, latent_mask),
            time_cond=c,
        )
        text_logits = self.text_head(text_out)  # [B, S, V]
        latent_pred = self.latent_head(latent_out)  # [B, 1, D]
        if self.text_head_clusters is not None:
            return text_logits, latent_pred, self.text_head_clusters(text_out)
        return text_logits, latent_pred
