"""RegMean: merge linear layers so the merged layer best reproduces every model's outputs on its own inputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR,
arXiv:2212.09849. For a linear weight W (out × in) of each model i with input Gram matrix
Gᵢ = XᵢᵀXᵢ / nᵢ (``evomerge.calibration``), the least-squares merge is
W = (Σᵢ Wᵢ G̃ᵢ)(Σᵢ G̃ᵢ)⁻¹, with the off-diagonal entries of each Gᵢ scaled by α
(G̃ = α·G + (1 − α)·diag G). Tensors without statistics (norms, embeddings) take the mean.

evomerge's knobs for a search on top of it (the defaults give the paper's merge, bit for bit): a
weight wᵢ per model scales its Gram matrix, W = (Σᵢ wᵢ Wᵢ G̃ᵢ)(Σᵢ wᵢ G̃ᵢ)⁻¹ (the weighted mean where
there are no statistics), the importance RegMean gives model i's inputs; and a strength λ moves the
result along its task vector from a base, base + λ·(W − base).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): off-diagonal entries scaled by α, the diagonal kept (RegMean §3.2)."""
    reduced = gram * alpha
    reduced.diagonal().copy_(gram.diagonal())
    return reduced


def regmean_full(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """(Σᵢ Wᵢ G̃ᵢ)(Σᵢ G̃ᵢ)⁻¹ for weights Wᵢ (out × in) and input Gram matrices Gᵢ (in × in), by one linear solve."""
    reduced = [reduce_off_diagonal(g.to(weights[0].dtype), alpha) for g in grams]
    return _solve(weights, reduced)


def _solve(weights: Sequence[torch.Tensor], reduced: Sequence[torch.Tensor]) -> torch.Tensor:
    """(Σᵢ Wᵢ G̃ᵢ)(Σᵢ G̃ᵢ)⁻¹ for already reduced (and weighted) Gram matrices."""
    total = torch.stack(reduced).sum(dim=0)
    rhs = torch.stack([g @ w.T for g, w in zip(reduced, weights)]).sum(dim=0)  # Σ G̃ᵢ Wᵢᵀ (in × out)
    solution, info = torch.linalg.solve_ex(total, rhs)
    if int(info) != 0:
        raise ValueError("regmean: the summed Gram matrix is singular (an input feature never active on the "
                         "calibration data); lower alpha or use gram: diagonal")
    return solution.T


def regmean_diagonal(weights: Sequence[torch.Tensor], diagonals: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σᵢ Wᵢ diag(gᵢ) / Σᵢ gᵢ column by column: RegMean with diagonal Gram matrices (α = 0); mean where Σ gᵢ = 0."""
    d = torch.stack([g.to(weights[0].dtype) for g in diagonals])  # (models, in)
    total = d.sum(dim=0)
    weighted = torch.stack([w * g for w, g in zip(weights, d)]).sum(dim=0)
    mean = torch.stack(list(weights)).mean(dim=0)
    return torch.where(total > 0, weighted / torch.where(total > 0, total, 1), mean)


def regmean(weights: Sequence[torch.Tensor], statistics: Sequence[torch.Tensor | None], alpha: float) -> torch.Tensor:
    """RegMean of one tensor: full or diagonal by the statistics' shape, the mean of the weights where there are none."""
    present = [s is not None for s in statistics]
    if not any(present) or weights[0].dim() != 2:
        return torch.stack(list(weights)).mean(dim=0)
    if not all(present):
        raise ValueError("regmean: calibration statistics exist for some input models of this tensor but not all")
    if statistics[0].dim() == 1:
        return regmean_diagonal(weights, statistics)
    return regmean_full(weights, statistics, alpha)


def weighted_statistics(statistics: Sequence[torch.Tensor | None], importance: Sequence[float]
                        ) -> list[torch.Tensor | None]:
    """Each model's Gram matrix (or its diagonal) × its importance wᵢ: Σᵢ wᵢ G̃ᵢ in RegMean's sums."""
    return [None if s is None else s * w for s, w in zip(statistics, importance)]


def weighted_mean(weights: Sequence[torch.Tensor], importance: Sequence[float]) -> torch.Tensor:
    """Σᵢ wᵢ Wᵢ / Σᵢ wᵢ: RegMean's fallback for tensors without statistics, weighted like its Gram matrices."""
    return torch.stack([w * c for w, c in zip(weights, importance)]).sum(dim=0) / sum(importance)


def along_task_vector(base: torch.Tensor, merged: torch.Tensor, strength: float) -> torch.Tensor:
    """base + λ·(merged − base): the merge's task vector scaled by λ."""
    return base + strength * (merged - base)
