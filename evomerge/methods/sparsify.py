"""Sparsifiers for task vectors: which elements of a delta δ survive, and the L1 rescale.

Each sparsifier returns a boolean keep-mask; ``apply_mask`` turns a mask into
the sparsified delta (mergekit's ``rescaled_masked_tensor`` with the L1 norm).
All orderings of |δ| are *stable ascending ranks*: equal magnitudes are ordered
by flat index (column index for DELLA), so ties are broken deterministically.
mergekit breaks ties by whatever its unstable ``argsort`` returns; on tensors
without ties the masks are identical.

Speed: mergekit sorts every tensor. Here a threshold is one radix select on the
float bits plus a compare; DELLA sorts each row once (unique integer keys, no
second argsort; on the host with NumPy's SIMD sort, 2-4x faster than torch's CPU
sort). A search can precompute the order statistics once per tensor
(``sorted_magnitudes``, ``della_ranks``) and pass them in; a threshold is then a
lookup. Sorted and selected values do not depend on the algorithm, so every
path and backend gives the same masks.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .l1 import l1_norm

L1_EPS = 1e-7  # mergekit: skip the rescale when either L1 norm is below this
_HOST_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


# --------------------------------------------------------------------------- order statistics


def _use_numpy(values: torch.Tensor, numpy: bool | None) -> bool:
    """Whether to sort/select with NumPy: by default when ``values`` can be handed over without a copy."""
    if numpy is None:
        return values.device.type == "cpu" and values.dtype in _HOST_DTYPES and not values.requires_grad
    return numpy


def magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """Flattened |δ|."""
    return delta.abs().reshape(-1)


def sort_values(values: torch.Tensor, dim: int = -1, *, numpy: bool | None = None) -> torch.Tensor:
    """Ascending sorted values along ``dim`` (values only, so any algorithm gives the same result)."""
    if _use_numpy(values, numpy):
        return torch.from_numpy(np.sort(values.numpy(), axis=dim))
    return torch.sort(values, dim=dim).values


def select_values(values: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """Values at the given 0-based ascending ranks of flat non-negative ``values``, without sorting.

    For float32, a two-level radix select on the IEEE bits (which order like the
    values when non-negative): one histogram of the high 16 bits over all
    elements, then one of the low 16 bits of the elements in the bucket holding
    the rank. Several times faster than ``torch.kthvalue`` and insensitive to
    repeated values (bf16-derived deltas), where quickselect degrades. Other
    dtypes use kthvalue.
    """
    if values.dtype != torch.float32:
        return [torch.kthvalue(values, r + 1).values for r in ranks]
    device = values.device
    bits = values.view(torch.int32)
    high_cumulative = torch.bincount(bits >> 16, minlength=1 << 15).cumsum(0)
    selected = []
    for rank in ranks:
        bucket = int(torch.searchsorted(high_cumulative, torch.tensor([rank], device=device), right=True))
        below = int(high_cumulative[bucket - 1]) if bucket else 0
        # low 16 bits of the bucket's elements in bins 1..65536; every other element lands in bin 0 or 65537
        low = (bits - ((bucket << 16) - 1)).clamp_(0, 1 << 16 | 1)
        low_cumulative = torch.bincount(low, minlength=(1 << 16) + 2)[1 : (1 << 16) + 1].cumsum(0)
        offset = int(torch.searchsorted(low_cumulative, torch.tensor([rank - below], device=device), right=True))
        value_bits = torch.tensor((bucket << 16) | offset, dtype=torch.int32, device=device)
        selected.append(value_bits.view(torch.float32))
    return selected


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """Ascending sorted flattened |δ|: computed once per tensor, it turns every threshold into a lookup."""
    return sort_values(magnitudes(delta))


def stable_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices of δ's elements in stable ascending order of |δ| (equal magnitudes by flat index; int64)."""
    return torch.sort(magnitudes(delta), stable=True).indices


def flat_ranks(delta: torch.Tensor) -> torch.Tensor:
    """0-based stable ascending rank of every |δ| over the whole tensor (int32, shape of δ).

    Equal magnitudes rank by flat index, the order every mask here uses. Computed once per tensor
    (one stable sort), it turns a TIES or breadcrumbs mask into one comparison per element: no
    selection, no tie handling.
    """
    order = stable_order(delta)
    n = order.numel()
    ranks = torch.empty(n, dtype=torch.int32, device=delta.device)
    ranks[order] = torch.arange(n, dtype=torch.int32, device=delta.device)
    return ranks.reshape(delta.shape)


def _window(ranks: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Elements whose precomputed rank lies in [low, high)."""
    n = ranks.numel()
    if low <= 0 and high >= n:
        return torch.ones_like(ranks, dtype=torch.bool)
    if low <= 0:
        return ranks < high
    if high >= n:
        return ranks >= low
    return (ranks >= low) & (ranks < high)


def _position_after(flags: torch.Tensor, count: int, chunk: int = 1 << 16) -> int:
    """Smallest P such that ``flags[:P]`` holds ``count`` True values (0 when count is 0)."""
    if count <= 0:
        return 0
    n = flags.numel()
    full = n - n % chunk
    per_chunk = torch.count_nonzero(flags[:full].view(-1, chunk), dim=1)
    if full < n:
        per_chunk = torch.cat([per_chunk, torch.count_nonzero(flags[full:]).reshape(1)])
    cumulative = per_chunk.cumsum(0)
    j = int(torch.searchsorted(cumulative, torch.tensor([count], device=flags.device)))  # first chunk reaching count
    before = int(cumulative[j - 1]) if j else 0
    inside = torch.nonzero(flags[j * chunk : (j + 1) * chunk]).reshape(-1)
    return j * chunk + int(inside[count - before - 1]) + 1


def _drop_equal(keep: torch.Tensor, mags: torch.Tensor, value: torch.Tensor, count: int, first: bool) -> None:
    """Clear ``keep`` for the first (or last) ``count`` elements equal to ``value`` in flat-index order."""
    equal = mags == value
    if first:
        end = _position_after(equal, count)
        keep[:end].masked_fill_(equal[:end], False)
    else:
        start = _position_after(equal, int(torch.count_nonzero(equal)) - count)
        keep[start:].masked_fill_(equal[start:], False)


def rank_window_mask(
    mags: torch.Tensor, low: int, high: int, sorted_mags: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the elements of flat ``mags`` whose stable ascending rank lies in [low, high).

    The bounds are order statistics (one selection, or lookups in ``sorted_mags``);
    ties at a bound are resolved by flat index, with ``nonzero``, only when they
    straddle it.
    """
    n = mags.numel()
    low, high = max(0, low), min(n, high)
    if low >= high:
        return torch.zeros(n, dtype=torch.bool, device=mags.device)
    bounds = ([low] if low > 0 else []) + ([high - 1] if high < n else [])
    if not bounds:
        return torch.ones(n, dtype=torch.bool, device=mags.device)
    values = [sorted_mags[r] for r in bounds] if sorted_mags is not None else select_values(mags, bounds)
    keep = None
    if low > 0:
        lower = values[0].to(mags.device)
        keep = mags >= lower
        surplus = int(torch.count_nonzero(keep)) - (n - low)  # equal-to-bound elements ranked below `low`
        if surplus > 0:
            _drop_equal(keep, mags, lower, surplus, first=True)
    if high < n:
        upper = values[-1].to(mags.device)
        below = mags <= upper
        surplus = int(torch.count_nonzero(below)) - high  # equal-to-bound elements ranked at or above `high`
        if surplus > 0:
            _drop_equal(below, mags, upper, surplus, first=False)
        keep = below if keep is None else keep.logical_and_(below)
    return keep


# --------------------------------------------------------------------------- masks


def magnitude_keep_count(numel: int, density: float) -> int:
    """TIES keeps k = max(1, ⌊density·n⌋) elements (mergekit ``sparsify.magnitude``)."""
    return max(1, int(density * numel))


def magnitude_mask(
    delta: torch.Tensor, density: float, sorted_magnitudes: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES trim: keep the top k = max(1, ⌊density·n⌋) of |δ| over the whole tensor.

    Yadav et al. 2023, "TIES-Merging", arXiv:2306.01708. density ≥ 1 keeps all,
    density ≤ 0 keeps none. Threshold by selection, by lookup in the ascending
    ``sorted_magnitudes``, or a comparison with precomputed ``ranks`` (``flat_ranks``);
    all give the same mask.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = magnitude_keep_count(n, density)
    if ranks is not None:
        return _window(ranks, n - k, n)
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
    delta: torch.Tensor, density: float, gamma: float, sorted_magnitudes: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ⌊gamma·n⌋ |δ| (outliers) and the smallest, keeping ⌊density·n⌋.

    Davari & Belilovsky 2023, "Model Breadcrumbs", arXiv:2312.06795. density ≥ 1
    keeps all; unlike TIES, ⌊density·n⌋ = 0 keeps none.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    low, high = breadcrumbs_window(delta.numel(), density, gamma)
    if ranks is not None:
        return _window(ranks, low, high) if low < high else torch.zeros_like(delta, dtype=torch.bool)
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


def _row_keys_host(rows: np.ndarray) -> np.ndarray:
    """int64 keys bits(|δ|) << 32 | column for non-negative float32 rows (NumPy, in place of a stack)."""
    keys = np.empty(rows.shape, dtype=np.int64)
    pairs = keys.view(np.int32).reshape(*rows.shape, 2)
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    pairs[..., low] = np.arange(rows.shape[1], dtype=np.int32)
    pairs[..., high] = rows.view(np.int32)
    return keys


PARALLEL_SORT_MIN_ELEMENTS = 1 << 20


def _sort_rows_in_place(keys: np.ndarray) -> None:
    """Sort each row of ``keys``; large arrays in row blocks on torch's intra-op thread count.

    NumPy releases the GIL while sorting, so the blocks run in parallel; rows are
    sorted independently, so the result does not depend on the split.
    """
    threads = min(torch.get_num_threads(), keys.shape[0])
    if threads < 2 or keys.size < PARALLEL_SORT_MIN_ELEMENTS:
        keys.sort(axis=1)
        return
    bounds = np.linspace(0, keys.shape[0], threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: keys[bounds[i] : bounds[i + 1]].sort(axis=1), range(threads)))


def sorted_row_keys(rows: np.ndarray) -> np.ndarray:
    """Each row of non-negative float32 ``rows`` as ascending int64 keys bits(|δ|) << 32 | column: the
    stable order of DELLA's row ranks, the column in the low 32 bits (NumPy)."""
    keys = _row_keys_host(rows)
    _sort_rows_in_place(keys)
    return keys


def _row_order(rows: torch.Tensor, *, numpy: bool | None = None) -> torch.Tensor:
    """Columns of each row of non-negative float32 ``rows`` in stable ascending order (int64).

    One sort of unique 64-bit keys (|δ| bits in the high word, column in the low
    word): they order like (|δ|, column), so any sort algorithm gives the same
    result, and the sorted keys carry the columns: no index tensor is built.
    """
    if _use_numpy(rows, numpy):
        return torch.from_numpy(sorted_row_keys(rows.contiguous().numpy()) & 0xFFFFFFFF)
    columns = torch.arange(rows.shape[1], dtype=torch.int64, device=rows.device)
    keys = (rows.contiguous().view(torch.int32).to(torch.int64) << 32) | columns
    return torch.sort(keys, dim=1).values & 0xFFFFFFFF


def della_ranks(delta: torch.Tensor) -> torch.Tensor:
    """0-based stable ascending rank of |δ| within each row (int32, shape of δ); 1-D tensors are one row.

    One sort per row plus one scatter (mergekit argsorts twice). Compute once per
    tensor to make every DELLA candidate's mask a lookup and a compare.
    """
    rows = _as_rows(delta.abs())
    n_rows, n = rows.shape
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=delta.device)
    if rows.numel() == 0:
        return _from_rows(ranks, delta)
    if rows.dtype == torch.float32:
        order = _row_order(rows)
    else:  # float64 magnitudes need all 64 bits: stable sort instead of keys
        order = torch.sort(rows, dim=1, stable=True).indices
    positions = torch.arange(n, dtype=torch.int32, device=delta.device).expand(n_rows, n)
    ranks.scatter_(1, order, positions)
    return _from_rows(ranks, delta)


def della_probability_table(n: int, density: float, epsilon: float, dtype: torch.dtype = torch.float32,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """p_r = (density − ε) + 2ε·r/(n−1) for each 0-based rank r < n (mergekit's float ops, in ``dtype``).

    Deep et al. 2024, "DELLA-Merging", arXiv:2406.11617. A row of one element
    gets p = density (mergekit fails there: 0/0 is not a probability).
    """
    if n < 2:
        return torch.full((n,), density, dtype=dtype, device=device)
    rank_norm = torch.arange(n, dtype=dtype, device=device) / (n - 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_keep_probability(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    ranks: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DELLA MagPrune keep-probability of every element: p = (density − ε) + 2ε·r/(n−1), r its row rank of |δ|.

    Larger magnitudes are kept more often. ``ranks`` (from ``della_ranks``) may be
    precomputed; p is then a table lookup.
    """
    dtype = dtype or (torch.float64 if delta.dtype == torch.float64 else torch.float32)
    if ranks is None:
        ranks = della_ranks(delta)
    n = delta.shape[-1] if delta.dim() < 2 else delta.shape[1]
    table = della_probability_table(n, density, epsilon, dtype, delta.device)
    return table.index_select(0, ranks.reshape(-1)).reshape(delta.shape)


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


def della_window_broken(density: np.ndarray, epsilon: np.ndarray) -> bool:
    """Whether any (density, ε) pair is one ``della_window_error`` reports (the same float64 comparisons)."""
    inside = (0 < density) & (density < 1)
    return bool((inside & ((density - epsilon <= 0) | (density + epsilon >= 1))).any())


def check_della_window(density: float, epsilon: float) -> None:
    """Raise ValueError when ``della_window_error`` reports a problem."""
    error = della_window_error(density, epsilon)
    if error:
        raise ValueError(error)


# --------------------------------------------------------------------------- applying a mask


def apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Masked δ, optionally rescaled by ‖δ‖₁ / ‖m⊙δ‖₁ (skipped when either is < 1e-7).

    mergekit ``rescaled_masked_tensor`` with the L1 norm (DARE's 1/density
    rescale, replaced by the exact ratio of L1 norms). Both norms are ``l1_norm``: float64 sums
    in one fixed order, so the search's fused kernel reproduces them bit for bit (mergekit's
    float32 sums can differ from them by a rounding).
    """
    masked = delta * mask
    if not rescale:
        return masked
    before = l1_norm(delta)
    after = l1_norm(delta, mask)
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked.mul_(before / after)


def default_param(name: str) -> float:
    """A sparsifier parameter's default (gamma, epsilon): the method registry's, its one source."""
    from evomerge.methods.registry import EPSILON, GAMMA

    return {"gamma": GAMMA, "epsilon": EPSILON}[name].default


def sparsify(
    delta: torch.Tensor,
    method: str | None,
    *,
    density: float = 1.0,
    rescale: bool = False,
    gamma: float | None = None,
    epsilon: float | None = None,
    field: torch.Tensor | None = None,
    sorted_magnitudes: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
    flat_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparsify one task vector with ``method`` in {None, magnitude, random, magnitude_outliers, della_magprune}.

    Matches mergekit ``sparsify.sparsify``; density ≥ 1 returns δ untouched.
    ``field`` (a ``random_field``) is required by the random methods. ``gamma`` / ``epsilon``
    default to the registry's (``registry.GAMMA``, ``registry.EPSILON``).
    """
    if method is None or density >= 1:
        return delta
    gamma = default_param("gamma") if gamma is None else gamma
    epsilon = default_param("epsilon") if epsilon is None else epsilon
    if method == "magnitude":
        mask = magnitude_mask(delta, density, sorted_magnitudes, flat_ranks)
    elif method == "magnitude_outliers":
        mask = breadcrumbs_mask(delta, density, gamma, sorted_magnitudes, flat_ranks)
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
