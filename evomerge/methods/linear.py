"""Linear (weighted average) merge and passthrough.

Wortsman et al. 2022, "Model soups", arXiv:2203.05482; mergekit ``linear`` and
``passthrough``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Σᵢ wᵢxᵢ, divided by Σᵢ wᵢ when ``normalize``; float32 (float64 for float64 inputs).

    mergekit divides by a zero weight sum and returns inf/NaN; here that is an error.
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=tensors[0].device)
    result = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for tensor, coefficient in zip(tensors, w.unbind(0)):
        result.addcmul_(tensor.to(dtype), coefficient)
    if normalize:
        total = w.sum()
        if total == 0:
            raise ValueError(f"linear: weights {list(weights)} sum to 0, cannot normalize")
        result.div_(total)
    return result


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The single input, multiplied by ``scale`` when one is given (mergekit ``passthrough``)."""
    if scale is None or scale == 1:
        return tensor
    return tensor * scale
