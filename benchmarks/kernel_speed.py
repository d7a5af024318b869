"""Time evomerge's merge kernels against mergekit 0.1.5's on the same tensors (CPU).

    python benchmarks/kernel_speed.py [--size 4096] [--models 3] [--repeat 3] [--threads 1]
                                      [--dtypes float32 bfloat16] [--only ties della]

Rows: one task vector through each sparsifier (mergekit ``sparsify.*`` vs
``evomerge.methods.sparsify``), then a whole tensor merge with N fine-tunes
(mergekit's registered method on a TensorGroup vs ``MergeMethod.merge``; ours
includes drawing the random fields). "search" rows are a candidate's cost when
the order statistics were precomputed once per tensor. Times are the best of
``--repeat`` runs: wall seconds, and process CPU seconds (less sensitive to
other jobs on a shared machine). Both libraries run after
``tune_host_allocator()`` unless ``--default-malloc``.
"""

from __future__ import annotations

import argparse
import time

import torch
from mergekit import sparsify as mk_sparsify
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup

from evomerge.methods import della_ranks, get_method, random_field, sorted_magnitudes, sparsify
from evomerge.host import tune_host_allocator

DENSITY, EPSILON = 0.5, 0.15


def best_time(fn, repeat: int) -> tuple[float, float]:
    """Best (wall, cpu) seconds over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def make_inputs(size: int, models: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(size, size, generator=g)
    others = [(base + 0.01 * torch.randn(size, size, generator=g)).to(dtype) for _ in range(models)]
    return base.to(dtype), others


def sparsify_rows(base, others, repeat):
    """(label, mergekit fn, evomerge fn) for one task vector."""
    x = others[0]
    shape = x.shape
    field = random_field(shape, seed=0, tensor_name="bench", model_index=0)
    delta32 = x.float() - base.float()
    sorted_mags, ranks = sorted_magnitudes(delta32), della_ranks(delta32)
    l1 = mk_sparsify.RescaleNorm.l1

    def ours(method, **kw):
        def run():
            return sparsify(x.float() - base.float(), method, density=DENSITY, **kw)
        return run

    def ours_field(method, **kw):
        def run():
            f = random_field(shape, seed=0, tensor_name="bench", model_index=0)
            return sparsify(x.float() - base.float(), method, density=DENSITY, field=f, **kw)
        return run

    return [
        ("magnitude (ties)", lambda: mk_sparsify.magnitude(x - base, DENSITY), ours("magnitude")),
        ("magnitude_outliers (breadcrumbs)", lambda: mk_sparsify.magnitude_outliers(x - base, DENSITY, gamma=0.01),
         ours("magnitude_outliers", gamma=0.01)),
        ("random (dare, rescale)", lambda: mk_sparsify.bernoulli(x - base, DENSITY, l1),
         ours_field("random", rescale=True)),
        ("della_magprune (rescale)", lambda: mk_sparsify.della_magprune(x - base, DENSITY, EPSILON, l1),
         ours_field("della_magprune", epsilon=EPSILON, rescale=True)),
        ("search: magnitude, sorted |d| given", None,
         lambda: sparsify(delta32, "magnitude", density=DENSITY, sorted_magnitudes=sorted_mags)),
        ("search: della, ranks + field given", None,
         lambda: sparsify(delta32, "della_magprune", density=DENSITY, epsilon=EPSILON, rescale=True,
                          field=field, ranks=ranks)),
        ("search precompute: sorted |d|", None, lambda: sorted_magnitudes(delta32)),
        ("search precompute: della ranks", None, lambda: della_ranks(delta32)),
    ]


def merge_rows(base, others):
    """(label, mergekit fn, evomerge fn) for a whole-tensor merge of all fine-tunes."""
    n = len(others)
    weights = [1.0 / n] * n
    group = TensorGroup.from_tensors([base, *others], base_index=0)
    rows = []
    for name in ("ties", "della", "dare_ties", "task_arithmetic"):
        mk_params = {"weight": weights, "density": [DENSITY] * n}
        ours_params = [{"weight": w, "density": DENSITY} for w in weights]
        if name == "della":
            mk_params["epsilon"] = [EPSILON] * n
        if name == "task_arithmetic":
            del mk_params["density"]
            ours_params = [{"weight": w} for w in weights]
        method = get_method(name)

        def ours(method=method, ours_params=ours_params):
            fields = None
            if method.needs_fields:
                fields = [random_field(base.shape, seed=0, tensor_name="bench", model_index=i) for i in range(n)]
            return method.merge(base=base, tensors=others, model_params=ours_params, params={}, fields=fields)

        rows.append((f"merge {name} ({n} models)",
                     lambda name=name, mk_params=mk_params: mk_registry.get(name)([group], parameters=mk_params),
                     ours))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="*", default=None, help="substrings of row labels to run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); use 1 on a shared machine, where OpenMP "
                             "threads competing with other jobs make every op ~10x slower")
    parser.add_argument("--default-malloc", action="store_true",
                        help="skip tune_host_allocator() (applies to both libraries alike)")
    args = parser.parse_args()
    tuned = False if args.default_malloc else tune_host_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.size}x{args.size}, {args.models} models, best of {args.repeat}, "
          f"glibc malloc tuned: {tuned}")
    header = f"{'dtype':9} {'kernel':38} {'mergekit s':>15} {'evomerge s':>15} {'speedup':>13}"
    print(header + "\n" + "-" * len(header))
    print(f"{'':9} {'':38} {'wall / cpu':>15} {'wall / cpu':>15} {'wall / cpu':>13}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        base, others = make_inputs(args.size, args.models, dtype)
        for label, mk_fn, our_fn in sparsify_rows(base, others, args.repeat) + merge_rows(base, others):
            if args.only and not any(s in label for s in args.only):
                continue
            ours = best_time(our_fn, args.repeat)
            if mk_fn is None:
                print(f"{dtype_name:9} {label:38} {'':>15} {ours[0]:7.3f}/{ours[1]:7.3f}")
                continue
            theirs = best_time(mk_fn, args.repeat)
            print(f"{dtype_name:9} {label:38} {theirs[0]:7.3f}/{theirs[1]:7.3f} {ours[0]:7.3f}/{ours[1]:7.3f} "
                  f"{theirs[0] / ours[0]:5.1f}x/{theirs[1] / ours[1]:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
