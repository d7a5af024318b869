"""Data-free subspace merging of task vectors per 2-D weight: TSV-M, Iso-C and Iso-CTS.

Each method merges the task vectors δᵢ = wᵢ·(xᵢ − base) of one matrix through their singular
vectors; tensors that are not matrices (norms, biases) take the mean task vector instead, as in
FusionBench 0.2.33. The caller adds ``lambda`` times the result to the base.

- Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging",
  arXiv:2412.00081 (TSV-M).
- Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv:2502.04959 (Iso-C, Iso-CTS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mean_task_vector(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/T)·Σᵢ δᵢ: FusionBench's fallback for tensors that are not matrices."""
    return torch.stack(list(deltas)).mean(dim=0)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (rows if wide), P·Qᵀ from matrix = P·Σ·Qᵀ (orthogonal Procrustes)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def top_singular(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U[:, :k], S[:k], Vᵀ[:k] of the thin SVD of ``delta`` (its k leading singular triplets)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def reconstruct_orthogonalized(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """polar(U)·diag(S)·polar(Vᵀ): concatenated singular vectors made orthonormal, then recombined (TSV-M eq. 6)."""
    return polar_factor(u) @ torch.diag(s) @ polar_factor(vh)


def tsv_rank(shape: Sequence[int], n_tasks: int, rank_fraction: float) -> int:
    """Singular components kept per task: ⌊min(m, n)·f⌋, f = ``rank_fraction`` or 1/T when it is 0 (TSV-M's choice)."""
    fraction = rank_fraction if rank_fraction > 0 else 1.0 / n_tasks
    return int(min(shape) * fraction)


def tsv_merge(deltas: Sequence[torch.Tensor], rank_fraction: float = 0.0) -> torch.Tensor:
    """TSV-M (Gargiulo et al. 2025): each task's top-k singular triplets, concatenated, orthogonalized, recombined."""
    k = tsv_rank(deltas[0].shape, len(deltas), rank_fraction)
    parts = [top_singular(delta, k) for delta in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    return reconstruct_orthogonalized(u, s, vh)


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """U·(mean σ)·Vᵀ: the matrix with its spectrum flattened to the mean singular value (Iso-C eq. 8)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u * s.mean()) @ vh


def iso_c(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025): the task-arithmetic sum Σᵢ δᵢ with an isotropic spectrum."""
    return isotropic(torch.stack(list(deltas)).sum(dim=0))


def iso_cts_dims(shape: Sequence[int], n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dimensions c, dimensions per task d) with c + T·d = min(m, n), as FusionBench 0.2.33 rounds them.

    c starts at ⌊min(m, n)·fraction⌋; the rest is rounded to a multiple of T. Where that rounding
    would exceed the rank (FusionBench fails there), d is ⌊min(m, n)/T⌋ instead.
    """
    rank = min(shape)
    common = int(rank * common_space_fraction)
    per_task = round((rank - common) / n_tasks)
    per_task = min(per_task, rank // n_tasks)
    return rank - per_task * n_tasks, per_task


def iso_cts(deltas: Sequence[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025): the sum's top-c subspace plus each task's top-d outside it, orthogonalized, isotropic."""
    common, per_task = iso_cts_dims(deltas[0].shape, len(deltas), common_space_fraction)
    u, s, vh = top_singular(torch.stack(list(deltas)).sum(dim=0), common)
    us, ss, vhs = [u], [s], [vh]
    for delta in deltas:
        specific = delta - u @ (u.T @ delta)
        ut, st, vht = top_singular(specific, per_task)
        us.append(ut), ss.append(st), vhs.append(vht)
    s_all = torch.cat(ss)
    return reconstruct_orthogonalized(torch.cat(us, dim=1), s_all.mean().expand_as(s_all), torch.cat(vhs, dim=0))


def subspace_task_vector(method: str, deltas: Sequence[torch.Tensor], *, rank_fraction: float = 0.0,
                         common_space_fraction: float = 0.8) -> torch.Tensor:
    """The merged task vector of ``method`` (tsv_m, iso_c, iso_cts) for 2-D δᵢ, the mean δ for other tensors."""
    if deltas[0].dim() != 2:
        return mean_task_vector(deltas)
    if method == "tsv_m":
        return tsv_merge(deltas, rank_fraction)
    if method == "iso_c":
        return iso_c(deltas)
    if method == "iso_cts":
        return iso_cts(deltas, common_space_fraction)
    raise ValueError(f"unknown subspace method {method!r}")
