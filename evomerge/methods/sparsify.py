"""Sparsifiers for task vectors: which elements of a delta δ survive, and the L1 rescale.

Each sparsifier returns a boolean keep-mask; ``apply_mask`` turns a mask into
the sparsified delta (mergekit's ``rescaled_masked_tensor`` with the L1 norm).
All orderings of |δ| are *stable ascending ranks*: equal magnitudes are ordered
by flat index (row index for DELLA), so ties are broken deterministically.
mergekit breaks ties by whatever its unstable ``argsort`` returns; on tensors
without ties the masks are identical.

Speed: mergekit sorts every tensor. Here a threshold is one selection
(``torch.kthvalue``) over |δ| and a compare; DELLA sorts each row once (unique
integer keys, no second argsort). A search can precompute the order statistics
once per tensor (``sorted_magnitudes``, ``della_ranks``) and pass them in; the
masks are then identical to the selection path, at the cost of a lookup.
"""

from __future__ import annotations

import torch

L1_EPS = 1e-7  # mergekit: skip the rescale when either L1 norm is below this


# --------------------------------------------------------------------------- order statistics


def magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """Flattened |δ| (a view-free copy in δ's dtype)."""
    return delta.abs().reshape(-1)


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """Ascending sorted flattened |δ|: computed once per tensor, it turns every threshold into a lookup."""
    return torch.sort(magnitudes(delta)).values


def _order_statistic(mags: torch.Tensor, rank: int, sorted_mags: torch.Tensor | None) -> torch.Tensor:
    """Value of 0-based ascending rank ``rank`` of ``mags``: a lookup if sorted, else a selection."""
    if sorted_mags is not None:
        return sorted_mags[rank]
    return torch.kthvalue(mags, rank + 1).values


def _drop_equal(keep: torch.Tensor, mags: torch.Tensor, value: torch.Tensor, count: int, first: bool) -> None:
    """Clear ``keep`` for the first (or last) ``count`` elements equal to ``value`` in flat-index order."""
    equal = torch.nonzero(mags == value).reshape(-1)
    keep[equal[:count] if first else equal[equal.numel() - count :]] = False


def rank_window_mask(
    mags: torch.Tensor, low: int, high: int, sorted_mags: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the elements of flat ``mags`` whose stable ascending rank lies in [low, high).

    Two selections at most (one per bound); ties at a bound are resolved by flat
    index with ``nonzero`` only when they straddle it.
    """
    n = mags.numel()
    low, high = max(0, low), min(n, high)
    if low >= high:
        return torch.zeros(n, dtype=torch.bool, device=mags.device)
    keep = torch.ones(n, dtype=torch.bool, device=mags.device)
    if low > 0:
        lower = _order_statistic(mags, low, sorted_mags)
        torch.ge(mags, lower, out=keep)
        surplus = int(keep.sum()) - (n - low)  # equal-to-bound elements ranked below `low`
        if surplus > 0:
            _drop_equal(keep, mags, lower, surplus, first=True)
    if high < n:
        upper = _order_statistic(mags, high - 1, sorted_mags)
        below = mags <= upper
        surplus = int(below.sum()) - high  # equal-to-bound elements ranked at or above `high`
        if surplus > 0:
            _drop_equal(below, mags, upper, surplus, first=False)
        keep &= below
    return keep


# --------------------------------------------------------------------------- masks


def magnitude_keep_count(numel: int, density: float) -> int:
    """TIES keeps k = max(1, ⌊density·n⌋) elements (mergekit ``sparsify.magnitude``)."""
    return max(1, int(density * numel))


def magnitude_mask(
    delta: torch.Tensor, density: float, sorted_magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """TIES trim: keep the top k = max(1, ⌊density·n⌋) of |δ| over the whole tensor.

    Yadav et al. 2023, "TIES-Merging", arXiv:2306.01708. density ≥ 1 keeps all,
    density ≤ 0 keeps none. Threshold by selection, or by lookup in the ascending
    ``sorted_magnitudes``; both give the same mask.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = magnitude_keep_count(n, density)
    return rank_window_mask(magnitudes(delta), n - k, n, sorted_magnitudes).reshape(delta.shape)


def breadcrumbs_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Ascending rank window [n_bot, n_bot + ⌊density·n⌋) kept by Model Breadcrumbs.

    mergekit ``magnitude_outliers``: drop the top ⌊gamma·n⌋, then the smallest so
    ⌊density·n⌋ remain; outlier removal shrinks when density leaves no room.
    """
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    return n_bot, n_bot + target


def breadcrumbs_mask(
    delta: torch.Tensor, density: float, gamma: float, sorted_magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ⌊gamma·n⌋ |δ| (outliers) and the smallest, keeping ⌊density·n⌋.

    Davari & Belilovsky 2023, "Model Breadcrumbs", arXiv:2312.06795. density ≥ 1
    keeps all; unlike TIES, ⌊density·n⌋ = 0 keeps none.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    low, high = breadcrumbs_window(delta.numel(), density, gamma)
    return rank_window_mask(magnitudes(delta), low, high, sorted_magnitudes).reshape(delta.shape)


def dare_mask(field: torch.Tensor, density: float) -> torch.Tensor:
    """DARE drop: keep each element with probability density, i.e. ``field < density``.

    Yu et al. 2023, "Language Models are Super Mario" (DARE), arXiv:2311.03099.
    """
    if density >= 1:
        return torch.ones_like(field, dtype=torch.bool)
    return field < density


# --------------------------------------------------------------------------- DELLA


def _as_rows(delta: torch.Tensor) -> torch.Tensor:
    """mergekit's DELLA row view: 1-D tensors are one row; ranks run along dim 1."""
    if delta.dim() < 2:
        return delta.reshape(1, -1)
    return delta.movedim(1, -1).reshape(-1, delta.shape[1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_as_rows``."""
    if like.dim() < 2:
        return rows.reshape(like.shape)
    moved = list(like.movedim(1, -1).shape)
    return rows.reshape(moved).movedim(-1, 1)


def _sort_row_keys(keys: torch.Tensor) -> torch.Tensor:
    """Sort unique int64 keys along dim 1.

    Keys are unique, so every sort algorithm returns the same order. On the host,
    NumPy's SIMD sort of values is ~3x faster than torch's CPU sort (which also
    builds an index tensor); other devices use ``torch.sort``.
    """
    if keys.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return torch.sort(keys, dim=1).values


def della_ranks(delta: torch.Tensor) -> torch.Tensor:
    """0-based stable ascending rank of |δ| within each row (int32, shape of δ).

    One sort per row: for float32 the key ``bits(|δ|) << b | column`` is unique
    and orders like (|δ|, column), so the sorted keys carry the column indices
    and a single scatter turns them into ranks. mergekit argsorts twice.
    """
    rows = _as_rows(delta.abs())
    n_rows, n = rows.shape
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=delta.device)
    if rows.numel() == 0:
        return _from_rows(ranks, delta)
    positions = torch.arange(n, dtype=torch.int32, device=delta.device).expand(n_rows, n)
    if rows.dtype == torch.float32 or rows.dtype in (torch.bfloat16, torch.float16):
        shift = max(1, (n - 1).bit_length())
        keys = rows.float().contiguous().view(torch.int32).to(torch.int64) << shift
        keys |= torch.arange(n, dtype=torch.int64, device=delta.device)
        columns = _sort_row_keys(keys) & ((1 << shift) - 1)
    else:  # float64 magnitudes use all 64 bits: fall back to a stable sort
        columns = torch.sort(rows, dim=1, stable=True).indices
    ranks.scatter_(1, columns, positions)
    return _from_rows(ranks, delta)


def della_keep_probability(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    ranks: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DELLA MagPrune keep-probability p = (density − ε) + 2ε·r/(n−1), r the 0-based row rank of |δ|.

    Deep et al. 2024, "DELLA-Merging", arXiv:2406.11617; mergekit ``della_magprune``.
    Larger magnitudes are kept more often. A row of one element gets p = density
    (mergekit fails there: 0/0). ``ranks`` from ``della_ranks`` may be precomputed.
    """
    dtype = dtype or (torch.float64 if delta.dtype == torch.float64 else torch.float32)
    if ranks is None:
        ranks = della_ranks(delta)
    n = delta.shape[-1] if delta.dim() < 2 else delta.shape[1]
    if n < 2:
        return torch.full(delta.shape, density, dtype=dtype, device=delta.device)
    rank_norm = ranks.to(dtype) / (n - 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_mask(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    field: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA MagPrune drop: keep where ``field < p`` (p from ``della_keep_probability``).

    density ≥ 1 keeps all, density ≤ 0 keeps none; otherwise density ± ε must lie
    in (0, 1) (mergekit raises the same error).
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    check_della_window(density, epsilon)
    return field < della_keep_probability(delta, density, epsilon, ranks)


def della_window_error(density: float, epsilon: float) -> str | None:
    """Why (density, ε) is unusable for DELLA, or None: with 0 < density < 1, density ± ε must lie in (0, 1)."""
    if 0 < density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
        return (
            f"density ± epsilon must lie in (0, 1) for DELLA, got density={density:g}, "
            f"epsilon={epsilon:g} (window [{density - epsilon:g}, {density + epsilon:g}])"
        )
    return None


def check_della_window(density: float, epsilon: float) -> None:
    """Raise ValueError when ``della_window_error`` reports a problem."""
    error = della_window_error(density, epsilon)
    if error:
        raise ValueError(error)


# --------------------------------------------------------------------------- applying a mask


def apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Masked δ, optionally rescaled by ‖δ‖₁ / ‖m⊙δ‖₁ (skipped when either is < 1e-7).

    mergekit ``rescaled_masked_tensor`` with the L1 norm (DARE's 1/density
    rescale, replaced by the exact ratio of L1 norms).
    """
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def sparsify(
    delta: torch.Tensor,
    method: str | None,
    *,
    density: float = 1.0,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    field: torch.Tensor | None = None,
    sorted_magnitudes: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparsify one task vector with ``method`` in {None, magnitude, random, magnitude_outliers, della_magprune}.

    Matches mergekit ``sparsify.sparsify``; density ≥ 1 returns δ untouched.
    ``field`` (a ``random_field``) is required by the random methods.
    """
    if method is None or density >= 1:
        return delta
    if method == "magnitude":
        mask = magnitude_mask(delta, density, sorted_magnitudes)
    elif method == "magnitude_outliers":
        mask = breadcrumbs_mask(delta, density, gamma, sorted_magnitudes)
    elif method in ("random", "della_magprune"):
        if field is None:
            raise ValueError(f"sparsification {method!r} needs a random field (see random_field)")
        if field.shape != delta.shape:
            raise ValueError(f"random field shape {tuple(field.shape)} != delta shape {tuple(delta.shape)}")
        if method == "random":
            mask = dare_mask(field.to(delta.device), density)
        else:
            mask = della_mask(delta, density, epsilon, field.to(delta.device), ranks)
    else:
        raise ValueError(f"unknown sparsification method {method!r}")
    return apply_mask(delta, mask, rescale)
