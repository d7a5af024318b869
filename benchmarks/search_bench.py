"""Search benchmark on the demo zoo: candidate build speed, and search quality per sampler.

1. Per-candidate build time of the resident builder for ties, dare_ties and della, versus
   - the floor: one pass reading every resident task vector and writing every parameter, timed the
     same way (``benchmarks/floor.py``: a compiled pass over the flat buffers on the host), and the
     same pass as eager torch ops tensor by tensor (the floor the previous builder was measured against),
   - mergekit's in-memory merge (``mergekit.merge_methods.api.merge_state_dicts``) on the same
     float32 tensors with the same parameters.
2. The winner's test score for CMA-ES, TPE and random search at equal budget, beside the default
   recipe, the best single expert and the multi-task reference; and how much of the gap between
   the default recipe and the reference the CMA-ES winner closes.

    python benchmarks/search_bench.py [--size small] [--trials 200] [--space search_spaces/task_arithmetic_per_layer.yaml] [--large /tmp/evomerge-merge-bench]

Targets: build <= 2x the floor and >= 20x faster than mergekit; the CMA-ES winner closes at least
half of the default-to-reference gap on the test split within 200 trials.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn (a, b, c, a, b, c, ...) so that the
    machine's drift (this shared VM varies by tens of percent from minute to minute) hits all alike."""
    for fn in fns:
        fn()  # warm-up (lazy statistics, allocator, numba threads)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (lazy order statistics, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _per_tensor_floor(builder) -> None:
    """The floor as eager torch ops, tensor by tensor: base + Σδ written into each parameter."""
    for name, b in builder.backend.base.items():
        acc = b.clone()
        for inputs in builder.backend.inputs.values():
            acc.add_(inputs[name])
        builder.params[name].copy_(acc)
    _sync(builder.device)


BENCH_SPACES = {"ties": "ties_per_model.yaml", "dare_ties": "dare_ties_per_layer.yaml",
                "della": "della_per_block.yaml"}  # the methods timed, with the search space of each


def default_candidate(base, models: dict[str, str], method: str, device: str = "cpu", dtype: str = "float32"):
    """A builder for ``method`` (order statistics precomputed) and its space's default recipe, both in ``dtype``."""
    from evomerge.search.builder import CandidateBuilder
    from evomerge.search.space import load_space

    space = load_space(ROOT / "search_spaces" / BENCH_SPACES[method])
    builder = CandidateBuilder(base, models, method=method, device=device, seed=0, dtype=dtype)
    builder.precompute()
    recipe = space.to_recipe(space.default_point(list(models), builder.num_layers), base_model=str(base),
                             models=models, num_layers=builder.num_layers, dtype=dtype)
    return builder, recipe


def build_speed(base, models: dict[str, str], repeats: int, mergekit_repeats: int,
                device: str = "cpu") -> list[tuple]:
    """(method, build ms, plan ms, floor ms, per-tensor floor ms, mergekit ms) for ties, dare_ties, della."""
    from floor import floor
    from mergekit.merge_methods.api import merge_state_dicts

    rows = []
    for method in BENCH_SPACES:
        builder, recipe = default_candidate(base, models, method, device)
        plans = []
        # the floor: the faster of the candidates' threads and one thread (thread hand-off can cost more)
        build, floor_threads, floor_one = _interleaved_medians(
            [lambda: plans.append(builder.build(recipe).plan), lambda: floor(builder), lambda: floor(builder, threads=1)],
            repeats)
        plan = statistics.median(plans)
        floor = min(floor_threads, floor_one)
        eager_floor = _median_time(lambda: _per_tensor_floor(builder), repeats)
        # mergekit on the same resident float32 tensors (inputs = base + task vectors, as loaded)
        base_sd = dict(builder.backend.base)
        sds = {"base": base_sd}
        for name, path in models.items():
            reader = builder.readers[path]
            sds[name] = {k: reader.get_tensor(reader.resolve_tied(k), dtype=torch.float32).to(builder.device)
                         for k in base_sd}
        p = {"weight": {n: 1.0 for n in models}, "density": {n: 0.5 for n in models}}
        if method == "della":
            p["epsilon"] = {n: 0.1 for n in models}
        with torch.no_grad():
            mk = _median_time(lambda: (merge_state_dicts(sds, method, parameters=p, base="base"),
                                       _sync(builder.device)), mergekit_repeats)
        rows.append((method, build * 1e3, plan * 1e3, floor * 1e3, eager_floor * 1e3, mk * 1e3))
        print(f"{method:10s} build {build * 1e3:8.2f} ms (plan {plan * 1e3:.2f})  floor {floor * 1e3:8.2f} ms "
              f"({build / floor:4.2f}x)  per-tensor floor {eager_floor * 1e3:8.2f} ms ({build / eager_floor:4.2f}x)  "
              f"mergekit {mk * 1e3:9.1f} ms  ({mk / build:5.1f}x faster)", flush=True)
        builder.close()
        del builder, sds, base_sd  # free this method's resident buffers before the next builder loads
        gc.collect()
    return rows


def search_quality(zoo, size: str, trials: int, space: str, work: Path) -> tuple[dict, list[tuple]]:
    """Run one search per sampler; returns baselines and (sampler, test score, search s) rows."""
    import yaml

    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    rows, baselines = [], {}
    for sampler in ("cmaes", "tpe", "random"):
        out = work / f"search-{sampler}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh study each time
        cfg_path = work / f"{sampler}.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "name": f"bench-{sampler}", "zoo": {"size": size, "seed": 0}, "search_space": str(space),
            "budget": {"trials": trials}, "sampler": {"name": sampler}, "pruner": {"name": "none"},
            "output_dir": str(out), "device": "cpu", "export_checkpoint": False,
        }))
        cfg = load_config(cfg_path)
        t0 = time.perf_counter()
        run = SearchRun(cfg)
        run.run()
        searched = time.perf_counter() - t0
        summary = finalize(run, export_checkpoint=False, log=lambda m: None)
        by_label = {r.label: r for r in summary.rows}
        winner = summary.rows[0]
        baselines = {
            "default recipe": by_label[f"default recipe ({run.space.method})"].aggregate,
            "best single expert": max(r.aggregate for r in summary.rows if r.label.startswith("fine-tune")),
            "multi-task reference": by_label["multi-task reference"].aggregate,
            "base": by_label["base"].aggregate,
        }
        rows.append((sampler, winner.aggregate, winner.ci, searched, summary.winner_trial))
        print(f"{sampler:7s} winner test {winner.aggregate:.4f} (trial {summary.winner_trial}) in {searched:.0f} s",
              flush=True)
    return baselines, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "task_arithmetic_per_layer.yaml"))
    ap.add_argument("--repeats", type=int, default=301, help="timed builds per method on the zoo (the ~170M "
                    "models get 9)")
    ap.add_argument("--work", default="/tmp/evomerge-search-bench")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-build-speed", action="store_true", help="only the search-quality part")
    ap.add_argument("--large", default=None, help="also time builds on DIR/{base,ft0,ft1} (e.g. the models "
                    "benchmarks/merge_speed.py builds in /tmp/evomerge-merge-bench)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "search_bench.md"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from evomerge.host import tune_host_allocator

    tune_host_allocator()  # as the CLI does

    from evomerge.zoo import build_zoo

    zoo = build_zoo(None, size=args.size, seed=0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    speed = {} if args.skip_build_speed else {
        f"`{args.size}` zoo (4 experts)": build_speed(zoo.base, {k: str(v) for k, v in zoo.experts.items()},
                                                      args.repeats, 15)}
    if args.large and not args.skip_build_speed:
        large = Path(args.large)
        speed["~170M Llama, bf16 files, float32 resident (2 fine-tunes)"] = build_speed(
            large / "base", {"ft0": str(large / "ft0"), "ft1": str(large / "ft1")}, 9, 1)
    cpu = "unknown CPU"
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        pass
    lines = ["# Search benchmark", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU; device cpu, float32. Date: {datetime.date.today()}.",
             f"Zoo: `{args.size}` (seed 0). Command: `python benchmarks/search_bench.py --size {args.size} "
             f"--trials {args.trials}" + (f" --large {args.large}" if args.large else "")
             + (" --skip-build-speed" if args.skip_build_speed else "")
             + (" --skip-quality" if args.skip_quality else "") + "`."]
    if speed:
        lines += ["", "## Per-candidate build time (median)", "",
                  "| models | method | evomerge build ms | of which planning ms | floor ms (compiled pass) "
                  "| build / floor | per-tensor torch floor ms | build / that floor | mergekit merge_state_dicts ms "
                  "| speed-up vs mergekit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rows in speed.items():
        for m, b, pl, f, ef, mk in rows:
            lines.append(f"| {label} | {m} | {b:.2f} | {pl:.2f} | {f:.2f} | {b / f:.2f}x | {ef:.2f} | {b / ef:.2f}x "
                         f"| {mk:.1f} | {mk / b:.1f}x |")
    if not args.skip_quality:
        baselines, rows = search_quality(zoo, args.size, args.trials, Path(args.space), work)
        lines += ["", f"## Search quality: winner's test score at {args.trials} trials "
                      f"(`{Path(args.space).name}`)", "",
                  "| model | test aggregate | 95% CI | search wall s |", "|---|---:|---|---:|"]
        for s, score, ci, secs, trial in rows:
            ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"| {s} winner (trial {trial}) | {score:.4f} | {ci_s} | {secs:.0f} |")
        for k, v in baselines.items():
            lines.append(f"| {k} | {v:.4f} | | |")
        gap = baselines["multi-task reference"] - baselines["default recipe"]
        cma = rows[0][1]
        closed = (cma - baselines["default recipe"]) / gap if gap > 0 else float("nan")
        lines += ["", f"CMA-ES closes {100 * closed:.0f}% of the gap between the default recipe "
                      f"({baselines['default recipe']:.4f}) and the multi-task reference "
                      f"({baselines['multi-task reference']:.4f}); target: at least 50%."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
