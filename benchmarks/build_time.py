"""Median per-candidate build ms on the `small` zoo (search_bench's build part, without mergekit or
the floor) for the evomerge checkout at sys.argv[1]: run two checkouts alternately to compare them.

    python benchmarks/build_time.py /path/to/checkout [builds]
"""
import os, sys, statistics, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/benchmarks"]
import torch
torch.set_num_threads(2)
from search_bench import default_candidate
from evomerge.zoo import build_zoo
zoo = build_zoo(None, size="small", seed=0, progress=False)
models = {k: str(v) for k, v in zoo.experts.items()}
out = []
for method in ("ties", "dare_ties", "della"):
    b, r = default_candidate(zoo.base, models, method)
    for _ in range(30): b.build(r)
    ts = []
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 301):
        t0 = time.perf_counter(); b.build(r); ts.append(time.perf_counter() - t0)
    out.append(f"{method} {statistics.median(ts)*1e3:.3f}")
    b.close()
import evomerge; print(evomerge.__file__, " | ".join(out), flush=True)
