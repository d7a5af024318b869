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
    from tests.test_flat_builder import VARIANT_NAMES, _recipe

    out = [(f"{m}{' (flipped)' if flip else ''}", m, _recipe(m, fam, flip=flip))
           for m in VARIANT_NAMES for flip in (False, True)]
    for m in ("dare_ties", "della"):  # a bf16 recipe: the builder holds a bf16 model, outputs are rounded
        out.append((f"{m} bf16", m, {**_recipe(m, fam, flip=False), "dtype": "bfloat16"}))
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
    from tests.conftest import read_weights
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
            path = builder.build(recipe).extra.get("path", builder.path)
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
        from tests.conftest import read_weights

        a, b = read_weights(work / f"engine-{method}-{device}"), read_weights(work / f"engine-{method}-cpu")
        same = all(torch.equal(v, b[k]) for k, v in a.items())
        lines.append(f"| {method} | {secs[device]:.1f} | {secs['cpu']:.1f} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    return lines


def kernel_sweep(large: Path, device: str, repeats: int = 9) -> list[str]:
    """Build time of the fused kernels' launch settings on the ~170M models (ties, dare_ties)."""
    import statistics

    from evomerge.search import device_kernels as dk
    from evomerge.search.builder import CandidateBuilder
    from evomerge.search.space import load_space

    models = {"ft0": str(large / "ft0"), "ft1": str(large / "ft1")}
    lines = ["| method | MERGE_BLOCK | MERGE_WARPS | LANE_GROUP | build ms | of which plan ms |", "|---|---:|---:|---:|---:|---:|"]
    defaults = (dk.MERGE_BLOCK, dk.MERGE_WARPS, dk.LANE_GROUP)
    for method, space_file in (("ties", "ties_per_model.yaml"), ("dare_ties", "dare_ties_per_layer.yaml")):
        space = load_space(ROOT / "search_spaces" / space_file)
        builder = CandidateBuilder(large / "base", models, method=method, device=device, seed=0)
        builder.precompute()
        recipe = space.to_recipe(space.default_point(list(models), builder.num_layers), base_model=str(large / "base"),
                                 models=models, num_layers=builder.num_layers, dtype="float32")
        settings = [(1024, 4, 64), (2048, 4, 64), (2048, 8, 64), (4096, 8, 64), (4096, 16, 64)]
        if method == "dare_ties":
            settings += [(1024, 4, 32), (1024, 4, 128)]
        for block, warps, group in settings:
            dk.MERGE_BLOCK, dk.MERGE_WARPS, dk.LANE_GROUP = block, warps, group
            builder.build(recipe)  # compile
            times, plans = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                plans.append(builder.build(recipe).plan)
                times.append(time.perf_counter() - t0)
            lines.append(f"| {method} | {block} | {warps} | {group} | {statistics.median(times) * 1e3:.2f} "
                         f"| {statistics.median(plans) * 1e3:.2f} |")
            print(lines[-1], flush=True)
        builder.close()
        del builder
    dk.MERGE_BLOCK, dk.MERGE_WARPS, dk.LANE_GROUP = defaults
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=51, help="timed builds per method on the zoo (170M: 9)")
    ap.add_argument("--work", default="/tmp/evomerge-gpu-check")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: correctness,speed,large,sweep,engine,search")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "gpu_check.md"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    lines = ["# GPU checks", "",
             f"Device: {args.device} ({name}); torch {torch.__version__}; {os.cpu_count()} CPU cores. "
             f"Date: {datetime.date.today()}. Command: `python benchmarks/gpu_check.py --device {args.device} "
             f"--trials {args.trials}`."]
    text = lambda: "\n".join(lines) + "\n"  # noqa: E731
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "correctness" not in skip:
        t0 = time.perf_counter()
        lines += ["", "## Builder vs `evomerge merge` on the device", "", *correctness(args.device, work)]
        lines.append(f"\n({time.perf_counter() - t0:.0f} s)")
        out.write_text(text())
    if "speed" not in skip:
        from search_bench import build_speed

        from evomerge.zoo import build_zoo

        zoo = build_zoo(None, size="small", seed=0)
        speed = {"`small` zoo (4 experts)": build_speed(zoo.base, {k: str(v) for k, v in zoo.experts.items()},
                                                        args.repeats, 15, device=args.device)}
        if "large" not in skip:
            large = large_models(work / "large")
            speed["~170M Llama, bf16 files, float32 resident (2 fine-tunes)"] = build_speed(
                large / "base", {"ft0": str(large / "ft0"), "ft1": str(large / "ft1")}, 9, 3, device=args.device)
        if "large" not in skip and "sweep" not in skip and torch.device(args.device).type == "cuda":
            sweep = kernel_sweep(work / "large", args.device)
        else:
            sweep = []
        engine = [] if "large" in skip or "engine" in skip else engine_speed(work / "large", args.device, work)
        lines += ["", "## Per-candidate build time on the device (median)", "",
                  "| models | method | build ms | planning ms | floor ms (flat Σδ + base) | build / floor "
                  "| per-tensor floor ms | mergekit ms | speed-up vs mergekit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, rows in speed.items():
            for m, b, pl, f, ef, mk in rows:
                lines.append(f"| {label} | {m} | {b:.2f} | {pl:.2f} | {f:.3f} | {b / f:.1f}x | {ef:.2f} "
                             f"| {mk:.1f} | {mk / b:.1f}x |")
        if sweep:
            lines += ["", "### Fused kernels' launch settings (~170M models, median of 9 builds)", "", *sweep]
        if engine:
            lines += ["", "## `evomerge merge` on the ~170M models (bf16 recipe), device and CPU", "", *engine]
        out.write_text(text())
    if "search" not in skip:
        lines += ["", "## Demo search on the device", "", *demo_search(args.device, args.trials, work)]
        out.write_text(text())
    print("\n" + text())


if __name__ == "__main__":
    main()
