"""The cpu backend's compiled pass for `evomerge merge`: one tensor of the task-arithmetic family at a time.

``evomerge merge`` streams a recipe tensor by tensor (``engine.run_merge``). For the
task-arithmetic family on the CPU each tensor goes through the same compiled pass as a search's
candidates (``cpu_kernel.merge_segments``, on a single segment): its inputs are read, their task
vectors δᵢ = xᵢ − base formed in float32 (the engine's ``torch.sub``), each input's mask rule and
constants filled by ``cpu_kernel.segment_tables`` (the search's own table arithmetic), the
statistics the rule reads computed for this tensor only, and the result returned for the engine
to cast and write; nothing is kept between tensors. Statistics per rule:

- TIES / breadcrumbs: each element's stable magnitude rank rounded to its window's ends, found in
  linear time (``window_host.window_ranks``; the search's builder sorts once for many candidates);
- DARE: the random fields (``fields_host.fill_uniform_range``, the same bits as ``fields.random_field``);
- DELLA: the fields and DELLA's rank term q from the row ranks (``sparsify.della_ranks``,
  ``cpu_kernel.della_q``).

The rescale norms are summed in ``l1.l1_norm``'s order (``l1_host``). The result is bit for bit the
reference kernels' (``task_arithmetic.generalized_task_arithmetic``; tests and
``benchmarks/golden.py`` compare them). float64 inputs and task vectors that overflow are left to
the reference kernels (``merge_tensor`` returns None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numba import njit

from evomerge.backends import cpu_kernel as fk
from evomerge.backends.fields_host import fill_uniform_range
from evomerge.backends.l1_host import l1_norm_host
from evomerge.backends.window_host import window_ranks
from evomerge.methods.consensus import weight_divisor
from evomerge.methods.fields import field_seed
from evomerge.methods.l1 import L1_BLOCK
from evomerge.methods.registry import MergeMethod
from evomerge.methods.sparsify import della_ranks, sorted_row_keys
from evomerge.methods.task_arithmetic import VARIANTS

# the value vector ``segment_tables`` reads: k weights, densities, gammas, epsilons, then normalize,
# rescale, lambda (a parameter the method lacks is never read: 0 stands in)
PER_MODEL = ("weight", "density", "gamma", "epsilon")
EMPTY32 = np.empty((0, 0), dtype=np.float32)


def merge_tensor(method: MergeMethod, name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 model_params: Sequence[Mapping[str, Any]], params: Mapping[str, Any], seed: int) -> torch.Tensor | None:
    """Tensor ``name`` merged by ``method`` (a task-arithmetic variant) on the CPU, in the base's dtype.

    ``tensors`` are the non-base inputs in recipe order with their ``model_params``, ``params`` the
    global values (a plan's ``TensorTask``), ``seed`` the random fields' seed. None when the
    reference kernels must do it (float64 inputs, task vectors that overflow float32).
    """
    variant = VARIANTS[method.name]
    if base.numel() == 0 or any(t.dtype == torch.float64 for t in (base, *tensors)):
        return None
    k, n, shape = len(tensors), base.numel(), base.shape
    base32 = base.to(torch.float32).reshape(-1)
    deltas = torch.empty((k, n), dtype=torch.float32)
    D = deltas.numpy()
    for i, x in enumerate(tensors):  # δ = x − base in float32: x cast exactly, then the engine's subtraction
        deltas[i].copy_(x.reshape(-1))
        if not subtract_finite(D[i], base32.numpy()):  # finite inputs whose difference overflows float32
            return None
    models, glob = method.resolve(model_params, params)
    tables, seg_k, use_total, total = _tables(variant.sparsification, models, glob, n, shape, consensus=variant.consensus)
    mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = tables
    rule = fk.KEEP_RULE[variant.sparsification]
    R, Q, F = np.empty((0, 0), dtype=np.int32), D, EMPTY32
    if rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE) and (mode[0] == fk.MODE_RANKS).any():
        R = np.zeros((k, n), dtype=np.int32)  # a rank stand-in per input (``window_ranks``); 0s keep all
        for i in np.flatnonzero(mode[0] == fk.MODE_RANKS):
            window_ranks(D[i], int(lo[0, i]), int(hi[0, i]), R[i])
    if rule in (fk.RULE_FIELD, fk.RULE_DELLA) and (mode[0] >= fk.MODE_FIELD).any():
        F = np.empty((k, n), dtype=np.float32)
        for i in range(k):
            fill_uniform_range(np.uint64(field_seed(seed, name, i)), F[i], 0, n)  # this thread (``run_merge``'s)
    if rule == fk.RULE_DELLA and (mode[0] == fk.MODE_DELLA).any():
        R = Q = np.zeros((k, n), dtype=np.float32)
        for i in np.flatnonzero(mode[0] == fk.MODE_DELLA):
            della_rank_terms(deltas[i].view(shape), Q[i])
    before = np.ones((1, k), dtype=np.float32)
    if rescale[0]:
        for i in range(k):
            before[0, i] = l1_norm_host(D[i])
    out = np.empty(n, dtype=np.float32)
    blocks = np.array([(0, x, min(n, x + L1_BLOCK)) for x in range(0, n, L1_BLOCK)], dtype=np.int64).reshape(-1, 3)
    seg_blocks = np.array([[0, len(blocks)]], dtype=np.int64)
    slot_model = np.arange(k, dtype=np.int64).reshape(1, k)
    fk.merge_segments(rule, D, R, Q, F, EMPTY32, np.empty((0, 0, 0), dtype=np.float32),
                      np.empty((0, 0), dtype=np.float64), np.empty((0, 0, 0), dtype=np.int64),
                      np.empty((0, 0, 0, 2), dtype=np.float32), base32.numpy(), out, blocks, seg_blocks, slot_model,
                      mode, lo, hi, thr, dme, eps, seg_k, weight, rescale, before, variant.consensus, normalize,
                      use_total, total, use_lambda, lam, 0, 1)
    return torch.from_numpy(out).view(shape).to(base.dtype)


def _tables(sparsification: str | None, models: list[dict], glob: dict, n: int, shape, *, consensus: bool):
    """The one-segment tables of ``cpu_kernel.segment_tables`` for these resolved parameter values, and Σw."""
    k = len(models)
    values = [float(m.get(p, 0.0)) for p in PER_MODEL for m in models]
    vector = np.array([*values, float(glob["normalize"]), float(glob["rescale"]), float(glob["lambda"])],
                      dtype=np.float64)
    per_model = [np.arange(j * k, (j + 1) * k, dtype=np.int64).reshape(1, k) for j in range(len(PER_MODEL))]
    flags = [np.array([len(values) + j], dtype=np.int64) for j in range(3)]
    seg_k = np.array([k], dtype=np.int64)
    row = shape[1] if len(shape) >= 2 else n
    two = (1, k)
    tables = (np.zeros(two, dtype=np.int8), np.zeros(two, dtype=np.int32), np.zeros(two, dtype=np.int32),
              *(np.zeros(two, dtype=np.float32) for _ in range(4)), *(np.zeros(1, dtype=np.bool_) for _ in range(3)),
              np.zeros(1, dtype=np.float32))
    fk.segment_tables(fk.SPARSIFICATION[sparsification], vector, *per_model, *flags, seg_k,
                      np.array([n], dtype=np.int64), np.array([row], dtype=np.int64), *tables)
    use_total, total = np.zeros(1, dtype=np.bool_), np.ones(1, dtype=np.float32)
    weight, normalize = tables[6], tables[7]
    if not consensus and normalize[0]:
        divisor = weight_divisor(weight[0].tolist())
        if divisor is not None:
            use_total[0], total[0] = True, np.float32(divisor.item())
    return tables, seg_k, use_total, total


@njit(cache=True, nogil=True)
def subtract_finite(delta, base):
    """delta −= base in place (float32: ``generalized_task_arithmetic``'s ``torch.sub``); whether every result
    is finite."""
    finite = True
    for j in range(delta.shape[0]):
        v = delta[j] - base[j]
        delta[j] = v
        finite &= v - v == 0
    return finite


ROWS_ELEMENTS = 1 << 20  # DELLA's row ranks are sorted about this many elements at a time (bounded scratch)


def della_rank_terms(delta: torch.Tensor, q: np.ndarray) -> None:
    """q = DELLA's rank term (r/(n−1))·2 of every element of δ (flat, float32, ``cpu_kernel.della_q``'s
    operations), r its stable rank of |δ| in its row (``sparsify.della_ranks``), a block of rows at a time."""
    if delta.dim() != 2:  # 1-D: one row; more dimensions: ranks along dim 1, whole
        row = delta.shape[1] if delta.dim() > 2 else delta.numel()
        ranks = della_ranks(delta).reshape(1, -1).numpy()
        q[:] = fk.della_q(ranks, [(0, q.shape[0])], np.array([row], dtype=np.int64))[0]
        return
    rows, row = delta.shape
    step = max(1, ROWS_ELEMENTS // max(row, 1))
    flat = delta.numpy()
    for r0 in range(0, rows, step):
        keys = sorted_row_keys(np.abs(flat[r0:r0 + step]))
        _scatter_rank_terms(keys, q[r0 * row:(r0 + keys.shape[0]) * row])


@njit(cache=True, nogil=True)
def _scatter_rank_terms(keys, q):
    """q[row, column] = (r/(n−1))·2 in float32 for each row's ascending keys (``sorted_row_keys``), r the
    key's position: ``della_ranks`` scattered and ``della_q`` applied in one pass (q = 0 in one-element rows)."""
    rows, n = keys.shape
    if n < 2:
        q[:] = 0
        return
    last, two = np.float32(n - 1), np.float32(2.0)
    for r in range(rows):
        for p in range(n):
            q[r * n + (keys[r, p] & 0xFFFFFFFF)] = (np.float32(p) / last) * two
