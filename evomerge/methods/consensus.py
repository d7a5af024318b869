"""Sign consensus and disjoint merge of weighted task vectors (TIES steps 2 and 3).

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
arXiv:2306.01708. mergekit (``get_mask`` with method "sum") elects the sign on
the *weighted* deltas Dᵢ = wᵢ·δᵢ, and zeros never agree with the elected sign.

Every step is elementwise across the models, so callers may run these functions
on any slice of the elements (``task_arithmetic`` runs them on cache-sized
chunks). Sums run over the models in order, ((D₀ + D₁) + D₂) + ... (``input_sum``).
mergekit's ``Tensor.sum(dim=0)`` adds in that order for up to four models on the
CPU (so float32 results are bit-identical there) and may regroup beyond.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def input_sum(weighted: torch.Tensor) -> torch.Tensor:
    """ΣᵢDᵢ over dim 0 of stacked Dᵢ, added in input order starting from D₀: ((D₀ + D₁) + D₂) + ….

    One fixed order on every device and for every tensor size. (``torch.sum(dim=0)`` regroups the
    additions for five or more inputs on the CPU, depending on the tensor's size, and differs
    between devices; the search's batched and compiled paths add in this order too.)
    """
    total = weighted[0].clone()
    for row in weighted[1:]:
        total += row
    return total


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Elected sign per element, True for +1: ΣᵢDᵢ ≥ 0 (a zero sum elects +1), over dim 0 of stacked Dᵢ."""
    return input_sum(weighted) >= 0


def signed_unit(positive: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s = +1 where ``positive`` else −1, in ``dtype``."""
    return positive.to(dtype).mul_(2).sub_(1)


def agreement_mask(weighted: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """mᵢ = (sign(Dᵢ) == elected sign), i.e. s·Dᵢ > 0; zero entries never agree. Broadcasts over stacked Dᵢ."""
    return weighted * signed_unit(positive, weighted.dtype) > 0


def disjoint_merge(
    weighted: torch.Tensor, weights: Sequence[float], positive: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Σᵢ mᵢDᵢ over the Dᵢ agreeing with the elected sign s; ``normalize`` divides by Σᵢ mᵢwᵢ (0 → 1).

    Computed as s·Σᵢ relu(s·Dᵢ) and Σᵢ wᵢ·sign(relu(s·Dᵢ)): relu(s·Dᵢ) is |Dᵢ|
    where Dᵢ agrees and 0 elsewhere, and negation is exact, so this equals
    mergekit's masked sums bit for bit with fewer passes over memory.
    """
    unit = signed_unit(positive, weighted.dtype)
    mixed = torch.zeros_like(unit)
    divisor = torch.zeros_like(unit) if normalize else None
    for i, w in enumerate(weights):
        agreeing = torch.mul(weighted[i], unit).clamp_(min=0)
        mixed += agreeing
        if normalize:
            divisor.add_(agreeing.sign_(), alpha=float(w))
    mixed *= unit
    if normalize:
        mixed /= divisor.masked_fill_(divisor == 0, 1)
    return mixed


def weighted_sum(weighted: torch.Tensor, weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Σᵢ Dᵢ, divided by Σᵢ wᵢ when ``normalize`` (|Σ| < 1e-8 → 1): task arithmetic without consensus."""
    mixed = input_sum(weighted)
    if normalize:
        total = weight_divisor(weights, weighted.dtype)
        if total is not None:
            mixed /= total.to(weighted.device)
    return mixed


def weight_divisor(weights: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Σᵢ wᵢ (a 0-d tensor of ``dtype``, summed by torch) that a normalized sum divides by; None when |Σ| < 1e-8."""
    total = torch.tensor([float(w) for w in weights], dtype=dtype).sum()
    return total if total.abs() >= 1e-8 else None
