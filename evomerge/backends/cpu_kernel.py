"""One compiled host pass that merges a whole candidate of the task-arithmetic family.

The candidate builder keeps every tensor of a model in one flat float32 buffer (task vectors
``D[model]``, per-model statistics, the random fields ``F[slot]``, the base, and the live model's
parameters ``out``), one *segment* per tensor. A candidate is then a table of per-segment,
per-input values (weight, mask rule) and one compiled loop over the segments (``merge_segments``;
on larger models ``merge_parallel`` gives each of numba's threads a contiguous run of segments).
Per segment:

1. the rescale factor ‖δ‖₁/‖m⊙δ‖₁ of every masked input of a rescaled segment, its norm summed
   exactly as ``evomerge.methods.l1.l1_norm`` sums a tensor. For DARE and DELLA the norm is
   usually read off precomputed prefix sums in field order (``_prefix_l1``, ``_band_l1``: exact
   to the float32 bit, or declined), otherwise one pass over the segment;
2. a segment with one to four inputs whose masks are each one comparison per element (always for
   DARE and DELLA; for TIES/breadcrumbs unless equal magnitudes straddle a window bound) is merged
   in one vectorized pass (``_fused_segment``); any other block by block with the stable ranks
   (``_merge_block``).

Both paths run, per element, the same float32 operations in the same order as the engine's
``sparsify`` → ``apply_mask`` → ``_mix_chunk`` (mask, rescale, weight, sum in input order, sign
election, disjoint merge or sum, normalize, lambda, + base), so the result is bit-identical to
``evomerge merge`` (tests compare them).

Mask rules (``MODE_*``) per segment and input: keep all (density ≥ 1, no sparsifier), keep none,
keep a window [lo, hi) of stable magnitude ranks (TIES, breadcrumbs), keep where the random field
is below a threshold (DARE; DELLA on one-element rows), keep where the field is below DELLA's
rank-dependent probability p = (density − ε) + q·ε with q = (r/(n−1))·2 precomputed (``della_q``).

A candidate's per-segment tables (mask rules and their constants, weights, flags) come from its
value vector in one call (``segment_tables``).

The floor of a candidate (``floor_segments``) is the same block loop reading every task vector once
and writing base + Σδ: the least a candidate build can do with these buffers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from evomerge.backends.l1_host import lane_sum

from evomerge.methods.sparsify import L1_EPS

MODE_ALL, MODE_NONE, MODE_RANKS, MODE_FIELD, MODE_DELLA = 0, 1, 2, 3, 4
# a builder's mask family (``keep_*``): TIES's top-k (no upper bound), any magnitude window
# (breadcrumbs), DARE's field threshold, DELLA's rank-dependent threshold
RULE_MAGNITUDE, RULE_FIELD, RULE_DELLA, RULE_TOP = 0, 1, 2, 3
# the fused pass's own rule for a magnitude segment whose window bounds fall inside runs of equal |δ|:
# it compares the stable ranks themselves (``_rank_bounds``)
RULE_RANKS = 4
# a method's sparsification, for ``segment_tables``
SPARSIFICATION = {None: 0, "magnitude": 1, "magnitude_outliers": 2, "random": 3, "della_magprune": 4}
# each sparsification's mask family (no sparsifier: the field rule, whose comparisons then always keep)
KEEP_RULE = {None: RULE_FIELD, "magnitude": RULE_TOP, "magnitude_outliers": RULE_MAGNITUDE, "random": RULE_FIELD,
             "della_magprune": RULE_DELLA}
ONE = np.float32(1.0)
L1_EPS32 = np.float32(L1_EPS)
ZERO = np.float32(0.0)
NEG_ZERO = np.float32(-0.0)
TWO = np.float32(2.0)


@njit(cache=True, nogil=True)
def segment_tables(sparsification, vector, i_weight, i_density, i_gamma, i_epsilon, i_normalize, i_rescale,
                   i_lambda, seg_k, numel, row, mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda,
                   lam):
    """Fill one candidate's per-segment tables from its value vector (``PlanTemplate.vector``).

    ``i_*`` index the vector per segment and input slot ([segments, slots]) or per segment
    (normalize, rescale, lambda). Written: each input's mask rule ``mode`` (``MODE_*``) and its
    constants (``lo``, ``hi``, ``thr``, ``dme``, ``eps``), with the same integer arithmetic as
    ``magnitude_keep_count`` / ``breadcrumbs_window`` and the same float32 casts as ``dare_mask``
    / ``della_probability_table``; ``weight`` (0 beyond a segment's inputs); the flags; λ.
    """
    n_seg, slots = i_weight.shape
    for s in range(n_seg):
        normalize[s] = vector[i_normalize[s]] != 0
        rescale[s] = vector[i_rescale[s]] != 0
        lam64 = vector[i_lambda[s]]
        use_lambda[s], lam[s] = lam64 != 1, np.float32(lam64)
        n = numel[s]
        for i in range(slots):
            weight[s, i] = np.float32(vector[i_weight[s, i]]) if i < seg_k[s] else ZERO
            d = vector[i_density[s, i]]
            md, low, high, t, a, e32 = MODE_ALL, 0, 0, ZERO, ZERO, ZERO
            if sparsification == 0 or not d < 1:
                pass
            elif sparsification == 1 or sparsification == 2:
                if sparsification == 1:  # TIES: keep the top k = max(1, int(density·n))
                    low, high = n - max(1, int(d * n)), n
                    none = d <= 0 or n == 0
                else:  # breadcrumbs: [n_bot, n_bot + int(density·n)) after dropping int(gamma·n) outliers
                    target = int(d * n)
                    low = max(0, n - target - int(vector[i_gamma[s, i]] * n))
                    high = low + target
                    none = low >= high
                if none:
                    md = MODE_NONE
                elif not (low <= 0 and high >= n):
                    md = MODE_RANKS
            elif sparsification == 3:  # DARE
                md, t = MODE_FIELD, np.float32(d)
            else:  # DELLA; one-element rows keep with p = density
                e = vector[i_epsilon[s, i]]
                md = MODE_NONE if d <= 0 else (MODE_FIELD if row[s] < 2 else MODE_DELLA)
                t, a, e32 = np.float32(d), np.float32(d - e), np.float32(e)
            mode[s, i], lo[s, i], hi[s, i], thr[s, i], dme[s, i], eps[s, i] = md, low, high, t, a, e32


@njit(cache=True, nogil=True, inline="always")
def _store(dst, S, j, v, acc, first):
    """dst[j] = v and, when ``acc``, the running input sum S[j] = v (first input) or S[j] + v."""
    dst[j] = v
    if acc:
        S[j] = v if first else S[j] + v


@njit(cache=True, nogil=True)
def _masked(dst, delta, md, lo, hi, thr, dme, eps, ranks, field, sc, w, S, acc, first):
    """dst = ((δ·keep)·sc)·w for one block, each a float32 multiplication as in the engine.

    keep is 1 or 0 (so a dropped element keeps its sign of zero); sc is the rescale factor, or 1
    when the input is not rescaled, and w its weight: multiplying by 1 changes no bit. With
    ``acc``, also adds dst into the inputs' running sum S (in input order; ``first`` starts it).
    ``ranks`` / ``field`` are the block's slices of the input's statistic (stable ranks for the
    magnitude rules, DELLA's q for ``MODE_DELLA``) and random field; only the rule's own buffer is
    read (the other may be empty).
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
    else:  # DELLA, with torch's float32 ops: (density − ε) + q·ε, q = (r/(n−1))·2 precomputed (``della_q``)
        for j in range(m):
            p = dme + ranks[j] * eps
            _store(dst, S, j, ((delta[j] * (ONE if field[j] < p else ZERO)) * sc) * w, acc, first)


@njit(cache=True, nogil=True)
def _views(D, R, F, mi, i, start, end):
    """The block [start, end) of input i's task vector (model mi), rank buffer and field (empty if absent)."""
    ranks = R[mi, start:end] if R.shape[0] else R.ravel()
    field = F[i, start:end] if F.shape[0] else F.ravel()
    return D[mi, start:end], ranks, field


@njit(cache=True, nogil=True)
def _rescale_factor(D, R, F, blocks, b0, b1, mi, i, md, lo, hi, thr, dme, eps, before, scratch):
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
        _masked(masked, delta, md, lo, hi, thr, dme, eps, ranks, field, ONE, ONE, masked, False, True)
        total += lane_sum(masked, end - start)  # |δ| where kept, ±0 where dropped
    after = np.float32(total)
    if before < L1_EPS32 or after < L1_EPS32:
        return ONE
    return before / after


@njit(cache=True, nogil=True)
def merge_segments(rule, D, R, Q, F, SM, PF, PS, SB, SQ, base, out, blocks, seg_blocks, slot_model, mode, lo, hi, thr,
                   dme, eps, seg_k, weight, rescale, before, consensus, normalize, use_total, total, use_lambda, lam, s0, s1):
    """out = base + λ·mix(wᵢ·sparsify(δᵢ)) for merged segments [s0, s1) (seg_k ≥ 0), one segment at a time:
    ``methods.task_arithmetic.generalized_task_arithmetic`` per segment, bit for bit.

    Per segment: the rescale factors first (``_rescale_factors``), then the merge. A segment with
    one to four inputs whose masks are all a comparison per element (``_keep_bounds``) is merged by
    ``_fused_segment`` in one vectorized pass. So is a TIES/breadcrumbs segment whose window
    bounds fall inside runs of equal |δ| (common with bf16 models): its pass compares the stable
    ranks themselves (``RULE_RANKS``), and so is every magnitude segment when ``SM`` is empty (a
    one-tensor merge, ``cpu_stream``, gives ranks only). Any other segment goes by blocks (``_merge_block``). Returns
    the number of block-path segments plus 2³² times the number of segments fused by their ranks.
    ``rule`` is the builder's mask family (``RULE_TOP``, ``RULE_MAGNITUDE``, ``RULE_FIELD`` or ``RULE_DELLA``);
    ``R`` the per-model statistic of the block path (ranks; DELLA's q), ``Q`` DELLA's q for the
    fused pass (any float32 [models, n] stand-in, e.g. ``D``, for the other families), ``SM``
    the sorted magnitudes (magnitude family), ``PF``/``PS`` the fields in ascending order (with,
    for DELLA, q and |δ| in that order) and prefix sums of |δ| (``_prefix_l1``, ``_band_l1``), and
    for DELLA ``SB``/``SQ`` the bounds and q ranges of each segment's strata (``della_band_tables``);
    absent ones are empty.
    """
    k_max = slot_model.shape[1]
    sc = np.empty(k_max, dtype=np.float32)
    A = np.empty(4, dtype=np.float32)
    B = np.empty(4, dtype=np.float32)
    block = 0
    for b in range(blocks.shape[0]):
        block = max(block, blocks[b, 2] - blocks[b, 1])
    LA = np.empty(4, dtype=np.int64)
    LB = np.empty(4, dtype=np.int64)
    W = np.empty((k_max, block), dtype=np.float32)  # scratch, reused by every block
    scratch = np.empty((4, block), dtype=np.float32)
    blocked = by_rank = 0
    for s in range(s0, s1):
        k = seg_k[s]
        if k < 0:
            continue
        b0, b1 = seg_blocks[s, 0], seg_blocks[s, 1]
        start, end = blocks[b0, 1], blocks[b1 - 1, 2]
        magnitude = rule == RULE_MAGNITUDE or rule == RULE_TOP
        ranks_only = magnitude and SM.shape[0] == 0  # no sorted magnitudes: compare the ranks (``R``)
        fused = 0 < k <= 4 and not ranks_only and _keep_bounds(SM, start, end, s, k, slot_model, mode, lo, hi, thr,
                                                           dme, eps, A, B)
        if not fused and 0 < k <= 4 and R.shape[0] and magnitude:
            _rank_bounds(end - start, s, k, mode, lo, hi, LA, LB)  # ties at a bound: compare the ranks
            _rescale_factors(RULE_RANKS, True, LA, LB, D, R, Q, F, PF, PS, SB, SQ, blocks, b0, b1, s, k, slot_model,
                             mode, lo, hi, thr, dme, eps, rescale, before, sc, scratch[0])
            _fused_segment(RULE_RANKS, D, Q, R, True, base, out, start, end, s, k, slot_model, LA, LB, sc,
                           weight[s], consensus, normalize[s], use_total[s], total[s], use_lambda[s], lam[s])
            by_rank += 1
            continue
        _rescale_factors(rule, fused, A, B, D, R, Q, F, PF, PS, SB, SQ, blocks, b0, b1, s, k, slot_model, mode, lo, hi,
                         thr, dme, eps, rescale, before, sc, scratch[0])
        if fused:  # the fields, or δ as a stand-in where the rule reads none
            _fused_segment(rule, D, Q, F if F.shape[0] else D, F.shape[0] == 0, base, out, start, end, s, k,
                           slot_model, A, B, sc, weight[s], consensus, normalize[s], use_total[s], total[s],
                           use_lambda[s], lam[s])
            continue
        blocked += 1
        for b in range(b0, b1):
            _merge_block(D, R, F, base, out, blocks[b, 1], blocks[b, 2], s, k, slot_model, mode, lo, hi, thr, dme,
                         eps, weight, sc, consensus, normalize, use_total, total, use_lambda, lam, W, scratch)
    return blocked + (by_rank << 32)


@njit(cache=True, nogil=True)
def _rescale_factors(rule, fused, A, B, D, R, Q, F, PF, PS, SB, SQ, blocks, b0, b1, s, k, slot_model, mode, lo, hi,
                     thr, dme, eps, rescale, before, sc, scratch):
    """sc[i] = ‖δᵢ‖₁/‖mᵢ⊙δᵢ‖₁ for the inputs of segment s (1 where not rescaled), as ``apply_mask`` computes it.

    A DARE or DELLA mask's norm comes from the fields in ascending order and the prefix sums
    (``_prefix_l1``, ``_band_l1``) when they pin its float32 value down; otherwise from a pass
    over the segment: with the fused pass's comparisons when ``fused`` (``_masked_l1``), else
    rule by rule (``_rescale_factor``).
    """
    start, end = blocks[b0, 1], blocks[b1 - 1, 2]
    for i in range(k):
        sc[i] = ONE
        md = mode[s, i]
        if not rescale[s] or md < MODE_RANKS:
            continue
        mi = slot_model[s, i]
        after = np.float32(-1.0)
        if mi == i and PF.shape[1] > i and md == MODE_FIELD:
            after = _prefix_l1(PF[0, i, start:end], PS[i, start:end], thr[s, i])
        elif mi == i and PF.shape[1] > i and md == MODE_DELLA and PF.shape[0] == 3:
            after = _band_l1(PF[0, i, start:end], PF[1, i, start:end], PF[2, i, start:end], PS[i, start:end],
                             SB[i, s], SQ[i, s], dme[s, i], eps[s, i], scratch)
        if after < ZERO and fused:
            field = F[i] if F.shape[0] else D[mi]
            if rule == RULE_RANKS:
                after = _masked_l1_rank(D[mi], R[mi], Q[mi], A[i], B[i], blocks, b0, b1, scratch)
            elif rule == RULE_MAGNITUDE or rule == RULE_TOP:
                after = _masked_l1_magnitude(D[mi], field, Q[mi], A[i], B[i], blocks, b0, b1, scratch)
            elif rule == RULE_FIELD:
                after = _masked_l1_field(D[mi], field, Q[mi], A[i], B[i], blocks, b0, b1, scratch)
            else:
                after = _masked_l1_della(D[mi], field, Q[mi], A[i], B[i], blocks, b0, b1, scratch)
        if after < ZERO:
            sc[i] = _rescale_factor(D, R, F, blocks, b0, b1, mi, i, md, lo[s, i], hi[s, i], thr[s, i], dme[s, i],
                                    eps[s, i], before[s, mi], scratch)
        elif not (before[s, mi] < L1_EPS32 or after < L1_EPS32):
            sc[i] = before[s, mi] / after


@njit(inline="always")
def _masked_l1(keep, delta, field, q, a, b, blocks, b0, b1, scratch):
    """float32 ‖m⊙δ‖₁ over blocks [b0, b1) with m = keep(δ, field, q, a, b): ``l1_norm``'s order, one vectorized loop per block."""
    total = 0.0
    for blk in range(b0, b1):
        start, end = blocks[blk, 1], blocks[blk, 2]
        d, u, qq = delta[start:end], field[start:end], q[start:end]
        for j in range(end - start):
            x = d[j]
            scratch[j] = x * (ONE if keep(x, u[j], qq[j], a, b) else ZERO)
        total += lane_sum(scratch, end - start)
    return np.float32(total)


@njit(cache=True, nogil=True)
def _prefix_l1(sorted_field, prefix, thr):
    """float32 ‖m⊙δ‖₁ of a DARE mask (keep where field < thr), or −1 when it cannot be pinned down.

    ``sorted_field`` is the segment's field in ascending order and ``prefix`` the running float64
    sums of |δ| in that order, so the c kept elements sum to prefix[c − 1]. That sum and the
    engine's (another order) both lie within 2·γ_c of the exact one (γ_c ≤ c·2⁻⁵³, recursive
    summation of non-negative terms); if both ends of a 4·c·2⁻⁵³ interval round to the same float32,
    so does the engine's sum, bit for bit. Otherwise the caller sums the segment in the engine's order.
    """
    c = np.searchsorted(sorted_field, thr)  # elements with field < thr
    if c == 0:
        return ZERO
    approx = prefix[c - 1]
    err = 4.0 * c * 2.0 ** -53 * approx
    low, high = np.float32(approx - err), np.float32(approx + err)
    return low if low == high else np.float32(-1.0)


@njit(cache=True, nogil=True)
def _band_l1(sorted_field, q, mags, prefix, bounds, q_range, a, b, scratch):
    """float32 ‖m⊙δ‖₁ of a DELLA mask (keep where field < a + q·b), or −1 when it cannot be pinned down.

    The segment's elements come in strata of similar q (``della_band_tables``): ``bounds`` are
    the strata's [start, end) offsets and ``q_range`` their least and largest q. Within a stratum
    the elements are in ascending field order, with q and |δ| (``mags``) in the same order and
    ``prefix`` the running float64 sums of ``mags`` (restarting at each stratum). With b ≥ 0 the
    float32 p = a + q·b is monotone in q, so in a stratum every element with field below its
    least p is kept (a prefix sum) and every one at or above its largest p dropped; only the
    band between is tested, a ``scratch``-sized chunk at a time (kept |δ| or 0, summed by
    ``lane_sum``). The result is a summation tree over at most c (the elements below the strata's
    largest p) non-negative terms, within γ_c of the exact sum like the engine's, so
    ``_prefix_l1``'s error bound decides whether the float32 result is the engine's. One stratum
    spanning q ∈ [0, 2] tests the whole band a ≤ field < a + 2b.
    """
    if not (b >= ZERO and a == a):
        return np.float32(-1.0)
    total = 0.0
    terms = 0
    for g in range(q_range.shape[0]):
        s0, s1 = bounds[g], bounds[g + 1]
        if s0 == s1:
            continue
        field = sorted_field[s0:s1]
        kept = np.searchsorted(field, a + q_range[g, 0] * b)  # field < the least p: kept
        tested = _search_from(field, kept, a + q_range[g, 1] * b)  # field ≥ the largest p: dropped
        terms += tested
        if kept > 0:
            total += prefix[s0 + kept - 1]
        for start in range(s0 + kept, s0 + tested, scratch.shape[0]):
            m = min(scratch.shape[0], s0 + tested - start)
            u, qq, mg = sorted_field[start:start + m], q[start:start + m], mags[start:start + m]
            for j in range(m):
                scratch[j] = mg[j] if u[j] < a + qq[j] * b else ZERO
            total += lane_sum(scratch, m)
    if terms == 0:
        return ZERO
    err = 4.0 * terms * 2.0 ** -53 * total
    low, high = np.float32(total - err), np.float32(total + err)
    return low if low == high else np.float32(-1.0)


@njit(cache=True, nogil=True, inline="always")
def _search_from(values, start, x):
    """``np.searchsorted(values, x)`` for ascending ``values`` known to hold no element < x before
    ``start``: an exponential search from there (the band above ``start`` is short)."""
    step, low, high = 16, start, start
    while high < values.shape[0] and values[high] < x:
        low = high + 1
        high = min(values.shape[0], high + step)
        step *= 2
    return low + np.searchsorted(values[low:high], x)


def della_strata(numel: int) -> int:
    """How many q strata ``_band_l1`` splits a segment of ``numel`` elements into.

    Each stratum costs a few binary-search steps (~60 ns on a Zen 4 core) and the band tested
    in a segment holds about 2ε/G of its elements (~0.4 ns each), so about √(numel/700) strata
    balance the two at ε ≈ 0.1 (measured on the small zoo: 4 strata cost 0.55x of 1); 1 to 64.
    """
    return int(min(MAX_STRATA, max(1, round((numel / 700) ** 0.5))))


MAX_STRATA = 64


def della_band_tables(field: np.ndarray, q: np.ndarray, mags: np.ndarray, strata: int):
    """One segment's tables for ``_band_l1``: field, q and |δ| ordered by (q stratum, field), the
    running float64 sums of |δ| restarting at each stratum, the strata's bounds and (least, largest) q.

    Stratum g holds the elements with ⌊q·strata/2⌋ = g (q ∈ [0, 2]; the last also q = 2). Rows
    of n elements put about n/strata of their ranks in each stratum. Empty strata have equal bounds.
    """
    group = np.minimum((q.astype(np.float64) * (strata / 2.0)).astype(np.int64), strata - 1)
    order = np.lexsort((field, group))  # by stratum, then field (ties in flat-index order)
    bounds = np.searchsorted(group[order], np.arange(strata + 1)).astype(np.int64)
    sorted_mags = mags[order]
    prefix = np.empty(len(order), dtype=np.float64)
    q_range = np.zeros((strata, 2), dtype=np.float32)
    sorted_q = q[order]
    for g in range(strata):
        s0, s1 = bounds[g], bounds[g + 1]
        if s1 > s0:
            np.cumsum(sorted_mags[s0:s1].astype(np.float64), out=prefix[s0:s1])
            q_range[g] = sorted_q[s0:s1].min(), sorted_q[s0:s1].max()
    return field[order], sorted_q, sorted_mags, prefix, bounds, q_range


@njit(cache=True, nogil=True)
def _rank_bounds(n, s, k, mode, lo, hi, LA, LB):
    """Each input's window of stable ranks [LA, LB) for ``keep_rank``: [0, n) keeps all, [0, 0) none."""
    for i in range(k):
        md = mode[s, i]
        if md == MODE_RANKS:
            LA[i], LB[i] = max(lo[s, i], 0), min(hi[s, i], n)
        elif md == MODE_NONE:
            LA[i], LB[i] = 0, 0
        else:
            LA[i], LB[i] = 0, n


@njit(cache=True, nogil=True)
def _keep_bounds(SM, start, end, s, k, slot_model, mode, lo, hi, thr, dme, eps, A, B):
    """Each input's mask of segment s as a comparison per element (``keep_*``'s bounds A, B); False if impossible.

    Magnitude windows [lo, hi) of stable ranks become |δ| ≥ A and not |δ| ≥ B with A, B the
    magnitudes ranked lo and hi (``SM``: the segment's |δ| in ascending order); exact unless equal
    magnitudes straddle a bound (then the ranks decide, and the caller merges by blocks). The
    field rule is field < A; DELLA's is field < A + q·B. NaN bounds make a comparison false.
    """
    n = end - start
    for i in range(k):
        md = mode[s, i]
        if md == MODE_ALL:  # every rule keeps: |δ| ≥ −inf and not |δ| ≥ NaN; field < inf; field < inf + q·0
            A[i], B[i] = np.float32(np.inf), ZERO
            if SM.shape[0]:
                A[i], B[i] = np.float32(-np.inf), np.float32(np.nan)
        elif md == MODE_NONE:  # none keeps: |δ| ≥ NaN; field < −inf
            A[i], B[i] = np.float32(-np.inf), ZERO
            if SM.shape[0]:
                A[i], B[i] = np.float32(np.nan), np.float32(np.nan)
        elif md == MODE_RANKS:
            if not SM.shape[0]:
                return False
            mags = SM[slot_model[s, i], start:end]
            low, high = lo[s, i], hi[s, i]
            A[i] = np.float32(-np.inf) if low <= 0 else mags[low]
            B[i] = np.float32(np.nan) if high >= n else mags[high]
            if (low > 0 and mags[low - 1] == mags[low]) or (high < n and mags[high - 1] == mags[high]):
                return False
        elif md == MODE_FIELD:  # DARE, and DELLA on one-element rows (q = 0 there)
            A[i], B[i] = thr[s, i], ZERO
        else:
            A[i], B[i] = dme[s, i], eps[s, i]
    return True


@njit(inline="always")
def keep_magnitude(x, u, q, a, b):
    """TIES / breadcrumbs (``sparsify.magnitude_mask``, ``breadcrumbs_mask``): |δ| in [a, b) (``_keep_bounds``)."""
    m = abs(x)
    return (m >= a) & ~(m >= b)


@njit(inline="always")
def keep_top(x, u, q, a, b):
    """TIES (``sparsify.magnitude_mask``): |δ| ≥ a (its window has no upper bound: b is NaN)."""
    return abs(x) >= a


@njit(inline="always")
def keep_rank(x, u, q, a, b):
    """TIES / breadcrumbs by the stable rank itself (``sparsify.rank_window_mask``): u (the rank) in [a, b)
    (``_rank_bounds``)."""
    return (u >= a) & (u < b)


@njit(inline="always")
def keep_field(x, u, q, a, b):
    """DARE (``sparsify.dare_mask``): field < a."""
    return u < a


@njit(inline="always")
def keep_della(x, u, q, a, b):
    """DELLA (``sparsify.della_mask``): field < (density − ε) + q·ε, torch's float32 operations."""
    return u < a + q * b


@njit(cache=True, nogil=True)
def _fused_segment(rule, D, Q, U, by_model, base, out, start, end, s, k, slot_model, A, B, sc, w, consensus,
                   normalize, use_total, total, use_lambda, lam):
    """Segment s with 1-4 inputs in one pass per element: the same float32 operations as ``_merge_block``.

    vᵢ = ((δᵢ·keepᵢ)·scᵢ)·wᵢ; missing inputs are −0, which adds nothing (x + −0 = x, bit for bit)
    and agrees with no sign. Then the sum in input order, and either the elected sign's disjoint
    merge (÷ agreeing weights when normalizing) or the sum (÷ Σw when normalizing); ×λ; + base.
    Steps a candidate skips are done as ÷1 or ×1, which change no bit, so the loops have no
    branches and vectorize. ``U`` is the per-element statistic the rule reads besides δ and q: the
    fields (a row per input slot), the stable ranks (a row per model: ``by_model``) or a stand-in.
    """
    r1, r2, r3 = min(1, k - 1), min(2, k - 1), min(3, k - 1)  # missing inputs read input 0's buffers
    m0, m1, m2, m3 = slot_model[s, 0], slot_model[s, r1], slot_model[s, r2], slot_model[s, r3]
    d = (D[m0, start:end], D[m1, start:end], D[m2, start:end], D[m3, start:end])
    q = (Q[m0, start:end], Q[m1, start:end], Q[m2, start:end], Q[m3, start:end])
    i0, i1, i2, i3 = (m0, m1, m2, m3) if by_model else (0, r1, r2, r3)
    u = (U[i0, start:end], U[i1, start:end], U[i2, start:end], U[i3, start:end])
    c = (sc[0], sc[r1], sc[r2], sc[r3])
    ws = (w[0], w[r1], w[r2], w[r3])
    present = (True, k > 1, k > 2, k > 3)
    lm = lam if use_lambda else ONE
    bas, dst = base[start:end], out[start:end]
    tot = total if (normalize and use_total) else ONE
    if consensus:  # missing inputs weigh 0 (so agree with no sign); the divisor sums 0s when not normalizing
        ws = (w[0], w[1] if k > 1 else ZERO, w[2] if k > 2 else ZERO, w[3] if k > 3 else ZERO)
        wd = ws if normalize else (ZERO, ZERO, ZERO, ZERO)
    if consensus and rule == RULE_RANKS:
        _consensus_rank(d, u, q, A, B, c, ws, wd, lm, bas, dst)
    elif consensus and rule == RULE_TOP:
        _consensus_top(d, u, q, A, B, c, ws, wd, lm, bas, dst)
    elif consensus and rule == RULE_MAGNITUDE:
        _consensus_magnitude(d, u, q, A, B, c, ws, wd, lm, bas, dst)
    elif consensus and rule == RULE_FIELD:
        _consensus_field(d, u, q, A, B, c, ws, wd, lm, bas, dst)
    elif consensus:
        _consensus_della(d, u, q, A, B, c, ws, wd, lm, bas, dst)
    elif rule == RULE_RANKS:
        _sum_rank(d, u, q, A, B, c, ws, present, tot, lm, bas, dst)
    elif rule == RULE_MAGNITUDE or rule == RULE_TOP:  # (no variant sums top-k masks: the window loop serves)
        _sum_magnitude(d, u, q, A, B, c, ws, present, tot, lm, bas, dst)
    elif rule == RULE_FIELD:
        _sum_field(d, u, q, A, B, c, ws, present, tot, lm, bas, dst)
    else:
        _sum_della(d, u, q, A, B, c, ws, present, tot, lm, bas, dst)


@njit(inline="always")
def _inputs(keep, j, d, u, q, A, B, c, w, present):
    """v₀..v₃ of element j: ((δ·keep)·sc)·w, −0 for a missing input."""
    x = d[0][j]
    v0 = ((x * (ONE if keep(x, u[0][j], q[0][j], A[0], B[0]) else ZERO)) * c[0]) * w[0]
    x = d[1][j]
    v1 = ((x * (ONE if keep(x, u[1][j], q[1][j], A[1], B[1]) else ZERO)) * c[1]) * w[1]
    x = d[2][j]
    v2 = ((x * (ONE if keep(x, u[2][j], q[2][j], A[2], B[2]) else ZERO)) * c[2]) * w[2]
    x = d[3][j]
    v3 = ((x * (ONE if keep(x, u[3][j], q[3][j], A[3], B[3]) else ZERO)) * c[3]) * w[3]
    return (v0, v1 if present[1] else NEG_ZERO, v2 if present[2] else NEG_ZERO, v3 if present[3] else NEG_ZERO)


@njit(inline="always")
def _consensus_loop(keep, d, u, q, A, B, c, w, wd, lm, bas, dst):
    """TIES disjoint merge per element (``consensus.disjoint_merge``), bit for bit what ``_merge_block``
    computes, in fewer operations.

    vᵢ = (δᵢ·scᵢ)·wᵢ where kept, else 0; σ = sign(Σvᵢ) (+1 for ±0); m = the vᵢ with vᵢ·σ > 0 added
    in input order to σ·0; dd = their wdᵢ added to 0 (wd = w when normalizing, else 0s);
    out = base + (m ÷ (dd, or 1 when dd = 0))·λ.

    Why it equals ``_merge_block``'s σ·Σᵢ max(σ·((δᵢ·keepᵢ)·scᵢ)·wᵢ, 0) ÷ Σ agreeing wᵢ: a dropped
    input's value there is ±0, which can change neither σ (both zeros are ≥ 0) nor agree
    (σ·±0 > 0 is false), so 0 serves; the agreeing terms all have σ's sign and negation commutes
    with rounding, so summing them signed from σ·0 gives σ·(the sum of magnitudes from +0)
    exactly, zero included; the skipped +0 terms change neither sum (neither is ever −0 there).
    Missing inputs come with weight 0 (agree never). δ and sc are finite (the builder checks δ).
    """
    a0, a1, a2, a3 = A[0], A[1], A[2], A[3]
    b0, b1, b2, b3 = B[0], B[1], B[2], B[3]
    c0, c1, c2, c3 = c
    w0, w1, w2, w3 = w
    e0, e1, e2, e3 = wd
    d0, d1, d2, d3 = d
    u0, u1, u2, u3 = u
    q0, q1, q2, q3 = q
    for j in range(dst.shape[0]):
        x = d0[j]
        v0 = (x * c0) * w0 if keep(x, u0[j], q0[j], a0, b0) else ZERO
        x = d1[j]
        v1 = (x * c1) * w1 if keep(x, u1[j], q1[j], a1, b1) else ZERO
        x = d2[j]
        v2 = (x * c2) * w2 if keep(x, u2[j], q2[j], a2, b2) else ZERO
        x = d3[j]
        v3 = (x * c3) * w3 if keep(x, u3[j], q3[j], a3, b3) else ZERO
        S = ((v0 + v1) + v2) + v3
        sg = ONE if S >= ZERO else -ONE
        m = ZERO * sg
        dd = ZERO
        t = v0 * sg > ZERO
        m = m + v0 if t else m
        dd = dd + e0 if t else dd
        t = v1 * sg > ZERO
        m = m + v1 if t else m
        dd = dd + e1 if t else dd
        t = v2 * sg > ZERO
        m = m + v2 if t else m
        dd = dd + e2 if t else dd
        t = v3 * sg > ZERO
        m = m + v3 if t else m
        dd = dd + e3 if t else dd
        dst[j] = bas[j] + (m / (ONE if dd == ZERO else dd)) * lm


@njit(inline="always")
def _sum_loop(keep, d, u, q, A, B, c, w, present, tot, lm, bas, dst):
    """Weighted sum per element (``consensus.weighted_sum``): Σvᵢ in input order ÷ Σw (÷1 unless
    normalizing), ×λ, + base."""
    a, b = (A[0], A[1], A[2], A[3]), (B[0], B[1], B[2], B[3])
    for j in range(dst.shape[0]):
        v0, v1, v2, v3 = _inputs(keep, j, d, u, q, a, b, c, w, present)
        dst[j] = bas[j] + ((((v0 + v1) + v2) + v3) / tot) * lm


# One compiled copy of each loop per mask rule (the rule inlined, so the loop vectorizes); plain
# functions, not a rule passed as an argument, so that numba's on-disk cache can hold them.
@njit(cache=True, nogil=True)
def _consensus_top(d, u, q, A, B, c, w, wd, lm, bas, dst):
    """``consensus.disjoint_merge`` after TIES's top-k mask (``_consensus_loop``)."""
    _consensus_loop(keep_top, d, u, q, A, B, c, w, wd, lm, bas, dst)


@njit(cache=True, nogil=True)
def _consensus_magnitude(d, u, q, A, B, c, w, wd, lm, bas, dst):
    """``consensus.disjoint_merge`` after a magnitude window (``_consensus_loop``)."""
    _consensus_loop(keep_magnitude, d, u, q, A, B, c, w, wd, lm, bas, dst)


@njit(cache=True, nogil=True)
def _consensus_field(d, u, q, A, B, c, w, wd, lm, bas, dst):
    """``consensus.disjoint_merge`` after DARE's mask (``_consensus_loop``)."""
    _consensus_loop(keep_field, d, u, q, A, B, c, w, wd, lm, bas, dst)


@njit(cache=True, nogil=True)
def _consensus_rank(d, u, q, A, B, c, w, wd, lm, bas, dst):
    """``consensus.disjoint_merge`` after a window of stable ranks (``_consensus_loop``)."""
    _consensus_loop(keep_rank, d, u, q, A, B, c, w, wd, lm, bas, dst)


@njit(cache=True, nogil=True)
def _sum_rank(d, u, q, A, B, c, w, present, tot, lm, bas, dst):
    """``consensus.weighted_sum`` after a window of stable ranks (``_sum_loop``)."""
    _sum_loop(keep_rank, d, u, q, A, B, c, w, present, tot, lm, bas, dst)


@njit(cache=True, nogil=True)
def _consensus_della(d, u, q, A, B, c, w, wd, lm, bas, dst):
    """``consensus.disjoint_merge`` after DELLA's mask (``_consensus_loop``)."""
    _consensus_loop(keep_della, d, u, q, A, B, c, w, wd, lm, bas, dst)


@njit(cache=True, nogil=True)
def _sum_magnitude(d, u, q, A, B, c, w, present, tot, lm, bas, dst):
    """``consensus.weighted_sum`` after a magnitude window (``_sum_loop``)."""
    _sum_loop(keep_magnitude, d, u, q, A, B, c, w, present, tot, lm, bas, dst)


@njit(cache=True, nogil=True)
def _sum_field(d, u, q, A, B, c, w, present, tot, lm, bas, dst):
    """``consensus.weighted_sum`` after DARE's mask (``_sum_loop``)."""
    _sum_loop(keep_field, d, u, q, A, B, c, w, present, tot, lm, bas, dst)


@njit(cache=True, nogil=True)
def _sum_della(d, u, q, A, B, c, w, present, tot, lm, bas, dst):
    """``consensus.weighted_sum`` after DELLA's mask (``_sum_loop``)."""
    _sum_loop(keep_della, d, u, q, A, B, c, w, present, tot, lm, bas, dst)


@njit(cache=True, nogil=True)
def _masked_l1_magnitude(delta, field, q, a, b, blocks, b0, b1, scratch):
    """``l1.l1_norm`` of δ under a magnitude window (``_masked_l1``)."""
    return _masked_l1(keep_magnitude, delta, field, q, a, b, blocks, b0, b1, scratch)


@njit(cache=True, nogil=True)
def _masked_l1_rank(delta, ranks, q, a, b, blocks, b0, b1, scratch):
    """``l1.l1_norm`` of δ under a window of stable ranks (``_masked_l1``)."""
    return _masked_l1(keep_rank, delta, ranks, q, a, b, blocks, b0, b1, scratch)


@njit(cache=True, nogil=True)
def _masked_l1_field(delta, field, q, a, b, blocks, b0, b1, scratch):
    """``l1.l1_norm`` of δ under DARE's mask (``_masked_l1``)."""
    return _masked_l1(keep_field, delta, field, q, a, b, blocks, b0, b1, scratch)


@njit(cache=True, nogil=True)
def _masked_l1_della(delta, field, q, a, b, blocks, b0, b1, scratch):
    """``l1.l1_norm`` of δ under DELLA's mask (``_masked_l1``)."""
    return _masked_l1(keep_della, delta, field, q, a, b, blocks, b0, b1, scratch)


@njit(cache=True, nogil=True)
def _merge_block(D, R, F, base, out, start, end, s, k, slot_model, mode, lo, hi, thr, dme, eps,
                 weight, sc, consensus, normalize, use_total, total, use_lambda, lam, W, scratch):
    """One block of segment s with k inputs (``merge_segments``): ``sparsify.apply_mask``, the weights, and
    ``consensus.disjoint_merge`` or ``weighted_sum`` in their order; W and scratch are reusable buffers."""
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
        _masked(row, delta, mode[s, i], lo[s, i], hi[s, i], thr[s, i], dme[s, i], eps[s, i],
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
    """S[:m] = s·Σᵢ max(s·W[i], 0) (÷ the agreeing weights when ``normalize``), s the sign of S, in one pass
    (``consensus.disjoint_merge``).

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


def della_q(ranks: np.ndarray, offsets: list[tuple[int, int]], row: np.ndarray) -> np.ndarray:
    """q = (r/(n−1))·2 per element, in float32 as ``della_probability_table`` computes it; 0 in one-element rows.

    ``ranks`` are flat DELLA row ranks [models, total], ``offsets`` each segment's [start, end) and
    ``row`` its row length n. DELLA keeps an element where its field is below (density − ε) + q·ε.
    """
    q = np.zeros(ranks.shape, dtype=np.float32)
    for (a, e), n in zip(offsets, row):
        if n >= 2:
            q[:, a:e] = (ranks[:, a:e].astype(np.float32) / np.float32(n - 1)) * np.float32(2.0)
    return q


def segment_cuts(numel: np.ndarray, threads: int) -> np.ndarray:
    """Boundaries of contiguous runs of whole segments with about equal element counts, one per thread.

    Each run is merged by one thread, so results do not depend on the split. Models of at most
    ``MIN_ELEMENTS_PER_THREAD`` elements per thread get fewer runs (one: no threads at all).
    """
    total = int(numel.sum())
    threads = max(1, min(threads, total // MIN_ELEMENTS_PER_THREAD, len(numel)))
    cumulative = np.cumsum(numel)
    cuts = set()
    for t in range(1, threads):  # the segment boundary nearest to each t/threads of the elements
        target = total * t / threads
        i = int(np.searchsorted(cumulative, target))  # the segment holding the target
        before = int(cumulative[i - 1]) if i > 0 else 0
        cuts.add(i + 1 if cumulative[i] - target < target - before else i)
    return np.array([0, *sorted(c for c in cuts if 0 < c < len(numel)), len(numel)], dtype=np.int64)


MIN_ELEMENTS_PER_THREAD = 1 << 17


@njit(cache=True, nogil=True, parallel=True)
def merge_parallel(rule, D, R, Q, F, SM, PF, PS, SB, SQ, base, out, blocks, seg_blocks, slot_model, mode, lo, hi, thr,
                   dme, eps, seg_k, weight, rescale, before, consensus, normalize, use_total, total, use_lambda, lam, cuts):
    """``merge_segments`` on numba's threads, one contiguous run of segments [cuts[t], cuts[t + 1]) each."""
    blocked = 0
    for t in prange(cuts.shape[0] - 1):
        blocked += merge_segments(rule, D, R, Q, F, SM, PF, PS, SB, SQ, base, out, blocks, seg_blocks, slot_model, mode,
                                  lo, hi, thr, dme, eps, seg_k, weight, rescale, before, consensus, normalize,
                                  use_total, total, use_lambda, lam, cuts[t], cuts[t + 1])
    return blocked


@njit(cache=True, nogil=True, parallel=True)
def floor_parallel(D, base, out, blocks, seg_blocks, cuts):
    """``floor_segments`` on numba's threads, split like ``merge_parallel``."""
    for t in prange(cuts.shape[0] - 1):
        floor_segments(D, base, out, blocks, seg_blocks, cuts[t], cuts[t + 1])
