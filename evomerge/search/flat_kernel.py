"""One compiled host pass that merges a whole candidate of the task-arithmetic family.

The candidate builder keeps every tensor of a model in one flat float32 buffer (task vectors
``D[model]``, their precomputed ranks ``R[model]``, the random fields ``F[slot]``, the base, and
the live model's parameters ``out``), one *segment* per tensor. A candidate is then a table of
per-segment, per-input values (weight, mask rule) and one compiled loop over the segments
(``merge_segments``; several threads take contiguous runs of segments on large models). Per
segment, in cache-sized blocks:

1. ‖m⊙δ‖₁ of every masked input of a rescaled segment, summed with
   ``lane_sum``, exactly as ``evomerge.methods.l1.l1_norm`` sums a tensor;
2. per element, the same float32 operations, in the same order, as the engine's ``sparsify`` →
   ``apply_mask`` → ``_mix_chunk`` (weight, sign election, disjoint merge or sum, normalize,
   lambda, + base), so the result is bit-identical to ``evomerge merge``; the segment's blocks
   are read a second time while they are still in cache.

Mask rules (``MODE_*``) per segment and input: keep all (density ≥ 1, no sparsifier), keep none,
keep a window [lo, hi) of stable magnitude ranks (TIES, breadcrumbs), keep where the random field
is below a threshold (DARE; DELLA on one-element rows), keep where the field is below DELLA's
rank-dependent probability p = (density − ε) + (r/(n−1))·2·ε.

The floor of a candidate (``floor_segments``) is the same block loop reading every task vector once
and writing base + Σδ: the least a candidate build can do with these buffers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from evomerge.methods.l1_host import lane_sum

from evomerge.methods.sparsify import L1_EPS

MODE_ALL, MODE_NONE, MODE_RANKS, MODE_FIELD, MODE_DELLA = 0, 1, 2, 3, 4
ONE = np.float32(1.0)
L1_EPS32 = np.float32(L1_EPS)
ZERO = np.float32(0.0)
TWO = np.float32(2.0)


@njit(cache=True, nogil=True, inline="always")
def _store(dst, S, j, v, acc, first):
    """dst[j] = v and, when ``acc``, the running input sum S[j] = v (first input) or S[j] + v."""
    dst[j] = v
    if acc:
        S[j] = v if first else S[j] + v


@njit(cache=True, nogil=True)
def _masked(dst, delta, md, lo, hi, thr, dme, eps, rowm1, ranks, field, sc, w, S, acc, first):
    """dst = ((δ·keep)·sc)·w for one block, each a float32 multiplication as in the engine.

    keep is 1 or 0 (so a dropped element keeps its sign of zero); sc is the rescale factor, or 1
    when the input is not rescaled, and w its weight: multiplying by 1 changes no bit. With
    ``acc``, also adds dst into the inputs' running sum S (in input order; ``first`` starts it).
    ``ranks`` / ``field`` are the block's slices of the input's rank buffer and random field;
    only the rule's own buffer is read (the other may be empty).
    """
    m = delta.shape[0]
    if md == MODE_ALL:
        for j in range(m):
            _store(dst, S, j, (delta[j] * sc) * w, acc, first)
    elif md == MODE_NONE:
        for j in range(m):
            _store(dst, S, j, ((delta[j] * ZERO) * sc) * w, acc, first)
    elif md == MODE_RANKS:
        for j in range(m):
            r = ranks[j]
            _store(dst, S, j, ((delta[j] * (ONE if (r >= lo) & (r < hi) else ZERO)) * sc) * w, acc, first)
    elif md == MODE_FIELD:
        for j in range(m):
            _store(dst, S, j, ((delta[j] * (ONE if field[j] < thr else ZERO)) * sc) * w, acc, first)
    else:  # DELLA, with torch's float32 ops: (density − ε) + ((r/(n−1))·2)·ε
        for j in range(m):
            p = dme + ((np.float32(ranks[j]) / rowm1) * TWO) * eps
            _store(dst, S, j, ((delta[j] * (ONE if field[j] < p else ZERO)) * sc) * w, acc, first)


@njit(cache=True, nogil=True)
def _views(D, R, F, mi, i, start, end):
    """The block [start, end) of input i's task vector (model mi), rank buffer and field (empty if absent)."""
    ranks = R[mi, start:end] if R.shape[0] else R.ravel()
    field = F[i, start:end] if F.shape[0] else F.ravel()
    return D[mi, start:end], ranks, field


@njit(cache=True, nogil=True)
def _rescale_factor(D, R, F, blocks, b0, b1, mi, i, md, lo, hi, thr, dme, eps, rowm1, before, scratch):
    """‖δ‖₁/‖m⊙δ‖₁ of one input over its segment's blocks [b0, b1), or 1 when either norm is < 1e-7.

    ‖m⊙δ‖₁ is summed exactly as ``l1_norm`` sums a tensor (``lane_sum`` per block, blocks added in
    order from 0.0, rounded once to float32), ``before`` is ``l1_norm(δ)``; the comparison and the
    division are float32, as ``apply_mask`` does them on 0-d float32 tensors.
    """
    total = 0.0
    for b in range(b0, b1):
        start, end = blocks[b, 1], blocks[b, 2]
        masked = scratch[: end - start]
        delta, ranks, field = _views(D, R, F, mi, i, start, end)
        _masked(masked, delta, md, lo, hi, thr, dme, eps, rowm1, ranks, field, ONE, ONE, masked, False, True)
        total += lane_sum(masked, end - start)  # |δ| where kept, ±0 where dropped
    after = np.float32(total)
    if before < L1_EPS32 or after < L1_EPS32:
        return ONE
    return before / after


@njit(cache=True, nogil=True)
def merge_segments(D, R, F, base, out, blocks, seg_blocks, slot_model, mode, lo, hi, thr, dme, eps, rowm1, seg_k,
                   weight, rescale, before, consensus, normalize, use_total, total, use_lambda, lam, s0, s1):
    """out = base + λ·mix(wᵢ·sparsify(δᵢ)) for merged segments [s0, s1) (seg_k ≥ 0), one segment at a time.

    A rescaled segment's L1 norms are summed first and its blocks merged right after, while its
    buffers are still in cache. Per element and input: v = δ·keep (float32 × 1 or 0), v·scale
    when rescaled, v·w; then the sum over inputs in order, the elected sign s, Σ max(s·vᵢ, 0)·s
    divided by the agreeing weights (consensus), or the plain sum divided by Σw (normalize); ×λ;
    + base.
    """
    k_max = slot_model.shape[1]
    sc = np.empty(k_max, dtype=np.float32)
    block = 0
    for b in range(blocks.shape[0]):
        block = max(block, blocks[b, 2] - blocks[b, 1])
    W = np.empty((k_max, block), dtype=np.float32)  # scratch, reused by every block
    scratch = np.empty((4, block), dtype=np.float32)
    for s in range(s0, s1):
        k = seg_k[s]
        if k < 0:
            continue
        b0, b1 = seg_blocks[s, 0], seg_blocks[s, 1]
        for i in range(k):
            sc[i] = ONE
            if rescale[s] and mode[s, i] >= MODE_RANKS:
                sc[i] = _rescale_factor(D, R, F, blocks, b0, b1, slot_model[s, i], i, mode[s, i], lo[s, i],
                                        hi[s, i], thr[s, i], dme[s, i], eps[s, i], rowm1[s], before[s, slot_model[s, i]],
                                        scratch[0])
        for b in range(b0, b1):
            _merge_block(D, R, F, base, out, blocks[b, 1], blocks[b, 2], s, k, slot_model, mode, lo, hi, thr, dme,
                         eps, rowm1, weight, sc, consensus, normalize, use_total, total, use_lambda, lam, W, scratch)


@njit(cache=True, nogil=True)
def _merge_block(D, R, F, base, out, start, end, s, k, slot_model, mode, lo, hi, thr, dme, eps, rowm1,
                 weight, sc, consensus, normalize, use_total, total, use_lambda, lam, W, scratch):
    """One block of segment s with k inputs (``merge_segments``); W and scratch are reusable buffers."""
    m = end - start
    dst = out[start:end]
    bas = base[start:end]
    if k == 0:
        for j in range(m):
            dst[j] = bas[j]
        return
    S = scratch[0, :m]
    for i in range(k):  # W[i] = wᵢ·sparsify(δᵢ); S = Σᵢ W[i] in input order
        row = W[i, :m] if consensus else scratch[1, :m]
        delta, ranks, field = _views(D, R, F, slot_model[s, i], i, start, end)
        _masked(row, delta, mode[s, i], lo[s, i], hi[s, i], thr[s, i], dme[s, i], eps[s, i], rowm1[s],
                ranks, field, sc[i], weight[s, i], S, True, i == 0)
    if consensus and k <= 4:  # the same, for up to four inputs in one pass (padding rows add +0)
        _consensus4(W, m, k, weight[s], S, normalize[s])
    elif consensus:  # Σ over inputs agreeing with the elected sign, done as s·Σ max(s·W[i], 0)
        unit, mixed, divisor = scratch[1, :m], scratch[2, :m], scratch[3, :m]
        for j in range(m):
            unit[j] = ONE if S[j] >= ZERO else -ONE
            mixed[j] = ZERO
            divisor[j] = ZERO
        for i in range(k):
            row = W[i, :m]
            w = weight[s, i]
            for j in range(m):
                agreeing = row[j] * unit[j]
                agreeing = agreeing if agreeing > ZERO else ZERO
                mixed[j] = mixed[j] + agreeing
                divisor[j] = divisor[j] + (w if agreeing > ZERO else ZERO)
        for j in range(m):
            S[j] = mixed[j] * unit[j]
        if normalize[s]:
            for j in range(m):
                d = divisor[j]
                S[j] = S[j] / (ONE if d == ZERO else d)
    elif normalize[s] and use_total[s]:
        tot = total[s]
        for j in range(m):
            S[j] = S[j] / tot
    if use_lambda[s]:
        lm = lam[s]
        for j in range(m):
            S[j] = S[j] * lm
    for j in range(m):
        dst[j] = bas[j] + S[j]


@njit(cache=True, nogil=True)
def _consensus4(W, m, k, weights, S, normalize):
    """S[:m] = s·Σᵢ max(s·W[i], 0) (÷ the agreeing weights when ``normalize``), s the sign of S, in one pass.

    Up to four inputs; missing ones are rows of zeros with weight 0, which add +0 to both sums
    and so change no bit. Same operations, in the same order, as the general loop below.
    """
    r0 = W[0, :m]
    r1 = W[1, :m] if k > 1 else W[0, :m]
    r2 = W[2, :m] if k > 2 else W[0, :m]
    r3 = W[3, :m] if k > 3 else W[0, :m]
    w0 = weights[0]
    w1 = weights[1] if k > 1 else ZERO
    w2 = weights[2] if k > 2 else ZERO
    w3 = weights[3] if k > 3 else ZERO
    f1 = ONE if k > 1 else ZERO  # multiplies a stand-in row to +-0, which max(., 0) turns into +0
    f2 = ONE if k > 2 else ZERO
    f3 = ONE if k > 3 else ZERO
    for j in range(m):
        u = ONE if S[j] >= ZERO else -ONE
        a0 = r0[j] * u
        a0 = a0 if a0 > ZERO else ZERO
        a1 = (r1[j] * f1) * u
        a1 = a1 if a1 > ZERO else ZERO
        a2 = (r2[j] * f2) * u
        a2 = a2 if a2 > ZERO else ZERO
        a3 = (r3[j] * f3) * u
        a3 = a3 if a3 > ZERO else ZERO
        mixed = (((ZERO + a0) + a1) + a2) + a3
        v = mixed * u
        if normalize:
            d = (((ZERO + (w0 if a0 > ZERO else ZERO)) + (w1 if a1 > ZERO else ZERO))
                 + (w2 if a2 > ZERO else ZERO)) + (w3 if a3 > ZERO else ZERO)
            v = v / (ONE if d == ZERO else d)
        S[j] = v


@njit(cache=True, nogil=True)
def floor_segments(D, base, out, blocks, seg_blocks, s0, s1):
    """out = base + Σ D[model] over segments [s0, s1), block by block: one read of every buffer, one write."""
    for b in range(seg_blocks[s0, 0], seg_blocks[s1 - 1, 1] if s1 > s0 else 0):
        start, end = blocks[b, 1], blocks[b, 2]
        dst = out[start:end]
        bas = base[start:end]
        for j in range(end - start):
            dst[j] = bas[j]
        for mi in range(D.shape[0]):
            delta = D[mi, start:end]
            for j in range(end - start):
                dst[j] = dst[j] + delta[j]


class SegmentRunner:
    """Runs a ``*_segments`` kernel over all segments, split by element count over ``threads`` threads.

    The kernels release the GIL; each thread takes a contiguous run of whole segments, so results
    do not depend on the split. Small models run on the calling thread (the hand-off costs more
    than it saves).
    """

    MIN_ELEMENTS_PER_THREAD = 1 << 17

    def __init__(self, numel: np.ndarray, threads: int):
        total = int(numel.sum())
        threads = max(1, min(threads, total // self.MIN_ELEMENTS_PER_THREAD, len(numel)))
        cumulative = np.cumsum(numel)
        cuts = sorted({int(np.searchsorted(cumulative, total * t / threads)) + 1 for t in range(1, threads)})
        self.bounds = [0, *[c for c in cuts if 0 < c < len(numel)], len(numel)]
        self.pool = ThreadPoolExecutor(len(self.bounds) - 2) if len(self.bounds) > 2 else None

    def __call__(self, kernel, *args) -> None:
        b = self.bounds
        futures = [self.pool.submit(kernel, *args, b[t], b[t + 1]) for t in range(1, len(b) - 1)]
        kernel(*args, b[0], b[1])
        for f in futures:
            f.result()
