"""``fields.splitmix_uniform`` compiled with numba over numba's threads: the fast way to fill a field.

Imported lazily by ``fields.random_field`` (numba's import and first compile cost time and memory
that merges without DARE or DELLA never need). Tests check it against the NumPy definition.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from evomerge.methods.fields import GOLDEN_GAMMA, MIX_1, MIX_2

_GAMMA, _M1, _M2 = np.uint64(GOLDEN_GAMMA), np.uint64(MIX_1), np.uint64(MIX_2)
_SCALE = np.float32(2.0 ** -24)


@njit(cache=True, nogil=True)
def fill_uniform_range(key, out, start, end):
    """out[j] = ``splitmix_uniform(key, j, 1)`` for j in [start, end), on the calling thread (uint64
    arithmetic wraps, as NumPy's)."""
    k = np.uint64(key)
    for j in range(start, end):
        z = k + np.uint64(j + 1) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
        out[j] = np.float32(z >> np.uint64(40)) * _SCALE


CHUNK = 1 << 16  # elements per parallel task


@njit(cache=True, nogil=True, parallel=True)
def fill_uniform(key, out):
    """out[j] = ``splitmix_uniform(key, j, 1)`` for every j, ``fill_uniform_range`` over numba's threads."""
    n = out.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        fill_uniform_range(key, out, c * CHUNK, min(n, (c + 1) * CHUNK))
