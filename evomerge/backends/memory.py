"""What a candidate builder holds, per parameter, on its device and on the host: the estimates a
builder checks against the free memory before it loads anything (``CandidateBuilder``)."""

from __future__ import annotations

import torch

RANK16_MAX_ROW = 1 << 16  # DELLA rows up to this length keep 16-bit ranks on the fused path
SCRATCH_CHUNK = 1 << 22  # elements per step of the cuda backend's setup passes over the whole model
SORT_SCRATCH = 48  # bytes per element of the largest tensor while it is ranked on the GPU (see resident_bytes)
CHUNK_SCRATCH = 64  # bytes per element of a SCRATCH_CHUNK step (exact_sum_limits' temporaries and δ)


def resident_bytes(numel: int, largest: int, k: int, sparsification: str | None, model_dtype: torch.dtype,
                   path: str, fused: bool = False, max_row: int = 0) -> int:
    """Bytes a builder keeps on its device for a model of ``numel`` parameters and ``k`` fine-tunes.

    A float32 base (4 bytes per parameter) and the inputs: float32 task vectors (4k), or on the
    device path a bf16 model's fine-tunes as they are (2k). On the flat paths a float32 output (4)
    that float32 parameters are views of, besides a 16-bit model's own parameters, except on the
    fused device path for a bf16 model, whose kernels write its parameters directly; else the
    model's own parameters. 4k for ranks (TIES, breadcrumbs; none on the fused path, whose kernels
    compare with the window's bound elements, the order being held on the host) or DELLA's rank
    term (2k on the fused path, as 16-bit row ranks, when no row of a tensor, ``max_row``, exceeds
    65536). 4k for the random
    fields (DARE, DELLA) and, on the device path, the element → tensor index (4), unless the fused
    kernels compute both where they need them (``fused``). And the largest transient of setup:
    ranking the largest tensor (a stable sort with int64 indices: ~44 bytes per element; on an H200
    a bf16 TIES builder of a ~170M model peaked 0.9 GiB above what it then held, 40 bytes per
    element of its 24.6M-element embedding), or a chunk of the exact-sum limits (~60 bytes per
    element of ``SCRATCH_CHUNK``), whichever is larger.
    """
    itemsize = torch.empty(0, dtype=model_dtype).element_size()
    flat = path in ("host", "device")
    inputs16 = path == "device" and model_dtype == torch.bfloat16
    per = 4 + (2 if inputs16 else 4) * k
    per += (0 if inputs16 and fused else 4) if flat else itemsize
    model = numel * itemsize if flat and itemsize != 4 else 0
    stored = not (fused and path == "device")
    per += 4 if path == "device" and stored else 0
    if sparsification in ("magnitude", "magnitude_outliers") and stored:
        per += 4 * k
    elif sparsification == "della_magprune":
        per += (2 if not stored and max_row <= RANK16_MAX_ROW else 4) * k
    per += 4 * k if sparsification in ("random", "della_magprune") and stored else 0
    return numel * per + model + max(SORT_SCRATCH * largest, CHUNK_SCRATCH * SCRATCH_CHUNK)


def host_path_bytes(numel: int, largest: int, k: int, sparsification: str | None,
                    model_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the host path holds, bytes of its optional rescale-norm tables) for ``numel`` parameters
    and ``k`` fine-tunes.

    Held: the float32 base, task vectors and output (4 + 4k + 4 per parameter; a 16-bit model's own
    parameters besides), the rule's statistics (TIES, breadcrumbs: ranks and sorted magnitudes, 8k;
    DARE: the fields, 4k; DELLA: row ranks, q and fields, 12k) and sort scratch for the largest
    tensor. Optional: for DARE and DELLA, the fields in ascending order with running float64 sums
    of |δ| (12k; DELLA with q and |δ| in that order, 20k), from which rescale norms are read off;
    without them each norm is summed over its tensor.
    """
    itemsize = torch.empty(0, dtype=model_dtype).element_size()
    per = 8 + 4 * k + (itemsize if itemsize != 4 else 0)
    optional = 0
    if sparsification in ("magnitude", "magnitude_outliers"):
        per += 8 * k
    elif sparsification == "random":
        per, optional = per + 4 * k, 12 * k
    elif sparsification == "della_magprune":
        per, optional = per + 12 * k, 20 * k
    return numel * per + 24 * largest, numel * optional
