"""The cpu backend's compiled pass for `evomerge merge`: one tensor of the task-arithmetic family at a time.

``evomerge merge`` streams a recipe tensor by tensor (``engine.run_merge``). For the
task-arithmetic family on the CPU each tensor goes through the same compiled pass as a search's
candidates (``cpu_kernel.merge_segments``, on a single segment): its inputs are read, their task
vectors δᵢ = xᵢ − base formed in float32 (the engine's ``torch.sub``), each input's mask rule and
constants filled by ``cpu_kernel.segment_tables`` (the search's own table arithmetic), the
statistics the rule reads computed for this tensor only, and the result returned for the engine
to cast and write. A ``StreamKernel`` (one per merge) keeps each thread's float32 buffers from tensor to
tensor: fresh memory costs a page fault per page on first touch, more than the arithmetic on it.
Statistics per rule:

- TIES / breadcrumbs: each element's stable magnitude rank rounded to its window's ends, found in
  linear time (``window_host.window_ranks``; the search's builder sorts once for many candidates);
- DARE: the random fields (``fields_host.fill_uniform_range``, the same bits as ``fields.random_field``);
- DELLA: the fields, then each input's mask written over its field as 0s (keep) and 1s
  (``della_mask_as_field``: a sort of each row's |δ| for the ranks, then ``keep_della``), which the DARE
  rule reads; no buffer of ranks or rank terms.

The rescale norms are summed in ``l1.l1_norm``'s order (``l1_host``). The result is bit for bit the
reference kernels' (``task_arithmetic.generalized_task_arithmetic``; tests and
``benchmarks/golden.py`` compare them). float64 inputs and task vectors that overflow are left to
the reference kernels (``merge_tensor`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import threading

import numpy as np
import torch
from numba import njit

from evomerge.backends import cpu_kernel as fk
from evomerge.backends.fields_host import fill_uniform_range
from evomerge.backends.l1_host import lane_sum
from evomerge.backends.window_host import window_ranks
from evomerge.methods.consensus import weight_divisor
from evomerge.methods.fields import field_seed
from evomerge.methods.l1 import L1_BLOCK
from evomerge.methods.registry import MergeMethod
from evomerge.methods.sparsify import della_ranks
from evomerge.methods.task_arithmetic import VARIANTS

# the value vector ``segment_tables`` reads: k weights, densities, gammas, epsilons, then normalize,
# rescale, lambda (a parameter the method lacks is never read: 0 stands in)
PER_MODEL = ("weight", "density", "gamma", "epsilon")
EMPTY32 = np.empty((0, 0), dtype=np.float32)
EMPTY_BF16 = np.empty(0, dtype=np.uint16)


class StreamKernel:
    """``merge_tensor`` with scratch buffers kept per thread from one tensor to the next, for one merge
    (``backends.tensor_kernel`` makes one per ``evomerge merge``; the buffers go with it)."""

    def __init__(self):
        self.local = threading.local()

    def scratch(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """This thread's buffer ``name`` as an uninitialized array of ``shape``, grown when too small."""
        buffers = self.local.__dict__
        need = int(np.prod(shape))
        buffer = buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < need:
            buffers[name] = buffer = None  # free the old one first
            buffers[name] = buffer = host_array((need,), dtype)
        return buffer[:need].reshape(shape)

    def __call__(self, method: MergeMethod, name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 model_params: Sequence[Mapping[str, Any]], params: Mapping[str, Any], seed: int) -> torch.Tensor | None:
        return merge_tensor(method, name, base, tensors, model_params, params, seed, scratch=self.scratch)


def fresh(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A new uninitialized array (``merge_tensor``'s scratch when no ``StreamKernel`` keeps buffers)."""
    return host_array(shape, dtype)


def host_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized NumPy array in torch's allocator. NumPy asks the kernel for transparent huge pages
    for arrays of 4 MiB and more, and on some VMs their first touch is many times slower than small
    pages' (results/bench/merge_speed.md); torch does not ask."""
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype).numpy()


def merge_tensor(method: MergeMethod, name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 model_params: Sequence[Mapping[str, Any]], params: Mapping[str, Any], seed: int,
                 scratch: Callable[[str, tuple[int, ...], Any], np.ndarray] = fresh) -> torch.Tensor | None:
    """Tensor ``name`` merged by ``method`` (a task-arithmetic variant) on the CPU, in the base's dtype.

    ``tensors`` are the non-base inputs in recipe order with their ``model_params``, ``params`` the
    global values (a plan's ``TensorTask``), ``seed`` the random fields' seed, ``scratch(name, shape,
    dtype)`` where the float32 working buffers come from. None when the reference kernels must do it
    (float64 inputs, task vectors that overflow float32).
    """
    variant = VARIANTS[method.name]
    if base.numel() == 0 or any(t.dtype == torch.float64 for t in (base, *tensors)):
        return None
    k, n, shape = len(tensors), base.numel(), base.shape
    models, glob = method.resolve(model_params, params)
    tables, seg_k, use_total, total = _tables(variant.sparsification, models, glob, n, shape, consensus=variant.consensus)
    mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = tables
    base32 = torch.from_numpy(scratch("base", (n,), np.float32))
    base32.copy_(base.reshape(-1))
    D = scratch("deltas", (k, n), np.float32)
    before = np.ones((1, k), dtype=np.float32)
    for i, x in enumerate(tensors):  # δ = x − base in float32 (x cast exactly), with ‖δ‖₁ where rescaled
        bf16 = EMPTY_BF16
        if x.dtype == torch.bfloat16:
            bf16 = x.reshape(-1).view(torch.int16).numpy().view(np.uint16)
        else:
            torch.from_numpy(D[i]).copy_(x.reshape(-1))
        finite, before[0, i] = task_vector(bf16, base32.numpy(), D[i], D[i].view(np.uint32), rescale[0])
        if not finite:  # finite inputs whose difference overflows float32
            return None
    rule = fk.KEEP_RULE[variant.sparsification]
    R, Q, F = np.empty((0, 0), dtype=np.int32), D, EMPTY32
    if rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE) and (mode[0] == fk.MODE_RANKS).any():
        R = scratch("ranks", (k, n), np.int32)  # a rank stand-in per input (``window_ranks``); 0s keep all
        R.fill(0)
        for i in np.flatnonzero(mode[0] == fk.MODE_RANKS):
            window_ranks(D[i], int(lo[0, i]), int(hi[0, i]), R[i])
    if rule in (fk.RULE_FIELD, fk.RULE_DELLA) and (mode[0] >= fk.MODE_FIELD).any():
        F = scratch("fields", (k, n), np.float32)
        for i in range(k):
            fill_uniform_range(np.uint64(field_seed(seed, name, i)), F[i], 0, n)  # this thread (``run_merge``'s)
    if rule == fk.RULE_DELLA:  # DELLA's masks written into the fields, for the DARE rule to read
        for i in np.flatnonzero(mode[0] == fk.MODE_DELLA):
            della_mask_as_field(torch.from_numpy(D[i]).view(shape), F[i], dme[0, i], eps[0, i])
            mode[0, i], thr[0, i] = fk.MODE_FIELD, KEEP_BELOW
        rule = fk.RULE_FIELD
    out = base32.numpy()  # merged over the base: ``merge_segments`` reads element j's base only to write out[j]
    blocks = np.array([(0, x, min(n, x + L1_BLOCK)) for x in range(0, n, L1_BLOCK)], dtype=np.int64).reshape(-1, 3)
    seg_blocks = np.array([[0, len(blocks)]], dtype=np.int64)
    slot_model = np.arange(k, dtype=np.int64).reshape(1, k)
    fk.merge_segments(rule, D, R, Q, F, EMPTY32, np.empty((0, 0, 0), dtype=np.float32),
                      np.empty((0, 0), dtype=np.float64), np.empty((0, 0, 0), dtype=np.int64),
                      np.empty((0, 0, 0, 2), dtype=np.float32), base32.numpy(), out, blocks, seg_blocks, slot_model,
                      mode, lo, hi, thr, dme, eps, seg_k, weight, rescale, before, variant.consensus, normalize,
                      use_total, total, use_lambda, lam, 0, 1)
    return torch.from_numpy(out).view(shape).to(base.dtype, copy=True)  # a copy: ``out`` is scratch


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
def task_vector(bf16, base, delta, bits, norm):
    """δ −= base in float32 (``generalized_task_arithmetic``'s ``torch.sub``) a block of ``L1_BLOCK`` at a
    time, δ holding x already, or (``bf16`` not empty) first filled from x's bfloat16 bits, widened exactly
    into δ's memory seen as uint32 (``bits``); with ``norm`` also ‖δ‖₁ in ``l1_norm``'s order
    (``l1_host.lane_sum`` per block, blocks added in order) while each block is in cache. Returns (every
    δ finite, ‖δ‖₁ or 1)."""
    n = delta.shape[0]
    finite = True
    total = 0.0
    for start in range(0, n, L1_BLOCK):
        end = min(n, start + L1_BLOCK)
        if bf16.shape[0]:
            for j in range(start, end):
                bits[j] = np.uint32(bf16[j]) << np.uint32(16)
        for j in range(start, end):
            v = delta[j] - base[j]
            delta[j] = v
            finite &= v - v == 0
        if norm:
            total += lane_sum(delta[start:end], end - start)
    return finite, np.float32(total) if norm else np.float32(1.0)


ROWS_ELEMENTS = 1 << 20  # DELLA's row ranks are sorted about this many elements at a time (bounded scratch)
KEEP_BELOW = np.float32(0.5)  # the threshold at which ``keep_field`` reads a mask written as a field of 0s and 1s


def della_mask_as_field(delta: torch.Tensor, field: np.ndarray, dme: np.float32, eps: np.float32) -> None:
    """field[j] = 0 where DELLA keeps element j of δ, else 1: ``cpu_kernel.keep_della``'s comparison
    field < (density − ε) + q·ε (``dme``, ``eps`` as ``segment_tables`` makes them) with q = (r/(n−1))·2
    and r the element's stable rank of |δ| in its row (``sparsify.della_ranks``), so that the DARE rule
    (``keep_field`` below ``KEEP_BELOW``) reads the same mask. 1-D and 2-D δ a block of rows at a time."""
    if delta.dim() > 2:  # ranks along dim 1: the reference's ranks, whole
        row = np.array([delta.shape[1]], dtype=np.int64)
        q = fk.della_q(della_ranks(delta).reshape(1, -1).numpy(), [(0, field.shape[0])], row)[0]
        _field_from_q(field, q, dme, eps)
        return
    rows, row = (1, delta.numel()) if delta.dim() < 2 else delta.shape
    step = max(1, ROWS_ELEMENTS // max(row, 1))
    bits = delta.reshape(-1).numpy().view(np.uint32)
    keys = host_array((min(step, rows), row), np.int64)
    for r0 in range(0, rows, step):
        block = keys[:min(step, rows - r0)]
        span = slice(r0 * row, (r0 + block.shape[0]) * row)
        _row_keys(bits[span], block)
        block.sort(axis=1)  # NumPy's sort, without the GIL
        _field_from_sorted(block, field[span], dme, eps)


@njit(cache=True, nogil=True)
def _row_keys(bits, keys):
    """keys[r, c] = bits(|δ|) << 32 | c for the float32 bits of δ's rows: ``sparsify.sorted_row_keys``'s keys."""
    rows, n = keys.shape
    for r in range(rows):
        for c in range(n):
            keys[r, c] = (np.int64(bits[r * n + c] & np.uint32(0x7FFFFFFF)) << 32) | c


@njit(cache=True, nogil=True)
def _field_from_sorted(keys, field, dme, eps):
    """``della_mask_as_field`` for rows whose keys are sorted: the key at position r has rank r (q = 0 in
    one-element rows, as ``della_q``)."""
    rows, n = keys.shape
    last = np.float32(max(n - 1, 1))  # a one-element row's only rank is 0, so q = 0 there
    for r in range(rows):
        for p in range(n):
            j = r * n + (keys[r, p] & 0xFFFFFFFF)
            q = (np.float32(p) / last) * fk.TWO
            field[j] = fk.ZERO if fk.keep_della(fk.ZERO, field[j], q, dme, eps) else fk.ONE


@njit(cache=True, nogil=True)
def _field_from_q(field, q, dme, eps):
    """``della_mask_as_field`` from DELLA's rank term q of every element."""
    for j in range(field.shape[0]):
        field[j] = fk.ZERO if fk.keep_della(fk.ZERO, field[j], q[j], dme, eps) else fk.ONE
