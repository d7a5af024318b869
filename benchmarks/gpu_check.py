"""GPU checks, in one run on a machine with CUDA (none of this is needed for the tests or CI).

1. Correctness: on a tiny Llama family, the candidate builder on the device against
   ``evomerge merge`` on the device, bit for bit, for every method the builder takes (and the
   largest difference from the engine on the CPU, for information).
2. Build speed on the device: ``benchmarks/search_bench.py``'s table (build vs the floor vs
   mergekit's ``merge_state_dicts`` on the same device) on the `small` zoo and on ~170M models
   built on the spot.
   With them, ``evomerge merge`` on those models on the device and on the CPU (time, same bits).
3. The demo search end to end on the device (``evomerge search configs/demo.yaml``, fewer trials).

    python benchmarks/gpu_check.py [--device cuda] [--out results/bench/gpu_check.md] [--trials 40]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _recipes(fam: dict) -> list[tuple[str, str, dict]]:
    """(label, method, recipe) for every method the builder takes; the variants both ways round."""
    from evomerge.testing.recipes import VARIANT_NAMES, variant_recipe

    out = [(f"{m}{' (flipped)' if flip else ''}", m, variant_recipe(m, fam, flip=flip))
           for m in VARIANT_NAMES for flip in (False, True)]
    for m in ("dare_ties", "della"):  # a bf16 recipe: the builder holds a bf16 model, outputs are rounded
        out.append((f"{m} bf16", m, {**variant_recipe(m, fam, flip=False), "dtype": "bfloat16"}))
    out.append(("linear", "linear", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(fam["ft0"]), "parameters": {"weight": [0.7, 0.2]}},
                   {"model": str(fam["ft1"]), "parameters": {"weight": 0.5}},
                   {"model": str(fam["ft2"]), "parameters": {"weight": 0.3}}]}))
    out.append(("slerp", "slerp", {
        "merge_method": "slerp", "base_model": str(fam["ft0"]), "dtype": "float32",
        "models": [{"model": str(fam["ft0"])}, {"model": str(fam["ft1"])}],
        "parameters": {"t": [0.1, 0.6, 0.9]}}))
    return out


def correctness(device: str, work: Path) -> list[str]:
    """Builder vs engine on ``device`` (bit for bit) and vs the engine on the CPU (max |Δ|)."""
    from evomerge.testing.weights import read_weights
    from evomerge.engine import run_merge
    from evomerge.recipe import load_recipe
    from evomerge.search.builder import CandidateBuilder
    from evomerge.tiny import build_tiny_family

    base, fts = build_tiny_family(work / "llama", family="llama", n_finetunes=3, seed=0, num_layers=4)
    fam = {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}
    lines = ["| recipe | builder path | builder = engine on device | builder twice identical | engine device vs cpu: "
             "tensors differing | max abs diff | build ms (2nd) |", "|---|---|---|---|---:|---:|---:|"]
    for label, method, data in _recipes(fam):
        recipe = load_recipe(data)
        base_dir = data.get("base_model", str(fam["base"])) if method != "linear" else str(fam["base"])
        models = {f"m{i}": m["model"] for i, m in enumerate(data["models"]) if m["model"] != base_dir}
        try:
            builder = CandidateBuilder(base_dir, models, method=method, device=device, seed=3,
                                       dtype=data.get("dtype", "float32"))
            builder.build(recipe)
            first = {k: v.detach().to("cpu", copy=True) for k, v in builder.model.state_dict().items()}
            t0 = time.perf_counter()
            extra = builder.build(recipe).extra
            path = extra.get("path", builder.backend.name)
            if extra.get("in_order_norms"):
                path += ", rescale norms summed in order (tree sum ambiguous)"
            if path == "cuda":
                path += (", params alias its output" if builder.backend.aliased else
                         ", bf16 params written by its kernel" if builder.backend.flat_out16 is not None else
                         ", params copied from its output")
                if builder.backend.inputs16:
                    path += ", bf16 fine-tunes (δ formed in the kernels)"
            ms = (time.perf_counter() - t0) * 1e3
            live = {k: v.detach().cpu() for k, v in builder.model.state_dict().items()}
            builder.close()
            tag = label.replace(" ", "_").replace("(", "").replace(")", "")
            on_dev = read_weights(run_merge(recipe, work / f"{tag}-dev", device=device, seed=3, overwrite=True))
            on_cpu = {k: v.float() for k, v in read_weights(run_merge(recipe, work / f"{tag}-cpu", device="cpu", seed=3,
                                                                         overwrite=True)).items()}
            bad = [k for k, v in on_dev.items() if not torch.equal(v, live[k].to(v.dtype))]
            twice = all(torch.equal(first[k], live[k]) for k in live)
            on_dev = {k: v.float() for k, v in on_dev.items()}
            diff = [k for k, v in on_dev.items() if not torch.equal(v, on_cpu[k])]
            worst = max(((v.double() - on_cpu[k].double()).abs().max().item() for k, v in on_dev.items()), default=0.0)
            lines.append(f"| {label} | {path} | {'yes' if not bad else f'NO: {len(bad)} tensors, e.g. {bad[:2]}'} "
                         f"| {'yes' if twice else 'NO'} | {len(diff)} of {len(on_dev)} | {worst:.3g} | {ms:.1f} |")
        except Exception as e:  # report and go on: one method's failure must not hide the others
            lines.append(f"| {label} | | ERROR {type(e).__name__}: {str(e)[:200]} | | | | |")
        print(lines[-1], flush=True)
    return lines


def large_models(work: Path) -> Path:
    """Three ~170M Llama-shaped bf16 models (``benchmarks/merge_speed.py``'s), built once in ``work``."""
    from merge_speed import build_models

    build_models(work)
    return work


def engine_speed(large: Path, device: str, work: Path) -> list[str]:
    """``evomerge merge`` wall time on the ~170M models (``merge_speed.py``'s recipes), on ``device`` and the CPU."""
    from merge_speed import RECIPES

    from evomerge.engine import run_merge
    from evomerge.recipe import load_recipe

    lines = ["| method | device s | cpu s | same bits |", "|---|---:|---:|---|"]
    for method in ("ties", "dare_ties", "della"):
        text = f"merge_method: {method}\ndtype: bfloat16\n" + RECIPES[method].format(
            ft0=large / "ft0", ft1=large / "ft1", base=large / "base")
        recipe = load_recipe(yaml.safe_load(text))
        secs = {}
        for dev in (device, "cpu"):
            t0 = time.perf_counter()
            run_merge(recipe, work / f"engine-{method}-{dev}", device=dev, seed=0, overwrite=True)
            secs[dev] = time.perf_counter() - t0
        from evomerge.testing.weights import read_weights

        a, b = read_weights(work / f"engine-{method}-{device}"), read_weights(work / f"engine-{method}-cpu")
        same = all(torch.equal(v, b[k]) for k, v in a.items())
        lines.append(f"| {method} | {secs[device]:.1f} | {secs['cpu']:.1f} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    return lines


LANE_SETTINGS = [(4, 1), (2, 1), (4, 2), (8, 1), (16, 2), (64, 4)]  # (LANE_GROUP, LANE_WARPS)


def lane_sweep(large: Path, device: str, repeats: int = 50) -> tuple[list[str], tuple]:
    """The lane-sum kernel alone on the ~170M models (dare_ties, della): time per launch setting, same sums.

    Returns the table and the setting with the least total time over both methods."""
    import statistics

    from search_bench import default_candidate

    from evomerge.backends import cuda_kernels as dk
    from evomerge.backends import cuda as dp

    models = {"ft0": str(large / "ft0"), "ft1": str(large / "ft1")}
    lines = ["| method | LANE_GROUP | LANE_WARPS | kernel ms | GB/s | same sums |", "|---|---:|---:|---:|---:|---|"]
    defaults = (dk.LANE_GROUP, dk.LANE_WARPS)
    totals = {setting: 0.0 for setting in LANE_SETTINGS}
    for method in ("dare_ties", "della"):
        builder, recipe = default_candidate(large / "base", models, method, device)
        builder.build(recipe)
        st = builder.backend._candidate_tables(recipe)
        ints, floats = (torch.from_numpy(t).to(builder.device)
                        for t in dp.rule_tables(builder.backend.keep_rule, *st.tables[:6]))

        def run():
            return dk.lane_sums(builder.backend.keep_rule, builder.backend.flat_inputs, builder.backend.device_stat, builder.backend.field_keys,
                                builder.backend.seg_starts, st.slot_models_t, builder.backend.block_seg, ints, floats,
                                base=builder.backend.flat_base, row_inverse=builder.backend.row_inverse)

        reference = run()
        x = builder.backend.flat_inputs  # δ (float32), or bf16 fine-tunes read with the float32 base
        stat = builder.backend.device_stat.element_size() if method != "dare_ties" else 0  # DELLA's q or 16-bit rank
        per_input = x.element_size() + (4 if x.dtype == torch.bfloat16 else 0) + stat
        bytes_read = x.numel() * per_input  # δ (or x and base), and DELLA's q, per input
        for setting in LANE_SETTINGS:
            group, warps = setting
            dk.LANE_GROUP, dk.LANE_WARPS = setting
            try:
                same = torch.equal(run(), reference)  # compiles
            except Exception as e:  # a setting Triton cannot compile: report it, go on
                lines.append(f"| {method} | {group} | {warps} | ERROR {type(e).__name__} | | |")
                totals[setting] = float("inf")
                continue
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.backend.record()
                b.backend.synchronize()
                times.append(a.elapsed_time(b))
            ms = statistics.median(times)
            totals[setting] += ms if same else float("inf")
            lines.append(f"| {method} | {group} | {warps} | {ms:.3f} | {bytes_read / ms / 1e6:.0f} "
                         f"| {'yes' if same else 'NO'} |")
            print(lines[-1], flush=True)
        builder.close()
        del builder
    dk.LANE_GROUP, dk.LANE_WARPS = defaults
    return lines, min(totals, key=totals.get)


def launch_costs(device: str) -> list[str]:
    """What a candidate's fixed costs are made of: a Triton launch, a sync, small copies (µs, median)."""
    import statistics

    import triton
    import triton.language as tl

    @triton.jit
    def _nop(x_ptr, n):
        i = tl.program_id(0)
        tl.store(x_ptr + i, tl.load(x_ptr + i) + n, mask=i < 1)

    x = torch.zeros(16, dtype=torch.float32, device=device)
    pinned = torch.zeros(1024, dtype=torch.int32, pin_memory=True)
    dev = torch.zeros(1024, dtype=torch.int32, device=device)

    def timed(f, reps=200):
        f()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return statistics.median(out) * 1e6

    rows = [("Triton launch (no sync)", timed(lambda: _nop[(1,)](x, 1))),
            ("Triton launch + sync", timed(lambda: (_nop[(1,)](x, 1), torch.cuda.synchronize()))),
            ("torch add_ on 16 floats (no sync)", timed(lambda: x.add_(1))),
            ("synchronize, idle GPU", timed(torch.cuda.synchronize)),
            ("4 KB pinned H2D, non_blocking", timed(lambda: dev.copy_(pinned, non_blocking=True))),
            ("4 KB pageable H2D", timed(lambda: dev.copy_(torch.from_numpy(pinned.numpy().copy())))),
            ("4 KB D2H (.cpu())", timed(lambda: dev.cpu()))]
    lines = ["| operation | µs |", "|---|---:|", *(f"| {n} | {v:.1f} |" for n, v in rows)]
    print("\n".join(lines), flush=True)
    return lines


def profile_builds(zoo_base, zoo_models: dict, large: Path | None, device: str, reps: int = 21) -> list[str]:
    """Back-to-back builds: wall, the builder's plan/merge split, and torch.profiler's CPU and GPU time per build."""
    import statistics

    from search_bench import BENCH_SPACES, default_candidate
    from torch.profiler import ProfilerActivity, profile

    sets = [("zoo", zoo_base, zoo_models, "float32")]
    if large is not None:
        fts = {"ft0": str(large / "ft0"), "ft1": str(large / "ft1")}
        sets += [("170M", large / "base", fts, "float32"), ("170M, bf16 model and recipe", large / "base", fts, "bfloat16")]
    lines = ["| models | method | wall ms | plan ms | merge ms | GPU busy ms | top GPU kernels (ms per build) "
             "| top CPU ops (self ms per build) | builds with in-order norms |", "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for label, base, models, dtype in sets:
        for method in BENCH_SPACES:
            builder, recipe = default_candidate(base, models, method, device, dtype)
            for _ in range(3):
                builder.build(recipe)
            walls, plans, merges, in_order = [], [], [], 0
            for _ in range(reps):
                t0 = time.perf_counter()
                st = builder.build(recipe)
                walls.append(time.perf_counter() - t0)
                plans.append(st.plan)
                merges.append(st.merge)
                in_order += bool(st.extra.get("in_order_norms"))
            n = 10
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    builder.build(recipe)
            events = prof.key_averages()
            dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
            gpu = sorted(events, key=lambda e: -getattr(e, dev_attr))
            busy = sum(getattr(e, dev_attr) for e in events) / n / 1e3
            top_gpu = "; ".join(f"{e.key[:40]} {getattr(e, dev_attr) / n / 1e3:.3f}" for e in gpu[:4]
                                if getattr(e, dev_attr) > 0)
            cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)
            top_cpu = "; ".join(f"{e.key[:40]} {e.self_cpu_time_total / n / 1e3:.3f}" for e in cpu[:5])
            lines.append(f"| {label} | {method} | {statistics.median(walls) * 1e3:.3f} "
                         f"| {statistics.median(plans) * 1e3:.3f} | {statistics.median(merges) * 1e3:.3f} "
                         f"| {busy:.3f} | {top_gpu} | {top_cpu} | {in_order} of {reps} |")
            print(lines[-1], flush=True)
            builder.close()
            del builder
    return lines


def memory_use(large: Path, device: str) -> list[str]:
    """What a builder holds on the GPU (after precompute and one build) against ``resident_bytes``, for the
    ~170M models as float32 and bf16 builders."""
    import gc

    from search_bench import default_candidate

    lines = ["| method | dtype | estimate GiB | held after a build GiB | peak GiB | bytes / parameter: estimate "
             "| held | peak within the estimate |", "|---|---|---:|---:|---:|---:|---:|---|"]
    models = {"ft0": str(large / "ft0"), "ft1": str(large / "ft1")}
    gib = 2 ** 30
    for dtype in ("float32", "bfloat16"):
        for method in ("ties", "dare_ties", "della"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            builder, recipe = default_candidate(large / "base", models, method, device, dtype)
            builder.build(recipe)
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device) - before
            peak = torch.cuda.max_memory_allocated(device) - before
            numel = builder.backend.flat_base.numel()
            estimate = builder.backend.resident_bytes(*builder.backend.tensor_sizes())
            lines.append(f"| {method} | {dtype} | {estimate / gib:.2f} | {held / gib:.2f} | {peak / gib:.2f} "
                         f"| {estimate / numel:.1f} | {held / numel:.1f} | {'yes' if peak <= estimate else 'NO'} |")
            builder.close()
            del builder
    return lines


def demo_search(device: str, trials: int, work: Path) -> list[str]:
    """``evomerge search configs/demo.yaml`` on ``device`` with ``trials`` trials; its summary."""
    out = work / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(ROOT / "configs" / "demo.yaml"),
                           "--trials", str(trials), "--device", device, "--output-dir", str(out)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout[-4000:], proc.stderr[-4000:], flush=True)
    lines = [f"`evomerge search configs/demo.yaml --trials {trials} --device {device}`: exit {proc.returncode}, "
             f"{wall:.0f} s wall."]
    summary = out / "summary.md"
    if summary.exists():
        lines += ["", "summary.md:", "", *("> " + l for l in summary.read_text().splitlines())]
    else:
        lines += ["", "```", proc.stderr[-3000:], "```"]
    return lines


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=51, help="timed builds per method on the zoo (170M: 9)")
    ap.add_argument("--work", default="/tmp/evomerge-gpu-check")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: correctness,profile,memory,speed,large,sweep,engine,"
                         "search")
    ap.add_argument("--lane-best", action="store_true",
                    help="after the sweep, run the rest with its fastest lane-sum setting (else the defaults)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "gpu_check.md"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "no GPU"
    lines = ["# GPU checks", "",
             f"Device: {args.device} ({name}); torch {torch.__version__}, Triton {_triton_version()}; "
             f"{os.cpu_count()} CPU cores. Date: {datetime.date.today()}. "
             f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def section(title: str, body) -> None:
        """Run one part, append its table (or its error: one part's failure must not hide the rest), save."""
        t0 = time.perf_counter()
        try:
            rows = body()
        except Exception:  # noqa: BLE001 - reported in the output
            rows = ["```", traceback.format_exc()[-3000:], "```"]
        lines.extend(["", f"## {title}", "", *rows, "", f"({time.perf_counter() - t0:.0f} s)"])
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines[-len(rows) - 6:]), flush=True)

    def zoo_models():
        from evomerge.zoo import build_zoo

        zoo = build_zoo(None, size="small", seed=0)
        return zoo.base, {k: str(v) for k, v in zoo.experts.items()}

    large = (lambda: large_models(work / "large")) if "large" not in skip else None

    def speed() -> list[str]:
        from search_bench import build_speed

        base, experts = zoo_models()
        timed = {"`small` zoo (4 experts)": build_speed(base, experts, args.repeats, 15, device=args.device)}
        if large is not None:
            big = large()
            timed["~170M Llama, bf16 files, float32 resident (2 fine-tunes)"] = build_speed(
                big / "base", {"ft0": str(big / "ft0"), "ft1": str(big / "ft1")}, 9, 3, device=args.device)
        rows = ["| models | method | build ms | planning ms | floor ms (flat Σδ + base) | build / floor "
                "| per-tensor floor ms | mergekit ms | speed-up vs mergekit |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, got in timed.items():
            for m, b, pl, f, ef, mk in got:
                rows.append(f"| {label} | {m} | {b:.2f} | {pl:.2f} | {f:.3f} | {b / f:.1f}x | {ef:.2f} "
                            f"| {mk:.1f} | {mk / b:.1f}x |")
        return rows

    def sweep() -> list[str]:
        from evomerge.backends import cuda_kernels as dk

        rows, best = lane_sweep(large(), args.device)
        if args.lane_best:
            dk.LANE_GROUP, dk.LANE_WARPS = best
        return [*rows, "", f"Fastest over both (LANE_GROUP, LANE_WARPS): {best}; the rest of this run uses "
                           f"{(dk.LANE_GROUP, dk.LANE_WARPS)}."]

    def profile() -> list[str]:
        base, experts = zoo_models()
        return [*launch_costs(args.device), "",
                *profile_builds(base, experts, large() if large is not None else None, args.device)]

    if "correctness" not in skip:
        section("Builder vs `evomerge merge` on the device", lambda: correctness(args.device, work))
    if "speed" not in skip:
        section("Per-candidate build time on the device (median, timed in turn with the floor)", speed)
    if "memory" not in skip and large is not None and cuda:
        section("GPU memory of a builder (~170M models, 2 fine-tunes)", lambda: memory_use(large(), args.device))
    if "profile" not in skip and cuda:
        section("Where a build's time goes (back to back, median; profiler over 10 builds)", profile)
    if "sweep" not in skip and large is not None and cuda:
        section("The lane-sum kernel's launch settings (~170M models, median of 50 launches)", sweep)
    if "engine" not in skip and large is not None:
        section("`evomerge merge` on the ~170M models (bf16 recipe), device and CPU",
                lambda: engine_speed(large(), args.device, work))
    if "search" not in skip:
        section("Demo search on the device", lambda: demo_search(args.device, args.trials, work))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
