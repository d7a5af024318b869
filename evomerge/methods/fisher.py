"""Fisher merging: a per-element average of the models weighted by their diagonal Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS, arXiv:2111.09832.
θ = Σᵢ λᵢ F̃ᵢ θᵢ / Σᵢ λᵢ F̃ᵢ with F̃ᵢ = (Fᵢ + m) / (‖Fᵢ‖ + m): each model's Fisher (``evomerge.calibration``)
made positive by m and normalized by its L2 norm over the whole model, as FusionBench 0.2.33's
``merging_with_fisher_weights`` (``normalize_fisher_weight: true``, ``minimal_fisher_weight: 1e-6``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

MINIMAL_FISHER = 1e-6  # FusionBench's minimal_fisher_weight


def model_fisher_norm(fisher: Mapping[str, torch.Tensor]) -> float:
    """‖F‖₂ over every parameter of one model (the square root of Σ F²)."""
    return float(torch.sqrt(sum(torch.sum(f.double() ** 2) for f in fisher.values())))


def normalized_fisher(fisher: Mapping[str, torch.Tensor], minimal: float = MINIMAL_FISHER) -> dict[str, torch.Tensor]:
    """(F + m) / (‖F‖ + m) for every parameter of one model: FusionBench's normalized Fisher weights."""
    scale = 1.0 / (model_fisher_norm(fisher) + minimal)
    return {name: (f + minimal) * scale for name, f in fisher.items()}


def fisher_average(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float]
                   ) -> torch.Tensor:
    """Σᵢ λᵢ F̃ᵢ θᵢ / Σᵢ λᵢ F̃ᵢ, element by element."""
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for x, f, w in zip(tensors, fishers, weights):
        weighted = f.to(x.dtype) * w
        numerator += weighted * x
        denominator += weighted
    return numerator / denominator
