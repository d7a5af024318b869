"""Merge speed and memory: `evomerge merge` versus `mergekit-yaml` on the same recipe.

Builds three ~170M-parameter Llama-shaped models in bf16 locally (a base and two perturbed
fine-tunes), then merges them with each method through both command-line tools in fresh
processes, measuring wall time and peak RSS (GNU time's maximum resident set size).

    python benchmarks/merge_speed.py [--methods linear,ties] [--work DIR] [--out results/bench/merge_speed.md]
                                     [--backend auto|reference] [--skip-mergekit] [--repeats N]

With ``--repeats N`` each method runs N times, evomerge and mergekit alternating, and the table gives
the median time (the range in brackets) and the highest peak RSS.

Targets (2-core machine): ties and della >= 5x faster than mergekit; linear and
task_arithmetic no slower; peak RSS no higher than mergekit's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RECIPES = {
    "linear": "models:\n  - model: {ft0}\n    parameters: {{weight: 0.6}}\n  - model: {ft1}\n    parameters: {{weight: 0.4}}\n",
    "task_arithmetic": "models:\n  - model: {ft0}\n    parameters: {{weight: 0.6}}\n  - model: {ft1}\n    parameters: {{weight: 0.4}}\nbase_model: {base}\n",
    "ties": "models:\n  - model: {ft0}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {ft1}\n    parameters: {{weight: 0.4, density: 0.3}}\nbase_model: {base}\n",
    "dare_ties": "models:\n  - model: {ft0}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {ft1}\n    parameters: {{weight: 0.4, density: 0.3}}\nbase_model: {base}\n",
    "della": "models:\n  - model: {ft0}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}\n  - model: {ft1}\n    parameters: {{weight: 0.4, density: 0.3, epsilon: 0.1}}\nbase_model: {base}\n",
}


def build_models(work: Path) -> dict[str, Path]:
    """Three ~170M Llama-shaped bf16 models: base and two fine-tunes (base + noise); cached in `work`."""
    import torch

    from evomerge.tiny import build_tiny_model, make_tokenizer, perturbed_copy, save_model, tiny_config

    paths = {n: work / n for n in ("base", "ft0", "ft1")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tok = make_tokenizer()
    cfg = tiny_config("llama", vocab_size=32000, num_layers=17, hidden_size=768, intermediate_size=2048,
                      num_heads=12, num_kv_heads=12, max_position_embeddings=2048)
    base = build_tiny_model(cfg, seed=0, dtype=torch.bfloat16)
    print(f"model parameters: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M", flush=True)
    save_model(base, tok, paths["base"], max_shard_size="2GB")
    for i, name in enumerate(("ft0", "ft1")):
        save_model(perturbed_copy(base, seed=i + 1, scale=0.01), tok, paths[name], max_shard_size="2GB")
    return paths


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` under GNU time; return (wall seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rss_kb = int([l for l in res.stderr.splitlines() if l.startswith("MAXRSS")][-1].split()[1])
    return wall, rss_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--work", default="/tmp/evomerge-merge-bench")
    ap.add_argument("--out", default="results/bench/merge_speed.md")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and method, alternating; medians reported")
    ap.add_argument("--backend", default="auto", help="evomerge merge --backend (reference: the torch kernels)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_models(work)
    bindir = Path(sys.executable).parent
    rows = []
    for method in args.methods.split(","):
        recipe = work / f"{method}.yaml"
        recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in paths.items()})
                          + f"merge_method: {method}\ndtype: bfloat16\n")
        ours_dir, theirs_dir = work / f"out-evomerge-{method}", work / f"out-mergekit-{method}"
        for d in (ours_dir, theirs_dir):
            shutil.rmtree(d, ignore_errors=True)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(timed([str(bindir / "evomerge"), "merge", str(recipe), str(ours_dir), "--device", "cpu",
                               "--backend", args.backend]))
            if not args.skip_mergekit:
                theirs.append(timed([str(bindir / "mergekit-yaml"), str(recipe), str(theirs_dir)]))
            for d in (ours_dir, theirs_dir):
                shutil.rmtree(d, ignore_errors=True)
        t_ours, rss_ours = statistics.median(t for t, _ in ours), max(r for _, r in ours)
        t_mk, rss_mk = ((statistics.median(t for t, _ in theirs), max(r for _, r in theirs)) if theirs
                        else (float("nan"), float("nan")))
        spread = (f" [{min(t for t, _ in ours):.1f}-{max(t for t, _ in ours):.1f}]",
                  f" [{min(t for t, _ in theirs):.1f}-{max(t for t, _ in theirs):.1f}]" if theirs else "")
        rows.append((method, t_ours, t_mk, t_mk / t_ours, rss_ours, rss_mk, spread if args.repeats > 1 else ("", "")))
        print(f"{method:16s} evomerge {t_ours:6.1f}s {rss_ours:7.0f}MiB | mergekit {t_mk:6.1f}s {rss_mk:7.0f}MiB "
              f"| speed-up {t_mk / t_ours:4.1f}x", flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        pass
    lines = [
        "# Merge speed: evomerge vs mergekit 0.1.5",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU. Date: {datetime.date.today()}.",
        "Models: three Llama-shaped bf16 checkpoints (~170M parameters each: 17 layers, hidden 768,",
        "vocab 32000), a base and two fine-tunes; `dtype: bfloat16`; both tools on CPU, fresh processes,",
        f"page cache warm. Command: `python benchmarks/merge_speed.py --repeats {args.repeats}`"
        + (" (median time of the runs, the range in brackets; the highest peak RSS)." if args.repeats > 1 else "."),
        "",
        "| method | evomerge s | mergekit s | speed-up | evomerge peak RSS MiB | mergekit peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, to, tm, ratio, ro, rm, (so, sm) in rows:
        lines.append(f"| {m} | {to:.1f}{so} | {tm:.1f}{sm} | {ratio:.1f}x | {ro:.0f} | {rm:.0f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
