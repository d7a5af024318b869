"""Base + one model, element by element: nearswap and Arcee Fusion (mergekit 0.1.5).

nearswap (alchemonaut, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001) moves each element
towards the other model as far as t / |a − b| allows; Arcee Fusion (arcee.ai) takes the other
model's value where its importance |b − a|·KL(softmax b ‖ softmax a) is an upper outlier.
"""

from __future__ import annotations

import torch

FUSION_QUANTILE_SAMPLE = 1_000_000  # mergekit samples this many importances (with replacement) above it


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """w·b + (1 − w)·a with w = clamp(t / max(|a − b|, 1e-6), 0, 1): near elements swap to b, far ones stay a."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|b − a| × KL(softmax(b) ‖ softmax(a)) along the last dim (each row's KL broadcast over the row)."""
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def upper_fence(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5·IQR of all values, quantiles at ⌊q·(n − 1)⌋ of the sorted values (no sampling)."""
    ordered = torch.sort(values.reshape(-1)).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()  # float32 products, as mergekit
    q1, median, q3 = ordered[at.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """a + (b − a)·[importance ≥ median + 1.5·IQR of the importances] (Tukey's upper fence)."""
    importance = fusion_importance(other, base)
    mask = (importance >= upper_fence(importance)).to(base.dtype)
    return base + (other - base) * mask
