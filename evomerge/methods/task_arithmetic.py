"""The generalized task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Per tensor (mergekit ``GeneralizedTaskArithmeticMerge``): δᵢ = xᵢ − base;
δᵢ ← sparsify(δᵢ, densityᵢ); Dᵢ = wᵢ·δᵢ; with sign consensus keep the Dᵢ that
agree with the elected sign and (normalize) divide by the agreeing weights,
otherwise sum and (normalize) divide by Σwᵢ; × lambda; out = base + mixed.

Ilharco et al. 2022, "Editing Models with Task Arithmetic", arXiv:2212.04089.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .consensus import disjoint_merge, elect_sign, weighted_sum
from .sparsify import sparsify


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """One member of the family: its sparsifier, whether it elects signs, and its defaults."""

    name: str
    pretty_name: str
    reference: str
    sparsification: str | None  # None, "magnitude", "random", "magnitude_outliers", "della_magprune"
    consensus: bool
    default_normalize: bool
    default_rescale: bool


_VARIANT_LIST: tuple[TaskArithmeticVariant, ...] = (
    TaskArithmeticVariant("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                          None, False, False, False),
    TaskArithmeticVariant("ties", "TIES", "https://arxiv.org/abs/2306.01708",
                          "magnitude", True, True, False),
    TaskArithmeticVariant("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
                          "random", True, False, True),
    TaskArithmeticVariant("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
                          "random", False, False, True),
    TaskArithmeticVariant("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
                          "magnitude_outliers", False, False, False),
    TaskArithmeticVariant("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
                          "magnitude_outliers", True, False, False),
    TaskArithmeticVariant("della", "DELLA", "https://arxiv.org/abs/2406.11617",
                          "della_magprune", True, True, True),
    TaskArithmeticVariant("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
                          "della_magprune", False, False, True),
)
VARIANTS: dict[str, TaskArithmeticVariant] = {variant.name: variant for variant in _VARIANT_LIST}


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (the kernels never compute in bf16/fp16)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """base + lambda·mix(wᵢ·δᵢ) for already-sparsified deltas, in the deltas' dtype.

    The one code path shared by the engine and the search's candidate builder.
    """
    if not deltas:
        return base.clone()
    return _mix_stacked(base, torch.stack(list(deltas)), weights,
                        consensus=consensus, normalize=normalize, lambda_=lambda_)


HOST_CHUNK_ELEMENTS = 1 << 18  # the consensus runs on cache-sized slices on the host: ~3x faster than whole tensors


def _element_chunks(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, end) slices of the flattened elements: cache-sized on the host, the whole tensor elsewhere."""
    size = HOST_CHUNK_ELEMENTS if device.type == "cpu" else max(numel, 1)
    return [(start, min(numel, start + size)) for start in range(0, numel, size)]


def _mix_stacked(
    base: torch.Tensor,
    stacked: torch.Tensor,
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """``combine_task_vectors`` on deltas stacked along dim 0 (scaled in place), slice by slice.

    Every step is elementwise across models, so slicing the elements changes no
    result, only memory traffic.
    """
    dtype = stacked.dtype
    k = stacked.shape[0]
    flat = stacked.reshape(k, -1)
    base_flat = base.to(dtype).reshape(-1)
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=stacked.device).reshape(k, 1)
    out = torch.empty_like(base_flat)
    for start, end in _element_chunks(base_flat.numel(), stacked.device):
        _mix_chunk(flat[:, start:end], w, weights, base_flat[start:end], out[start:end],
                   consensus=consensus, normalize=normalize, lambda_=lambda_)
    return out.reshape(base.shape)


def _mix_chunk(sparse: torch.Tensor, w: torch.Tensor, weights: Sequence[float], base: torch.Tensor,
               out: torch.Tensor, *, consensus: bool, normalize: bool, lambda_: float) -> None:
    """out = base + lambda·mix(w·δ) for one slice of the elements (``sparse`` is scaled in place)."""
    weighted = sparse.mul_(w)
    if consensus:
        mixed = disjoint_merge(weighted, weights, elect_sign(weighted), normalize)
    else:
        mixed = weighted_sum(weighted, weights, normalize)
    if lambda_ != 1:
        mixed *= lambda_
    torch.add(base, mixed, out=out)


def _sparsified(variant: TaskArithmeticVariant, delta: torch.Tensor, i: int, *, densities, rescale, gammas,
                epsilons, fields, sorted_magnitudes, ranks, flat_ranks=None) -> torch.Tensor:
    """Model i's task vector after the variant's sparsifier (optional per-model inputs may be None)."""
    return sparsify(
        delta,
        variant.sparsification,
        density=densities[i],
        rescale=rescale,
        gamma=gammas[i] if gammas is not None else None,
        epsilon=epsilons[i] if epsilons is not None else None,
        field=fields[i] if fields is not None else None,
        sorted_magnitudes=sorted_magnitudes[i] if sorted_magnitudes is not None else None,
        ranks=ranks[i] if ranks is not None else None,
        flat_ranks=flat_ranks[i] if flat_ranks is not None else None,
    )


def merge_task_vectors(
    variant: TaskArithmeticVariant,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor] | TaskVectors,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    fields: Sequence[torch.Tensor | None] | None = None,
    sorted_magnitudes: Sequence[torch.Tensor | None] | None = None,
    ranks: Sequence[torch.Tensor | None] | None = None,
    flat_ranks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``variant`` applied to task vectors δᵢ (compute dtype) onto ``base``; float32 (float64) result.

    ``deltas`` are resident (a search's reference backend) or formed as they are read (``TaskVectors``,
    ``evomerge merge``): each is sparsified and dropped before the next, so at most one unsparsified δ
    is alive besides the stacked results. ``sorted_magnitudes[i]`` / ``flat_ranks[i]`` / ``ranks[i]``
    are optional precomputed order statistics of δᵢ (``sorted_magnitudes``, ``flat_ranks``,
    ``della_ranks``); they change no bit of the result.
    """
    stacked = None
    i = 0
    for delta in deltas:
        if stacked is None:
            stacked = torch.empty((len(deltas), *base.shape), dtype=delta.dtype, device=delta.device)
        stacked[i] = _sparsified(variant, delta, i, densities=densities, rescale=rescale, gammas=gammas,
                                 epsilons=epsilons, fields=fields, sorted_magnitudes=sorted_magnitudes, ranks=ranks,
                                 flat_ranks=flat_ranks)
        del delta
        i += 1
    if stacked is None:
        return base.to(compute_dtype(base)).clone()
    return _mix_stacked(base, stacked, weights, consensus=variant.consensus, normalize=normalize, lambda_=lambda_)


class TaskVectors:
    """δᵢ = xᵢ − base for each of ``tensors``, each formed in the compute dtype when iteration reaches it."""

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor):
        self.tensors, self.base = tensors, base

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (torch.sub(tensor, self.base) for tensor in self.tensors)  # promotes inside the subtraction


def generalized_task_arithmetic(variant: TaskArithmeticVariant, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                                **params: Any) -> torch.Tensor:
    """Merge ``tensors`` onto ``base`` with ``variant`` (``params``: ``merge_task_vectors``'s keywords);
    float32 (float64) result, the caller casts. Task vectors are formed one model at a time."""
    base_c = base.to(compute_dtype(base, *tensors))
    return merge_task_vectors(variant, base_c, TaskVectors(tensors, base_c), **params)