"""Loss terms shared by the stable and the cycle trainer, in upstream's numerical form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZE_EPS = 1e-8
# Losses are reduced in at least float32: under autocast (or training.dtype: bf16) the model's outputs
# are bfloat16/float16, and a mean over B*S*V values in 8 mantissa bits drifts (the mixed_precision row).
LOSS_MIN_DTYPE = torch.float32
TEXT_LOSS_MAX = 100.0
LATENT_LOSS_MAX = 10.0


def masked_text_ce(text_logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy averaged over `mask`, clamped to [0, 100].

    text_logits [B, S, V], target_ids [B, S], mask [B, S] bool. Divides by
    (mask count clamped to >= 1) + 1e-8, as upstream's stable trainer.
    """
    if text_logits.shape[:2] != target_ids.shape or mask.shape != target_ids.shape:
        raise ValueError(
            f"text loss shapes disagree: logits {tuple(text_logits.shape)}, targets "
            f"{tuple(target_ids.shape)}, mask {tuple(mask.shape)}"
        )
    vocab = text_logits.shape[-1]
    text_logits = text_logits.to(torch.promote_types(text_logits.dtype, LOSS_MIN_DTYPE))
    with torch.autocast(text_logits.device.type, enabled=False):
        per_token = F.cross_entropy(
            text_logits.reshape(-1, vocab), target_ids.reshape(-1), ignore_index=-100, reduction="none"
        )  # [B*S]
        mask_sum = mask.sum().clamp(min=1) + NORMALIZE_EPS
        loss = (per_token * mask.reshape(-1)).sum() / mask_sum
    return torch.clamp(loss, min=0.0, max=TEXT_LOSS_MAX)


def normalized_latent_mse(latent_pred: torch.Tensor, latent_target: torch.Tensor) -> torch.Tensor:
    """MSE between L2-normalised prediction and target (last axis, eps 1e-8), clamped to [0, 10].

    The target is given the prediction's shape first ([B, D] -> [B, 1, D] for the real model), so
    that the two never broadcast against each other. Their element counts must agree.
    """
    if latent_pred.shape != latent_target.shape:
        if latent_pred.numel() != latent_target.numel() or latent_pred.shape[0] != latent_target.shape[0]:
            raise ValueError(
                f"latent prediction {tuple(latent_pred.shape)} and target {tuple(latent_target.shape)} "
                "hold different numbers of values per sample"
            )
        latent_target = latent_target.reshape(latent_pred.shape)
    # One dtype for both, at least float32 (before torch 2.13 mse_loss's backward refuses a float32
    # prediction against a bfloat16 target), and autocast off so that it stays that dtype.
    common = torch.promote_types(torch.promote_types(latent_pred.dtype, latent_target.dtype), LOSS_MIN_DTYPE)
    with torch.autocast(latent_pred.device.type, enabled=False):
        pred = F.normalize(latent_pred.to(common), p=2, dim=-1, eps=NORMALIZE_EPS)
        target = F.normalize(latent_target.to(common), p=2, dim=-1, eps=NORMALIZE_EPS)
        return torch.clamp(F.mse_loss(pred, target), min=0.0, max=LATENT_LOSS_MAX)


def token_accuracy(text_logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of masked positions whose argmax equals the target (0.0 when nothing is masked)."""
    if not bool(mask.any()):
        return 0.0
    pred = text_logits.argmax(dim=-1)
    return float((pred[mask] == target_ids[mask]).float().mean().item())


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())
