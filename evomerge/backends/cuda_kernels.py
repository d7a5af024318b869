"""Fused Triton kernels of the cuda backend: a candidate in two passes over the resident buffers.

They reproduce ``methods.task_arithmetic.merge_task_vectors`` (the reference backend's and
``evomerge merge``'s arithmetic) over every tensor at once: ``lane_sums`` reads each input's δ
and rank/q once and writes one float64 sum per 4096-element block (the rescale norms' blocks);
``rescale_factors`` turns each tensor's blocks into its factor ‖δ‖₁/‖m⊙δ‖₁ on the device (no round trip to the host); and ``merge`` reads the
inputs once more with the base and writes the merged parameters. Per element, the float
operations are the engine's, in the same order: FMA contraction is turned
off (``enable_fp_fusion=False``) and divisions are correctly rounded (``div_rn``), so the bits
are the engine's. DARE's and DELLA's random field is not stored: each element's value is
computed where it is used, from its tensor's key and its index in the tensor (``_uniform``,
SplitMix64 as ``methods.fields`` defines it), which saves 4 bytes per parameter and input. Tests
run the kernels through Triton's interpreter on the CPU against the engine;
``benchmarks/gpu_check.py`` on a GPU.

Imported only when a builder uses it (Triton comes with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evomerge.methods.fields import GOLDEN_GAMMA, MIX_1, MIX_2
from evomerge.methods.l1 import L1_BLOCK
from evomerge.backends import cpu_kernel as fk
from evomerge.backends.memory import SCRATCH_CHUNK

LANE_GROUP = 4  # blocks per lane-sum program (4·8 lanes): fastest in the H200 sweep (results/bench/gpu_check.md)
LANE_WARPS = 1
MERGE_BLOCK = 1024  # elements per merge program (divides 4096: one segment per program)
MERGE_WARPS = 4
NO_RULE = -1  # task arithmetic: no sparsifier, every δ kept
# the keep rules' numbers and SplitMix64's constants, from their one source each (``cpu_kernel``, ``methods.fields``)
RULE_MAGNITUDE: tl.constexpr = tl.constexpr(fk.RULE_MAGNITUDE)
RULE_FIELD: tl.constexpr = tl.constexpr(fk.RULE_FIELD)
RULE_DELLA: tl.constexpr = tl.constexpr(fk.RULE_DELLA)
RULE_TOP: tl.constexpr = tl.constexpr(fk.RULE_TOP)
GAMMA: tl.constexpr = tl.constexpr(GOLDEN_GAMMA)
M1: tl.constexpr = tl.constexpr(MIX_1)
M2: tl.constexpr = tl.constexpr(MIX_2)


@triton.jit
def _uniform(key, index):
    """The random field at ``index`` (int64, the element's flat index in its tensor) of the tensor
    with ``key`` (int64 bits of the uint64 key): ``methods.fields.splitmix_uniform``, bit for bit."""
    z = key.to(tl.uint64, bitcast=True) + (index + 1).to(tl.uint64, bitcast=True) * GAMMA
    z = (z ^ (z >> 30)) * M1
    z = (z ^ (z >> 27)) * M2
    z = z ^ (z >> 31)
    return (z >> 40).to(tl.float32) * 5.9604644775390625e-08  # · 2⁻²⁴: exact


@triton.jit
def _delta(d_ptr, base_ptr, offs, X16: tl.constexpr):
    """The task vector δ at ``offs`` (``d_ptr`` at the input's row): stored, or with ``X16`` formed from the
    fine-tune's bf16 values as the engine forms it, float32(x) − base (one rounding; bf16 → float32 is exact)."""
    # One return: Triton compiles every return, even under a constexpr `if`, and they must agree in type.
    if X16:
        delta = tl.load(d_ptr + offs).to(tl.float32) - tl.load(base_ptr + offs)
    else:
        delta = tl.load(d_ptr + offs)
    return delta


@triton.jit
def _della_q(stat_ptr, offs, inverse, RANK16: tl.constexpr):
    """DELLA's q = (r/(n−1))·2 in float32 at ``offs`` (the rank term of ``sparsify.della_probability_table``): stored, or with ``RANK16`` from the 16-bit row rank r and
    ``inverse`` = 1/(n−1) in float64: float32(r·inverse) is float32(r/(n−1)) correctly rounded for n ≤ 2¹⁶
    (the product is within 2⁻⁵² of r/(n−1), which is never that close to a float32 rounding midpoint;
    ``tests/test_device_kernels.py`` checks every r and n), and ·2 is exact."""
    if RANK16:
        r = tl.load(stat_ptr + offs).to(tl.uint16, bitcast=True).to(tl.float64)
        q = (r * inverse).to(tl.float32) * 2.0
    else:
        q = tl.load(stat_ptr + offs)
    return q


@triton.jit
def _keep(d_ptr, base_ptr, delta, stat_ptr, key, index, offs, lo, hi, thr, eps, inverse, RULE: tl.constexpr,
          RANK16: tl.constexpr, X16: tl.constexpr):
    """The method's keep rule (``sparsify.magnitude_mask``, ``breadcrumbs_mask``, ``dare_mask``, ``della_mask``)
    for ``delta`` at ``offs``; ``d_ptr`` and ``stat_ptr`` at the input's rows, ``key`` and ``index`` locate
    the random field (``_uniform``), ``inverse`` is DELLA's 1/(n−1) (``_della_q``).

    The magnitude rules keep a window [lo, hi) of stable ascending ranks, the order of (|δ|, position).
    So an element's rank is at least r exactly when (|δ|, position) is at least that of the element
    ranked r: ``lo`` and ``hi`` are the positions of the elements ranked at the window's ends
    (−1: that end is open; ``lo`` −2: keep none), and no rank is stored per element."""
    if RULE == RULE_MAGNITUDE or RULE == RULE_TOP:  # magnitude window / top-k: compare (|δ|, position) with the bound elements
        mag = tl.abs(delta)
        at_lo = tl.abs(_delta(d_ptr, base_ptr, tl.maximum(lo, 0), X16))
        at_hi = tl.abs(_delta(d_ptr, base_ptr, tl.maximum(hi, 0), X16))
        above = (lo == -1) | ((lo >= 0) & ((mag > at_lo) | ((mag == at_lo) & (offs >= lo))))
        below = (hi == -1) | (mag < at_hi) | ((mag == at_hi) & (offs < hi))
        keep = above & below
    elif RULE == RULE_FIELD:  # DARE: field < density
        keep = _uniform(key, index) < thr
    elif RULE == RULE_DELLA:  # DELLA: field < q·ε + (density − ε)
        p = _della_q(stat_ptr, offs, inverse, RANK16) * eps
        p = p + thr
        keep = _uniform(key, index) < p
    else:
        keep = offs >= 0
    return keep


@triton.jit
def _lane_sums_kernel(d_ptr, base_ptr, stat_ptr, inverse_ptr, keys_ptr, starts_ptr, slot_models_ptr, block_seg_ptr,
                      ints_ptr, floats_ptr, out_ptr, n, n_seg, n_blocks, k, RULE: tl.constexpr, GROUP: tl.constexpr,
                      X16: tl.constexpr, RANK16: tl.constexpr):
    """Per input slot and 4096-element block: Σ|m⊙δ| in ``l1_norm``'s order (eight lanes, each sequential).

    Lane l of a block holds its elements l, l+8, l+16, …; four consecutive steps of all eight
    lanes are 32 consecutive elements. Each iteration reads them as one 128-byte row per block
    (loading one step at a time, 32 bytes per block, reached ~2.4 TB/s on an H200; rows ~4 TB/s)
    and splits the row into its four steps, which are added in order.
    """
    i = tl.program_id(1)
    blocks = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    inside = blocks < n_blocks
    blocks = tl.where(inside, blocks, 0)
    m = tl.load(slot_models_ptr + i).to(tl.int64)
    seg = tl.load(block_seg_ptr + blocks)
    lo = tl.load(ints_ptr + i * n_seg + seg)[:, None]
    hi = tl.load(ints_ptr + (k + i) * n_seg + seg)[:, None]
    thr = tl.load(floats_ptr + i * n_seg + seg)[:, None]
    eps = tl.load(floats_ptr + (k + i) * n_seg + seg)[:, None]
    key = tl.load(keys_ptr + i * n_seg + seg)[:, None]
    start = tl.load(starts_ptr + seg)[:, None]
    inverse = tl.load(inverse_ptr + seg)[:, None]
    row = blocks.to(tl.int64)[:, None] * 4096 + tl.arange(0, 32)[None, :]
    acc = tl.zeros([GROUP, 8], dtype=tl.float64)
    for j in range(0, 512, 4):  # steps j … j+3
        offs = row + j * 8
        delta = _delta(d_ptr + m * n, base_ptr, offs, X16)
        keep = _keep(d_ptr + m * n, base_ptr, delta, stat_ptr + m * n, key, offs - start, offs, lo, hi, thr, eps,
                     inverse, RULE, RANK16, X16)
        v = tl.where(keep, tl.abs(delta).to(tl.float64), 0.0)
        even, odd = tl.split(tl.permute(tl.reshape(v, [GROUP, 2, 2, 8]), (0, 3, 1, 2)))  # [block, lane, step // 2]
        s0, s2 = tl.split(even)
        s1, s3 = tl.split(odd)
        acc += s0
        acc += s1
        acc += s2
        acc += s3
    a, b = tl.split(tl.reshape(acc, [GROUP, 4, 2]))  # lanes (0,2,4,6) and (1,3,5,7)
    pairs = a + b  # l0+l1, l2+l3, l4+l5, l6+l7
    c, d = tl.split(tl.reshape(pairs, [GROUP, 2, 2]))
    quads = c + d  # (l0+l1)+(l2+l3), (l4+l5)+(l6+l7)
    e, f = tl.split(quads)
    tl.store(out_ptr + i * n_blocks + blocks, e + f, mask=inside)


@triton.jit
def _rescale_kernel(block_sums_ptr, first_block_ptr, n_blocks_ptr, before_ptr, exact_ptr, slot_models_ptr, use_ptr,
                    rows_ptr, ambiguous_ptr, n_blocks_total, n_seg, n_models, k, eps32, slack, CHUNK: tl.constexpr):
    """Slot i's rescale factor of segment s, ‖δ‖₁/‖m⊙δ‖₁ (float32, ``sparsify.apply_mask``'s), into ``rows[k + i, s]``.

    ``l1_norm`` adds a tensor's block sums in order; here they are added in any order (a tree),
    which can differ from the in-order float64 sum by at most 2γ₍ₙ₋₁₎ of the total (n blocks,
    non-negative terms; Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2). If both
    ends of that interval round to the same float32, so does the in-order sum: the factor is
    ``l1_norm``'s, bit for bit. So it is when every sum was exact: ``exact[s, m]`` bounds the
    totals below which they are (``exact_sum_limits``); bf16 task vectors usually are, and then
    often land on a float32 rounding midpoint, which no interval decides. Otherwise
    ``ambiguous[i, s]`` is set and the caller redoes the candidate with the in-order sums (rare:
    ~10⁻⁵ per tensor). ``slack`` widens the interval (1.0; tests raise it to force the fallback).
    Inputs that do not rescale get 1.
    """
    s = tl.program_id(0)
    i = tl.program_id(1)
    first = tl.load(first_block_ptr + s)
    nb = tl.load(n_blocks_ptr + s)
    acc = tl.zeros([CHUNK], dtype=tl.float64)
    for c in range(0, nb, CHUNK):
        idx = c + tl.arange(0, CHUNK)
        acc += tl.load(block_sums_ptr + i * n_blocks_total + first + idx, mask=idx < nb, other=0.0)
    approx = tl.sum(acc, axis=0)
    rel = slack * 4.0 * (nb + 2).to(tl.float64) * 1.1102230246251565e-16  # ≥ 2γ₍ₙ₋₁₎ plus this line's roundings
    lo = (approx * (1.0 - rel)).to(tl.float32)
    hi = (approx * (1.0 + rel)).to(tl.float32)
    after = approx.to(tl.float32)
    m = tl.load(slot_models_ptr + i)
    exact = approx <= tl.load(exact_ptr + s * n_models + m)
    before = tl.load(before_ptr + s * n_models + m)
    use = (tl.load(use_ptr + i * n_seg + s) != 0) & ~(before < eps32) & ~(after < eps32)  # as the host's test
    scale = tl.where(use, tl.math.div_rn(before, tl.where(use, after, 1.0)), 1.0)
    tl.store(rows_ptr + (k + i) * n_seg + s, scale)
    tl.store(ambiguous_ptr + i * n_seg + s, (use & (lo != hi) & ~exact).to(tl.int32))


@triton.jit
def _weighted(d_ptr, base_ptr, stat_ptr, inverse, keys_ptr, start, slot_models_ptr, seg, ints_ptr, floats_ptr, rows_ptr,
              offs, i, n, n_seg, k, RULE: tl.constexpr, SCALE: tl.constexpr, X16: tl.constexpr,
              RANK16: tl.constexpr):
    """Input slot i's ((δ·keep)·scale)·w at ``offs`` (``sparsify.apply_mask``, then the weight, as
    ``task_arithmetic.generalized_task_arithmetic``), and its weight w (``seg``: the program's segment,
    which starts at ``start``)."""
    m = tl.load(slot_models_ptr + i).to(tl.int64)
    delta = _delta(d_ptr + m * n, base_ptr, offs, X16)
    w = tl.load(rows_ptr + i * n_seg + seg)
    if RULE >= 0:
        keep = _keep(d_ptr + m * n, base_ptr, delta, stat_ptr + m * n, tl.load(keys_ptr + i * n_seg + seg),
                     offs - start, offs, tl.load(ints_ptr + i * n_seg + seg),
                     tl.load(ints_ptr + (k + i) * n_seg + seg), tl.load(floats_ptr + i * n_seg + seg),
                     tl.load(floats_ptr + (k + i) * n_seg + seg), inverse, RULE, RANK16, X16)
        delta = delta * tl.where(keep, 1.0, 0.0)  # δ·keep: a dropped element keeps its sign of zero
    if SCALE:
        delta = delta * tl.load(rows_ptr + (k + i) * n_seg + seg)
    return delta * w, w


@triton.jit
def _merge_kernel(d_ptr, stat_ptr, inverse_ptr, keys_ptr, starts_ptr, slot_models_ptr, block_seg_ptr, ints_ptr,
                  floats_ptr, rows_ptr, norm_ptr, active_ptr, base_ptr, out_ptr, n, n_seg, k: tl.constexpr, RULE: tl.constexpr, CONSENSUS: tl.constexpr,
                  NORMALIZE: tl.constexpr, SCALE: tl.constexpr, LAMBDA: tl.constexpr, DIVIDE: tl.constexpr,
                  OUT16: tl.constexpr, X16: tl.constexpr, RANK16: tl.constexpr, BLOCK: tl.constexpr):
    """out = base + λ·mix(((δᵢ·keepᵢ)·scaleᵢ)·wᵢ) with the engine's operations
    (``consensus.disjoint_merge`` or ``consensus.weighted_sum``, as ``task_arithmetic.merge_task_vectors``).

    Segments start at multiples of 4096 elements and BLOCK divides 4096, so a program's elements
    lie in one segment: its settings are scalars, read once. The number of inputs k is a
    compile-time constant: both loops over the inputs unroll, and the second pass's loads of an
    input repeat the first's (no store between them). With ``OUT16`` the result is stored as bf16
    bits (``out_ptr`` an int16 view), rounded to nearest even as torch rounds (``bf16_bits``).
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    seg = tl.load(block_seg_ptr + start // 4096)  # the segment of the program's L1 block
    seg_start = tl.load(starts_ptr + seg)
    inverse = tl.load(inverse_ptr + seg)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(k):  # Σ in input order from the first input
        x, w = _weighted(d_ptr, base_ptr, stat_ptr, inverse, keys_ptr, seg_start, slot_models_ptr, seg, ints_ptr,
                         floats_ptr, rows_ptr, offs, i, n, n_seg, k, RULE, SCALE, X16, RANK16)
        if i == 0:
            total = x
        else:
            total = total + x
    if CONSENSUS:
        unit = tl.where(total >= 0, 1.0, -1.0)
        mixed = tl.zeros([BLOCK], dtype=tl.float32)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(k):
            x, w = _weighted(d_ptr, base_ptr, stat_ptr, inverse, keys_ptr, seg_start, slot_models_ptr, seg, ints_ptr,
                             floats_ptr, rows_ptr, offs, i, n, n_seg, k, RULE, SCALE, X16, RANK16)
            agreeing = tl.maximum(x * unit, 0.0)
            mixed = mixed + agreeing
            if NORMALIZE:
                divisor = tl.where(agreeing > 0, divisor + w, divisor)  # + sign(agreeing)·w: +0 changes nothing
        mixed = mixed * unit
        if NORMALIZE:
            normalizes = tl.load(norm_ptr + seg) != 0
            mixed = tl.math.div_rn(mixed, tl.where((divisor == 0) | (~normalizes), 1.0, divisor))
    else:
        mixed = total
        if DIVIDE:
            mixed = tl.math.div_rn(mixed, tl.load(rows_ptr + (2 * k + 1) * n_seg + seg))
    if LAMBDA:
        mixed = mixed * tl.load(rows_ptr + 2 * k * n_seg + seg)
    out = tl.load(base_ptr + offs) + mixed
    active = tl.zeros([BLOCK], dtype=tl.int32) + tl.load(active_ptr + seg)
    if OUT16:
        tl.store(out_ptr + offs, bf16_bits(out), mask=active != 0)
    else:
        tl.store(out_ptr + offs, out, mask=active != 0)


@triton.jit
def bf16_bits(x):
    """float32 → bfloat16 bits (int16), round to nearest even: torch's (and c10's) rounding, in integers.

    (Triton's own conversion is correctly rounded on GPUs but truncates in its interpreter; this is
    the same on both.) Inputs are finite here; infinities stay infinite, overflow rounds to ±inf.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
    return rounded.to(tl.int16)


def lane_sums(rule: int, flat_inputs: torch.Tensor, stat: torch.Tensor | None, keys: torch.Tensor | None,
              starts: torch.Tensor, slot_models: torch.Tensor, block_seg: torch.Tensor, ints: torch.Tensor,
              floats: torch.Tensor, base: torch.Tensor | None = None,
              row_inverse: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [slots, blocks]: each block's Σ|m⊙δ| in ``l1_norm``'s order (``l1.lane_block_sums``).

    ``flat_inputs``: the task vectors (float32), or the fine-tunes' bf16 values with the float32
    ``base`` they are task vectors of. ``stat``: DELLA's q (float32) or 16-bit row ranks (int16, with
    ``row_inverse``: float64 1/(n−1) per segment); none for the magnitude rules, whose ``ints`` are
    the positions of the window's bound elements (int64, ``_keep``). ``keys``: int64
    [slots, segments], each input's random-field key per tensor (``field_seed``; any stand-in for
    rules without a field); ``starts``: int64 [segments], where each tensor starts.
    """
    k, n = slot_models.numel(), flat_inputs.shape[1]
    n_blocks = n // L1_BLOCK
    out = torch.empty((k, n_blocks), dtype=torch.float64, device=flat_inputs.device)
    grid = (triton.cdiv(n_blocks, LANE_GROUP), k)
    x16 = flat_inputs.dtype == torch.bfloat16
    assert not x16 or base is not None, "bf16 inputs need their base"
    rank16 = stat is not None and stat.dtype == torch.int16
    _lane_sums_kernel[grid](flat_inputs, base if x16 else flat_inputs, stat if stat is not None else flat_inputs,
                            row_inverse if rank16 else starts, keys if keys is not None else starts, starts,
                            slot_models, block_seg, ints, floats, out, n, ints.shape[-1], n_blocks, k, RULE=rule,
                            GROUP=LANE_GROUP, X16=x16, RANK16=rank16,
                            num_warps=LANE_WARPS, enable_fp_fusion=False)
    return out


def exact_sum_limits(x: torch.Tensor, block_seg: torch.Tensor, n_seg: int, block: int = L1_BLOCK,
                     chunk: int = SCRATCH_CHUNK) -> torch.Tensor:
    """float64 [segments]: a total below which every float64 sum of a segment's |x| (any subset, any order) is exact.

    Each nonzero float32 |x| is a multiple of g, its lowest set bit (2^(e−24)·(M & −M) for
    x = M·2^(e−24), M an integer); a sum of multiples of g below 2⁵³·g is a multiple of g that
    float64 holds exactly, and so is each partial sum. The limit is 2⁵²·g for the segment's least
    g: a sum (with its rounding error) that comes out at most 2⁵²·g had an exact total below 2⁵³·g.
    ``block_seg``: the segment of each ``block``-element block of ``x`` (whose length is a multiple
    of ``block``); segments without nonzeros get +∞.
    """
    limits = torch.full((n_seg,), float("inf"), dtype=torch.float64, device=x.device)
    block_seg = block_seg.long()
    chunk = max(block, chunk // block * block)
    for c in range(0, x.numel(), chunk):
        part = x[c: c + chunk]
        mantissa, exponent = torch.frexp(part)  # |mantissa| ∈ [0.5, 1), or 0 for x = 0
        m = (mantissa.abs().double() * 2.0 ** 24).to(torch.int64)
        g = torch.ldexp((m & -m).double(), (exponent - 24).double())
        g = torch.where(part == 0, float("inf"), g * 2.0 ** 52).view(-1, block).amin(1)
        limits.scatter_reduce_(0, block_seg[c // block: c // block + g.numel()], g, "amin")
    return limits


def rescale_factors(block_sums: torch.Tensor, first_block: torch.Tensor, n_blocks: torch.Tensor, before: torch.Tensor,
                    exact: torch.Tensor, slot_models: torch.Tensor, use: torch.Tensor, rows: torch.Tensor, *,
                    slack: float = 1.0) -> torch.Tensor:
    """Write each slot's rescale factors into ``rows[k:2k]`` ([slots, segments]; 1 where ``use`` is 0).

    ``before``: float32 ‖δ‖₁ [segments, models]; ``exact``: float64 [segments, models], the totals
    below which the sums are exact (``exact_sum_limits``); ``use``: int32 [slots, segments],
    whether the engine rescales that input there. Returns int32 [slots, segments], nonzero where
    the factor could differ from ``l1_norm``'s (the caller must then compute it in order).
    """
    k, n_seg = use.shape
    ambiguous = torch.empty((k, n_seg), dtype=torch.int32, device=block_sums.device)
    _rescale_kernel[(n_seg, k)](block_sums, first_block, n_blocks, before, exact, slot_models, use, rows, ambiguous,
                                block_sums.shape[1], n_seg, before.shape[1], k, float(fk.L1_EPS32), float(slack), CHUNK=1024,
                                enable_fp_fusion=False)
    return ambiguous


def merge(rule: int, flat_inputs: torch.Tensor, stat: torch.Tensor | None, keys: torch.Tensor | None,
          starts: torch.Tensor, slot_models: torch.Tensor, block_seg: torch.Tensor, ints: torch.Tensor,
          floats: torch.Tensor,
          rows: torch.Tensor, norm: torch.Tensor, active: torch.Tensor, base: torch.Tensor,
          out: torch.Tensor | None, *, consensus: bool, normalize: bool, scale: bool, lambda_: bool, divide: bool,
          out16: torch.Tensor | None = None, row_inverse: torch.Tensor | None = None) -> None:
    """Write the candidate into ``out`` (active segments only), or rounded into the bf16 ``out16`` instead;
    ``rows`` as ``_build_device`` packs them.

    ``block_seg``: the segment of each 4096-element block (the buffers' length is a multiple of 4096);
    ``flat_inputs``, ``stat``, ``row_inverse``, ``keys`` and ``starts`` as for ``lane_sums``.
    """
    n = base.numel()
    assert n % L1_BLOCK == 0 and L1_BLOCK % MERGE_BLOCK == 0
    grid = (n // MERGE_BLOCK,)
    rank16 = stat is not None and stat.dtype == torch.int16
    _merge_kernel[grid](flat_inputs, stat if stat is not None else flat_inputs, row_inverse if rank16 else starts,
                        keys if keys is not None else starts, starts, slot_models, block_seg, ints, floats, rows,
                        norm, active, base, out if out16 is None else out16.view(torch.int16), n, ints.shape[-1],
                        slot_models.numel(), RULE=rule, CONSENSUS=consensus, NORMALIZE=normalize, SCALE=scale,
                        LAMBDA=lambda_, DIVIDE=divide, OUT16=out16 is not None,
                        X16=flat_inputs.dtype == torch.bfloat16, RANK16=rank16, BLOCK=MERGE_BLOCK,
                        num_warps=MERGE_WARPS, enable_fp_fusion=False)


def rule_code(keep_rule: int, sparsification: str | None) -> int:
    """The kernels' RULE: ``cpu_kernel``'s rule, or ``NO_RULE`` without a sparsifier."""
    return NO_RULE if sparsification is None else keep_rule

