"""SCE: select high-variance elements, weight task vectors by their energy, erase sign conflicts.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990; mergekit 0.1.5 ``sce``.
"""

from __future__ import annotations

import torch

from .consensus import agreement_mask, elect_sign


def sce_select(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ⌊nnz·fraction⌋ elements with the largest variance across the stacked δᵢ (ties: first by position)."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        mask[torch.sort(var.abs().reshape(-1), descending=True, stable=True).indices[:k]] = True
    return mask.reshape(var.shape)


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Per model, mean(δᵢ²) / Σⱼ mean(δⱼ²); equal weights when that sum is below 1e-6."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def sce(base: torch.Tensor, tensors: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """base + Σᵢ mᵢwᵢδᵢ / max(Σᵢ mᵢwᵢ, 1e-6): δ selected by variance, mᵢ agreement with the elected sign of Σδ."""
    if not tensors:
        return base
    deltas = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        deltas = deltas * sce_select(deltas, select_topk)
    agree = agreement_mask(deltas, elect_sign(deltas))
    weights = sce_weights(deltas).reshape(-1, *([1] * (deltas.dim() - 1)))
    erased = weights * agree
    return base + (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
