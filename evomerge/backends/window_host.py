"""A TIES / breadcrumbs rank window over one tensor in linear time, compiled (numba), for ``cpu_stream``.

It reproduces ``evomerge.methods.sparsify.rank_window_mask``: keep the elements whose stable
ascending rank of |δ| (equal magnitudes ordered by flat index) lies in [lo, hi). The bounds are
order statistics found by a two-level radix select on the float bits (``select_values``' method),
ties at a bound are split by flat index; no sort.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ABS_BITS = np.int32(0x7FFFFFFF)


@njit(cache=True, nogil=True)
def _select(bits, high_counts, rank):
    """(value, count below it, count equal to it) of the element ranked ``rank`` in ascending order of the
    magnitudes of float32 ``bits``.

    ``high_counts`` histograms the high 16 bits; one more pass histograms the low 16 bits inside the
    bucket holding the rank.
    """
    below = 0
    bucket = 0
    while below + high_counts[bucket] <= rank:
        below += high_counts[bucket]
        bucket += 1
    low_counts = np.zeros(1 << 16, dtype=np.int64)
    for j in range(bits.shape[0]):
        v = bits[j] & ABS_BITS
        if (v >> 16) == bucket:
            low_counts[v & 0xFFFF] += 1
    offset = 0
    while below + low_counts[offset] <= rank:
        below += low_counts[offset]
        offset += 1
    return np.int32((bucket << 16) | offset), below, low_counts[offset]


@njit(cache=True, nogil=True)
def window_ranks(delta, lo, hi, out):
    """out[j] = lo where element j's stable ascending rank of |δ| lies in [lo, hi), 0 below it, hi above it.

    Reproduces ``sparsify.rank_window_mask`` (as ``lo <= r < hi``). A stand-in for the ranks themselves
    (``flat_ranks``): a rank comparison ``lo <= r < hi`` gives the
    same answer for it, which is all the compiled pass reads. Needs 0 < lo or hi < n, lo < hi, finite δ.
    """
    n = delta.shape[0]
    bits = delta.view(np.int32)
    counts = np.zeros((4, 1 << 15), dtype=np.int64)  # four interleaved histograms: runs of equal values
    quarter = n - n % 4  # do not wait on one counter
    for j in range(0, quarter, 4):
        counts[0, (bits[j] & ABS_BITS) >> 16] += 1
        counts[1, (bits[j + 1] & ABS_BITS) >> 16] += 1
        counts[2, (bits[j + 2] & ABS_BITS) >> 16] += 1
        counts[3, (bits[j + 3] & ABS_BITS) >> 16] += 1
    for j in range(quarter, n):
        counts[0, (bits[j] & ABS_BITS) >> 16] += 1
    high_counts = counts[0] + counts[1] + counts[2] + counts[3]
    # below lo: |δ| < va, and the first drop_a elements equal to va (in flat order); at or above hi:
    # |δ| > vb, and the last over_b elements equal to vb (no bound: comparisons that never hold)
    va, vb, drop_a, over_b = np.int32(-1), np.int32(0x7FFFFFFF), 0, 0
    if lo > 0:
        va, below, _ = _select(bits, high_counts, lo)
        drop_a = lo - below
    if hi < n:
        vb, below, equal = _select(bits, high_counts, hi)
        over_b = below + equal - hi
    for j in range(n):
        v = bits[j] & ABS_BITS
        out[j] = lo + (hi - lo) * (v > vb) - lo * (v < va)
    j = 0
    while drop_a > 0:  # ties at a bound: only as far as the split of the equal run
        if (bits[j] & ABS_BITS) == va:
            out[j] = 0
            drop_a -= 1
        j += 1
    j = n - 1
    while over_b > 0:
        if (bits[j] & ABS_BITS) == vb:
            out[j] = hi
            over_b -= 1
        j -= 1
