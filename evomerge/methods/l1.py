"""The L1 norm of a (masked) task vector, summed in one fixed order so every code path agrees bit for bit.

mergekit's rescale ``‖δ‖₁ / ‖m⊙δ‖₁`` (``rescaled_masked_tensor``) sums float32 magnitudes with
torch's reduction, whose order depends on the tensor's size, the CPU's vector width and the
thread count. Here the sum has one definition: float64 accumulation over blocks of
``L1_BLOCK`` elements (counted from the tensor's first element), eight interleaved lanes
inside a block, ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`` per block, blocks added in order,
rounded once to the tensor's dtype. The engine (``apply_mask``) and the search's fused
candidate kernel both call ``lane_sum`` on the same blocks, so their rescale factors, and
so their merged tensors, are identical; the result is more accurate than a float32 sum and
differs from mergekit's by at most a rounding of the norm (≤ 1 ulp of the factor).
On the host the sum runs in compiled code (numba, one thread: a memory-bound pass); elsewhere
a float64 torch sum.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

L1_BLOCK = 4096


@njit(cache=True, nogil=True)
def lane_sum(values: np.ndarray, m: int) -> float:
    """Σ |values[:m]| in float64, eight interleaved lanes combined pairwise: the per-block order of the L1 norm.

    ``values`` holds the block's masked entries (dropped ones are ±0, which add nothing).
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
def _l1_host(values: np.ndarray, mask: np.ndarray, masked: bool) -> float:
    """Σ |values| where ``mask`` (all when not ``masked``), in the module's fixed order."""
    n = values.shape[0]
    blocks = (n + L1_BLOCK - 1) // L1_BLOCK
    partial = np.empty(blocks)
    for b in range(blocks):
        start = b * L1_BLOCK
        m = min(n, start + L1_BLOCK) - start
        if masked:
            kept = np.empty(m, dtype=values.dtype)
            for j in range(m):
                kept[j] = values[start + j] if mask[start + j] else 0.0
            partial[b] = lane_sum(kept, m)
        else:
            partial[b] = lane_sum(values[start : start + m], m)
    total = 0.0
    for b in range(blocks):
        total += partial[b]
    return total


def l1_norm(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖m⊙x‖₁ (‖x‖₁ without ``mask``) as a 0-d tensor of x's dtype, in the fixed order above."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        values = x.detach().contiguous().reshape(-1).numpy()
        if mask is None:
            total = _l1_host(values, np.zeros(0, dtype=np.bool_), False)
        else:
            total = _l1_host(values, mask.contiguous().reshape(-1).numpy(), True)
        return torch.tensor(total, dtype=torch.float64).to(x.dtype)
    mags = x.abs().to(torch.float64)
    if mask is not None:
        mags = mags * mask
    return mags.sum().to(x.dtype)
