"""Training objective (METHOD.md §9–10): student next-token CE + a (multi-teacher) KD term.

  KD = Σ_m α_m KD_m                       (each KD_m a per-teacher loss, e.g. xt.pkl_loss / xt.hkl_loss, × τ²)
  dynamic (default):  L = sg(CE / KD)·KD + CE   (value 2·CE; KD's gradient is scaled by CE/KD; scale 1 if KD = 0)
  fixed:              L = kd_weight·KD + ce_weight·CE
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["next_token_ce", "weighted_kd", "combine_losses"]


def next_token_ce(logits: Tensor, ids: Tensor, attention_mask: Tensor | None = None,
                  normalizer: float | Tensor | None = None) -> Tensor:
    """Masked mean next-token cross-entropy: row p of ``logits`` [B, T, V] predicts ``ids`` [B, T] at p + 1.

    ``attention_mask`` [B, T] marks real tokens (targets that are padding are skipped). ``normalizer`` replaces the
    local count of predicted tokens (e.g. the global count across data-parallel ranks / accumulation steps)."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and ids [B, T], got {tuple(logits.shape)} / {tuple(ids.shape)}")
    target = ids[:, 1:].long()
    mask = torch.ones_like(target, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
    count = mask.sum().clamp_min(1) if normalizer is None else normalizer  # no target: 0, never 0/0
    return (nll * mask).sum() / count


def weighted_kd(kd_losses: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ_m α_m KD_m (static teacher weights; default 1 each, the release's ``kd_loss_mode="sum"``)."""
    if not kd_losses:
        raise ValueError("need at least one KD loss")
    weights = [1.0] * len(kd_losses) if weights is None else list(weights)
    if len(weights) != len(kd_losses):
        raise ValueError(f"{len(kd_losses)} KD losses but {len(weights)} weights")
    return sum(w * kd for w, kd in zip(weights, kd_losses))


def combine_losses(ce: Tensor, kd: Tensor, *, mode: str = "dynamic", kd_weight: float = 1.0,
                   ce_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """-> (total loss, the factor applied to KD). "dynamic": sg(|CE| / |KD|)·KD + CE (factor 1 when KD = 0);
    "fixed": kd_weight·KD + ce_weight·CE."""
    if mode == "fixed":
        return kd_weight * kd + ce_weight * ce, torch.as_tensor(kd_weight, dtype=kd.dtype)
    if mode != "dynamic":
        raise ValueError(f"mode must be 'dynamic' or 'fixed', got {mode!r}")
    ce_abs, kd_abs = ce.detach().abs(), kd.detach().abs()
    scale = torch.where(kd_abs > 0, ce_abs / torch.where(kd_abs > 0, kd_abs, torch.ones_like(kd_abs)),
                        torch.ones_like(kd_abs))
    return scale * kd + ce, scale
