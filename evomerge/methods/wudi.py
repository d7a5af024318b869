"""WUDI merging: a merged task vector that interferes least with every task's own inputs, by gradient descent.

Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging
via Task Vectors", arXiv:2503.08099. Per 2-D tensor, τ starts at Σᵢ δᵢ and minimizes
Σᵢ ‖(τ − δᵢ)·δᵢᵀ‖²_F / ‖δᵢ‖²_F with Adam (the rows of δᵢ stand in for task i's inputs); other tensors
take the mean task vector. As FusionBench 0.2.33's ``wudi_merging`` (Adam, learning rate 1e-5, no
weight decay); the result is added to the base unscaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .subspace import mean_task_vector


def wudi_loss(merged: torch.Tensor, deltas: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """Σᵢ ‖(τ − δᵢ)δᵢᵀ‖²_F / ‖δᵢ‖²_F for stacked δᵢ (T × m × n): the interference τ causes on each task's span."""
    product = torch.matmul(merged.unsqueeze(0) - deltas, deltas.transpose(1, 2))
    return torch.sum(product.square() / squared_norms.reshape(-1, 1, 1))


def wudi(deltas: Sequence[torch.Tensor], iterations: int = 400, learning_rate: float = 1e-5) -> torch.Tensor:
    """WUDI's merged task vector: Adam steps on ``wudi_loss`` from Σ δᵢ (2-D), the mean δ otherwise."""
    if deltas[0].dim() != 2:
        return mean_task_vector(deltas)
    with torch.inference_mode(False), torch.enable_grad():
        stacked = torch.stack([d.clone() for d in deltas])
        squared_norms = stacked.reshape(stacked.shape[0], -1).norm(dim=-1).square()
        merged = torch.nn.Parameter(stacked.sum(dim=0))
        optimizer = torch.optim.Adam([merged], lr=learning_rate, weight_decay=0)
        for _ in range(iterations):
            loss = wudi_loss(merged, stacked, squared_norms)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return merged.detach().clone()
