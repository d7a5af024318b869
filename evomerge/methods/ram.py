"""RAM and RAM+ (tensor-local): average only where task vectors overlap, keep unique updates whole.

"Reinforced Agent Merging", arXiv:2601.13572; mergekit 0.1.5 ``ram`` and ``ramplus_tl``.
"""

from __future__ import annotations

import torch


def ram_masks(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(active |δᵢ| > ε per model, contributors per element, overlap: more than one contributor)."""
    active = deltas.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return active, counts, counts > 1


def ram(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float = 1e-5, *, r: float = 0.0,
        alpha: float = 0.0) -> torch.Tensor:
    """base + Σᵢ δᵢ·[unique]·λᵢ + Σᵢ δᵢ·[overlap]/count over active elements; λᵢ = 1 + r·clamp(shared/unique, 0, α).

    r = 0 is RAM; r > 0 is RAM+ (tensor-local), which boosts a model's unique updates by the share
    of its active elements that other models also update.
    """
    if not tensors:
        return base
    deltas = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    active, counts, overlap = ram_masks(deltas, epsilon)
    unique = counts == 1
    kept = deltas * active
    unique_part = kept * unique
    if r:
        shared = (active & overlap).sum(dim=1)
        alone = (active & unique).sum(dim=1)
        boost = 1 + r * (shared / alone.clamp(min=epsilon)).clamp(min=0, max=alpha)
        unique_part = unique_part * boost.unsqueeze(-1)
    merged = unique_part + kept * overlap / counts.clamp(min=1)
    total = merged[0].clone()
    for row in merged[1:]:
        total += row
    return base + total.reshape(base.shape)
