"""Where a host candidate build's time goes, method by method, beside the floor.

For ties, dare_ties and della on the `small` zoo (the builders and default recipes of
``search_bench.py``), timed interleaved (a, b, c, ..., a, b, c, ...) and reported as medians:

- the whole build (``CandidateBuilder.build``), as search_bench times it;
- planning: the candidate's per-segment tables (``_candidate_tables``);
- the compiled merge over all segments (``flat_kernel.merge_parallel``) with the recipe's rescale,
  and the same with the rescale turned off (so the difference is the rescale norms' cost);
- the floor, on the builder's threads and on one (search_bench takes the faster).

    python benchmarks/build_anatomy.py [--size small] [--repeats 300] [--out results/bench/build_anatomy.md]

It explains search_bench's "build / floor" column: the per-input mask test and the extra per-element
reads of the fused pass (the field for DARE; the field and the rank term q for DELLA), the rescale
norms, and planning, each against the floor's one read of δ per input.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_bench import BENCH_SPACES, default_candidate  # noqa: E402


def anatomy(builder, recipe, repeats: int) -> dict[str, float]:
    """Median seconds of each part of ``builder.build(recipe)``, and of the floor."""
    import evomerge.backends.cpu_kernel as fk
    from floor import floor

    if builder.backend.name != "cpu":
        raise SystemExit("the anatomy needs the compiled host path (numba); this builder goes tensor by tensor")
    for _ in range(20):
        builder.build(recipe)  # compile and warm up
    st = builder.backend._candidate_tables(recipe)
    mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = st.tables
    before = builder.backend._before_norms()

    def merge(resc):
        args = (builder.backend.keep_rule, *builder.backend._buffers, builder.backend.blocks, builder.backend.seg_blocks, st.slot_model, mode,
                lo, hi, thr, dme, eps, st.seg_k, weight, resc, before, builder.backend.variant.consensus, normalize,
                st.use_total, st.total, use_lambda, lam)
        return lambda: fk.merge_parallel(*args, builder.backend.cuts)

    parts = {"build": lambda: builder.build(recipe), "planning": lambda: builder.backend._candidate_tables(recipe),
             "merge": merge(rescale), "merge, no rescale": merge(np.zeros_like(rescale)),
             "floor": lambda: floor(builder), "floor, one thread": lambda: floor(builder, threads=1)}
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeats):
        for k, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "build_anatomy.md"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from evomerge.host import tune_host_allocator
    from evomerge.zoo import build_zoo

    tune_host_allocator()
    zoo = build_zoo(None, size=args.size, seed=0)
    models = {k: str(v) for k, v in zoo.experts.items()}
    rows = []
    for method in BENCH_SPACES:
        builder, recipe = default_candidate(zoo.base, models, method)
        t = anatomy(builder, recipe, args.repeats)
        floor = min(t["floor"], t["floor, one thread"])
        rows.append((method, t, floor))
        print(f"{method:10s} " + "  ".join(f"{k} {v * 1e3:.3f}" for k, v in t.items()) + " ms", flush=True)
        builder.close()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = ["# Build anatomy: where a host candidate build's time goes", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU. Date: {datetime.date.today()}. "
             f"Zoo `{args.size}` (4 experts, float32). Command: `python benchmarks/build_anatomy.py "
             f"--size {args.size} --repeats {args.repeats}`. Medians of interleaved runs, ms; "
             "the ratios are to the floor (the faster of its two rows).", "",
             "| method | build | planning | merge | merge, no rescale | rescale norms (difference) | floor "
             "| floor, one thread | build / floor | merge, no rescale / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, t, floor in rows:
        lines.append(f"| {method} | {t['build'] * 1e3:.3f} | {t['planning'] * 1e3:.3f} | {t['merge'] * 1e3:.3f} "
                     f"| {t['merge, no rescale'] * 1e3:.3f} | {(t['merge'] - t['merge, no rescale']) * 1e3:.3f} "
                     f"| {t['floor'] * 1e3:.3f} | {t['floor, one thread'] * 1e3:.3f} | {t['build'] / floor:.2f}x "
                     f"| {t['merge, no rescale'] / floor:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
