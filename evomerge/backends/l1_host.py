"""``evomerge.methods.l1``'s fixed-order L1 sum compiled with numba, for the search's candidate kernel.

The engine sums with torch (``l1.l1_norm``); this module is imported only by the search (numba
costs ~150 MB of memory and a compile). Tests check that both give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from evomerge.methods.l1 import L1_BLOCK


@njit(cache=True, nogil=True)
def lane_sum(values: np.ndarray, m: int) -> float:
    """Σ |values[:m]| in float64, eight interleaved lanes combined pairwise: one block of the L1 order.

    ``values`` holds one block's masked entries (dropped ones are ±0, which add nothing).
    """
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    full = m - m % 8
    for j in range(0, full, 8):
        a0 += abs(np.float64(values[j]))
        a1 += abs(np.float64(values[j + 1]))
        a2 += abs(np.float64(values[j + 2]))
        a3 += abs(np.float64(values[j + 3]))
        a4 += abs(np.float64(values[j + 4]))
        a5 += abs(np.float64(values[j + 5]))
        a6 += abs(np.float64(values[j + 6]))
        a7 += abs(np.float64(values[j + 7]))
    tail = np.zeros(8)  # the last m % 8 values go to lanes 0.. in order; adding +0.0 changes nothing
    for j in range(full, m):
        tail[j - full] = abs(np.float64(values[j]))
    a0 += tail[0]
    a1 += tail[1]
    a2 += tail[2]
    a3 += tail[3]
    a4 += tail[4]
    a5 += tail[5]
    a6 += tail[6]
    a7 += tail[7]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, nogil=True)
def l1_norm_host(values: np.ndarray) -> np.float32:
    """float32 ‖values‖₁ of a flat array in ``evomerge.methods.l1.l1_norm``'s order: ``lane_sum`` per
    ``L1_BLOCK`` block, the blocks added in order from 0.0 in float64, rounded once."""
    total = 0.0
    for start in range(0, values.shape[0], L1_BLOCK):
        end = min(values.shape[0], start + L1_BLOCK)
        total += lane_sum(values[start:end], end - start)
    return np.float32(total)
