"""Model Stock: interpolate between the base and the average of the fine-tunes by their angle.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522; mergekit ``model_stock``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """t·mean(xᵢ) + (1−t)·base, t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the deltas.

    ``filter_wise`` uses one cosθ per row (1-D tensors as one row), else one for
    the flattened tensor. Where 1 + (N−1)cosθ ≈ 0 (|·| < 1e-6), t = 0 (keep base).
    Works in the inputs' dtype; needs N ≥ 2.
    """
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if base.dim() == 1 else x for x in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [x - w0 for x in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, n * cos_theta / torch.where(singular, 1, denominator))
    average = torch.stack(ws).sum(dim=0) / n
    return (t * average + (1 - t) * w0).reshape(shape)
