"""Sign consensus and disjoint merge of weighted task vectors (TIES steps 2 and 3).

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
arXiv:2306.01708. mergekit (``get_mask`` with method "sum") elects the sign on
the *weighted* deltas Dᵢ = wᵢ·δᵢ, and zeros never agree with the elected sign.
"""

from __future__ import annotations

import torch


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Elected sign per element, True for +1: ΣᵢDᵢ ≥ 0 (ties go to +1), over dim 0 of stacked Dᵢ."""
    return weighted.sum(dim=0) >= 0


def agreement_mask(weighted: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """mᵢ = (sign(Dᵢ) == elected sign); zero entries never agree."""
    return torch.where(positive, weighted > 0, weighted < 0)


def disjoint_merge(
    weighted: torch.Tensor, weights: torch.Tensor, agree: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Σᵢ mᵢDᵢ, divided per element by Σᵢ mᵢwᵢ (0 → 1) when ``normalize``.

    ``weights`` is shaped (k, 1, ..., 1) to broadcast against the stacked (k, ...) Dᵢ.
    """
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


def weighted_sum(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σᵢ Dᵢ, divided by Σᵢ wᵢ when ``normalize`` (|Σ| < 1e-8 → 1): task arithmetic without consensus."""
    mixed = weighted.sum(dim=0)
    if normalize:
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        mixed /= divisor
    return mixed
