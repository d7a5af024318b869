"""What bounds the host's fused merge pass: stand-alone variants of its loop, timed on zoo-sized arrays.

``cpu_kernel``'s fused pass reads, per element and input, δ and what its mask rule needs (nothing
more for TIES, the random field for DARE, the field and the rank term q for DELLA), then elects
the sign and merges (TIES consensus), divides by the agreeing weights (normalize), and writes the
parameter. This times simplified copies of that loop (4 inputs, 343,776 elements: the `small`
zoo; two threads; data hot in cache; medians of interleaved runs) to see which part costs what,
and how alternative layouts of DARE's and DELLA's per-element data would do:

- the floor (base + Σδ);
- TIES: the mask and the sum only; plus the sign election and disjoint merge; plus normalize;
- DARE with the float32 field, and with a 16-bit integer field (half the bytes);
- DELLA with float32 field and q (today), with a float32 field and a 16-bit rank (q = r·b, a
  different rounding), and with field and rank packed in one 32-bit word.

    python benchmarks/pass_variants.py [--repeats 400]

These are not the engine's definitions (the layouts change the random field's resolution or
DELLA's rounding): they measure what a change would buy before making it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

N = 343_776  # elements of the `small` zoo's merged tensors
CHUNK = 24_576  # the largest tensor: one segment at a time, as the pass goes
ONE, ZERO = np.float32(1.0), np.float32(0.0)


@njit(inline="always")
def _consensus(v0, v1, v2, v3, e, normalize, base):
    """TIES sign election and disjoint merge of four weighted inputs (``flat_kernel._consensus_loop``)."""
    s = ((v0 + v1) + v2) + v3
    sg = ONE if s >= ZERO else -ONE
    m, dd = ZERO * sg, ZERO
    t = v0 * sg > ZERO
    m, dd = (m + v0, dd + e) if t else (m, dd)
    t = v1 * sg > ZERO
    m, dd = (m + v1, dd + e) if t else (m, dd)
    t = v2 * sg > ZERO
    m, dd = (m + v2, dd + e) if t else (m, dd)
    t = v3 * sg > ZERO
    m, dd = (m + v3, dd + e) if t else (m, dd)
    if normalize:
        return base + m / (ONE if dd == ZERO else dd)
    return base + m


@njit(inline="always")
def keep_top(x, u, q, a, b):
    return abs(x) >= a


@njit(inline="always")
def keep_field(x, u, q, a, b):
    return u < a


@njit(inline="always")
def keep_field16(x, u, q, a, b):
    return np.int32(u) < np.int32(a)  # a = ceil(density · 2¹⁶)


@njit(inline="always")
def keep_della(x, u, q, a, b):
    return u < a + q * b


@njit(inline="always")
def keep_della_rank16(x, u, r, a, b):
    return u < a + np.float32(r) * b  # b = 2ε/(n − 1)


@njit(inline="always")
def keep_della_packed(x, k, _, a, b):
    u = np.float32(np.int32(k >> np.uint32(16)))
    r = np.float32(np.int32(k & np.uint32(0xFFFF)))
    return u < a + r * b  # in units of 2⁻¹⁶: a and b scaled by 2¹⁶


def _variant(keep, mode):
    """The pass with mask rule ``keep``; mode 0: mask and sum, 1: + consensus, 2: + normalize."""

    @njit(nogil=True)
    def segment(D, U, Q, base, out, a, b, w, s, t):
        d0, d1, d2, d3 = D[0, s:t], D[1, s:t], D[2, s:t], D[3, s:t]
        u0, u1, u2, u3 = U[0, s:t], U[1, s:t], U[2, s:t], U[3, s:t]
        q0, q1, q2, q3 = Q[0, s:t], Q[1, s:t], Q[2, s:t], Q[3, s:t]
        bas, dst = base[s:t], out[s:t]
        for j in range(t - s):
            x = d0[j]
            v0 = x * w if keep(x, u0[j], q0[j], a, b) else ZERO
            x = d1[j]
            v1 = x * w if keep(x, u1[j], q1[j], a, b) else ZERO
            x = d2[j]
            v2 = x * w if keep(x, u2[j], q2[j], a, b) else ZERO
            x = d3[j]
            v3 = x * w if keep(x, u3[j], q3[j], a, b) else ZERO
            if mode == 0:
                dst[j] = bas[j] + (((v0 + v1) + v2) + v3)
            else:
                dst[j] = _consensus(v0, v1, v2, v3, w, mode == 2, bas[j])

    @njit(parallel=True)
    def run(D, U, Q, base, out, a, b, w):
        half = N // 2
        for th in prange(2):
            for s in range(th * half, (th + 1) * half, CHUNK):
                segment(D, U, Q, base, out, a, b, w, s, min(s + CHUNK, (th + 1) * half))

    return run


@njit(nogil=True)
def _floor_segment(D, base, out, s, t):
    d0, d1, d2, d3 = D[0, s:t], D[1, s:t], D[2, s:t], D[3, s:t]
    bas, dst = base[s:t], out[s:t]
    for j in range(t - s):
        dst[j] = bas[j] + (((d0[j] + d1[j]) + d2[j]) + d3[j])


@njit(parallel=True)
def floor(D, base, out):
    half = N // 2
    for th in prange(2):
        for s in range(th * half, (th + 1) * half, CHUNK):
            _floor_segment(D, base, out, s, min(s + CHUNK, (th + 1) * half))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "bench" / "pass_variants.md"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    D = (rng.standard_normal((4, N)) * 0.01).astype(np.float32)
    m = rng.integers(0, 1 << 16, (4, N))
    U, U16 = (m * 2.0 ** -16).astype(np.float32), m.astype(np.uint16)
    r = rng.integers(0, 256, (4, N))
    Q, R16 = (r / 255).astype(np.float32) * np.float32(2), r.astype(np.uint16)
    K = ((m.astype(np.uint32) << np.uint32(16)) | r.astype(np.uint32)).astype(np.uint32)
    base, out = rng.standard_normal(N).astype(np.float32), np.empty(N, dtype=np.float32)
    f32 = np.float32
    a, b, w, thr = f32(0.4), f32(0.1), f32(0.7), f32(0.005)
    cases = {
        "floor (base + Σδ)": lambda: floor(D, base, out),
        "TIES: mask and sum": (lambda p: lambda: p(D, D, D, base, out, thr, b, w))(_variant(keep_top, 0)),
        "TIES: + sign election, disjoint merge": (lambda p: lambda: p(D, D, D, base, out, thr, b, w))(
            _variant(keep_top, 1)),
        "TIES: + normalize (as the zoo's TIES)": (lambda p: lambda: p(D, D, D, base, out, thr, b, w))(
            _variant(keep_top, 2)),
        "DARE-TIES, float32 field (today)": (lambda p: lambda: p(D, U, U, base, out, a, b, w))(
            _variant(keep_field, 2)),
        "DARE-TIES, 16-bit field": (lambda p: lambda: p(D, U16, U16, base, out, f32(26215), b, w))(
            _variant(keep_field16, 2)),
        "DELLA, float32 field and q (today)": (lambda p: lambda: p(D, U, Q, base, out, a, b, w))(
            _variant(keep_della, 2)),
        "DELLA, float32 field, 16-bit rank": (lambda p: lambda: p(D, U, R16, base, out, a, b / f32(127.5), w))(
            _variant(keep_della_rank16, 2)),
        "DELLA, field and rank in one 32-bit word": (lambda p: lambda: p(
            D, K, K, base, out, a * f32(65536), b / f32(127.5) * f32(65536), w))(_variant(keep_della_packed, 2)),
    }
    for fn in cases.values():
        fn()  # compile
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    floor_ms = statistics.median(times["floor (base + Σδ)"]) * 1e3
    lines = ["# Fused-pass variants", "",
             f"Machine: {os.cpu_count()} CPU cores, no GPU. Date: {datetime.date.today()}. Command: "
             f"`python benchmarks/pass_variants.py --repeats {args.repeats}`. Stand-alone copies of the loop "
             "(see the script's docstring), medians of interleaved runs.", "",
             f"| variant (4 inputs, {N} elements, 2 threads) | ms | / floor |", "|---|---:|---:|"]
    for k, v in times.items():
        ms = statistics.median(v) * 1e3
        lines.append(f"| {k} | {ms:.3f} | {ms / floor_ms:.2f}x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
