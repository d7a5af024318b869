"""Spherical interpolation: slerp (two models) and nuslerp (weighted, optionally on task vectors).

Shoemake 1985, "Animating rotation with quaternion curves" (SLERP); mergekit
``slerp`` and ``nuslerp``.
"""

from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995  # mergekit slerp: interpolate linearly above this |cos|


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Slerp of the flattened tensors from v0 (t = 0) to v1 (t = 1); lerp when |cos θ| > ``dot_threshold``.

    Norms below ``eps`` count as 1; cos θ is the dot of the normalized vectors,
    clamped to [−1, 1]. Computes in float32 (float64 for float64 inputs).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    t = torch.tensor(t, dtype=dtype, device=a.device)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def nuslerp_t(weights: tuple[float, float]) -> float:
    """nuslerp's interpolation factor w₁/(w₀+w₁); 0.5 when |w₀+w₁| < 1e-6."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    """mergekit's nuslerp kernel: slerp along the last dim (dim 0 when ``row_wise``), or over the flattened tensor.

    Vectors are normalized with norms clamped at 1e-7; exactly collinear pairs
    (1 − cos² ≤ eps²) interpolate linearly. Works in the inputs' dtype.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)
