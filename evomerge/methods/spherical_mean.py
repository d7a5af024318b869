"""Weighted means on the hypersphere: multislerp (tangent-space barycentre) and the Karcher mean.

mergekit 0.1.5 ``multislerp`` (Goddard, "Multi-SLERP", goddard.blog/posts/multislerp-wow-what-a-cool-idea)
and ``karcher`` (Karcher 1977, "Riemannian center of mass and mollifier smoothing"; mergekit cites
arXiv:2603.04972). Both treat each flattened tensor as a point on a sphere and rescale the result by
the weighted mean norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentre of the unit vectors in the tangent space at their weighted mean, mapped back by exp, × Σ wᵢ‖xᵢ‖.

    With a base the points are xᵢ − base and the base is added back. One input is returned as is;
    a zero weighted mean of two inputs falls back to Σ wᵢxᵢ, of more inputs is an error (as mergekit).
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor([float(x) for x in weights], dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.reshape(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted sum of the inputs' directions is zero (antipodal inputs "
                             "with balancing weights); use different weights")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(stacked.shape[1:])
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.reshape(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return result + base if base is not None else result


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean of the unit directions by Riemannian gradient steps, × Σ wᵢ‖xᵢ‖.

    Inputs with norm ≤ ``tol`` take no part in the direction; all of them that small gives zeros.
    Starts at the normalized weighted mean of the directions (the first direction if that is ~0)
    and stops after ``max_iter`` steps or when the tangent step is below ``tol``.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0.0 else t / n for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for alpha, unit in zip(alphas, points):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = points[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, points):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(w * n for w, n in zip(weights, norms)) * mean
