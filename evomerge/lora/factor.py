"""Exact low-rank algebra on LoRA factors: a weighted sum of adapters without dense d×d matrices.

For adapters i with factors Bᵢ (out × rᵢ), Aᵢ (rᵢ × in) and coefficients cᵢ (merge weight × LoRA
scaling),

    Σᵢ cᵢ·Bᵢ·Aᵢ = [c₁B₁ … cₙBₙ] · [A₁; …; Aₙ]

exactly (PEFT's ``cat``): a LoRA of rank R = Σᵢ rᵢ. To a smaller rank k, take QR factorisations
B = Q_B·R_B and Aᵀ = Q_A·R_A of the stacks, so that BA = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, and the SVD
U·S·Vᵀ of the small R × R core: Q_B·U_k·S_k and V_kᵀ·Q_Aᵀ are the best rank-k factors (Eckart–Young),
the same result as PEFT's ``svd`` (a dense SVD of the out × in sum) at O((out+in)·R²) cost. The
discarded fraction of the energy is Σ_{j>k} S_j² / Σ_j S_j² = ‖ΔW − ΔW_k‖²_F / ‖ΔW‖²_F.

A dense update (a full fine-tune's, a sparse merge's) is factorised by :func:`low_rank`: a truncated
SVD, randomised when that is cheaper (Halko, Martinsson & Tropp 2011, arXiv:0909.4061).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_NITER = 2  # power iterations of the randomised SVD
OVERSAMPLE = 8  # extra columns of the randomised range finder


@dataclass
class LowRank:
    """ΔW = b @ a, with the fraction of ΔW's energy that truncation discarded (0 when exact)."""

    b: torch.Tensor  # out × k
    a: torch.Tensor  # k × in
    discarded: float = 0.0

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def concatenate(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> LowRank:
    """Σ cᵢ·Bᵢ·Aᵢ as one LoRA of rank Σrᵢ (``terms``: (cᵢ, Bᵢ, Aᵢ)); exact."""
    dtype = torch.promote_types(terms[0][1].dtype, torch.float32)
    b = torch.cat([coefficient * bi.to(dtype) for coefficient, bi, _ in terms], dim=1)
    a = torch.cat([ai.to(dtype) for _, _, ai in terms], dim=0)
    return LowRank(b, a)


def truncate(factors: LowRank, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of b @ a, by QR of both factors and an SVD of the small core.

    Returns factors with the singular values in b (PEFT's convention: B = U·S, A = Vᵀ) and the
    discarded energy fraction. A rank at least the current one keeps the product exactly.
    """
    if rank >= factors.rank:
        return factors
    q_b, r_b = torch.linalg.qr(factors.b)
    q_a, r_a = torch.linalg.qr(factors.a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    energy = s.square()
    total = float(energy.sum())
    discarded = float(energy[rank:].sum()) / total if total > 0 else 0.0
    return LowRank(q_b @ (u[:, :rank] * s[:rank]), vh[:rank] @ q_a.T, discarded)


def low_rank(delta: torch.Tensor, rank: int, *, niter: int = DEFAULT_NITER, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, energy kept) with B·A the rank-``rank`` truncated SVD of ``delta`` (randomised when cheaper)."""
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    total = float(delta.square().sum())
    if total == 0:
        return delta.new_zeros(delta.shape[0], rank), delta.new_zeros(rank, delta.shape[1]), 1.0
    if rank + OVERSAMPLE >= min(delta.shape):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        v = vh.T
    else:
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's generator
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=rank + OVERSAMPLE, niter=niter)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], v[:, :k].T
    if k < rank:  # pad to the adapter's rank with zero directions
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b.contiguous(), a.contiguous(), min(1.0, float(s[:k].square().sum()) / total)
