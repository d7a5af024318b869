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
    """(value, count below it) of the element ranked ``rank`` in ascending order of non-negative float32 ``bits``.

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
    return np.int32((bucket << 16) | offset), below


@njit(cache=True, nogil=True)
def window_ranks(delta, lo, hi, out):
    """out[j] = lo where element j's stable ascending rank of |δ| lies in [lo, hi), 0 below it, hi above it.

    A stand-in for the ranks themselves (``flat_ranks``): a rank comparison ``lo <= r < hi`` gives the
    same answer for it, which is all the compiled pass reads. Needs 0 < lo or hi < n, lo < hi, finite δ.
    """
    n = delta.shape[0]
    bits = delta.view(np.int32)
    high_counts = np.zeros(1 << 15, dtype=np.int64)
    for j in range(n):
        high_counts[(bits[j] & ABS_BITS) >> 16] += 1
    va = vb = np.int32(0)
    drop_a = keep_b = 0
    if lo > 0:  # the first lo − (count below va) elements equal to va rank below lo
        va, below = _select(bits, high_counts, lo)
        drop_a = lo - below
    if hi < n:  # the first hi − (count below vb) elements equal to vb rank below hi
        vb, below = _select(bits, high_counts, hi)
        keep_b = hi - below
    seen_a = seen_b = 0
    for j in range(n):
        v = bits[j] & ABS_BITS
        r = lo
        if lo > 0:
            if v < va:
                r = 0
            elif v == va:
                if seen_a < drop_a:
                    r = 0
                seen_a += 1
        if hi < n:
            if v > vb:
                r = hi
            elif v == vb:
                if seen_b >= keep_b:
                    r = hi
                seen_b += 1
        out[j] = r
