"""Every merge method's default recipe on the demo zoo's test split, beside searched recipes and merge times.

Quality: each method's default recipe (below) over the zoo's experts, scored on the test split with a
bootstrap 95% CI; then searches (TPE, no pruner) of the task-arithmetic family and of the TSV-M /
Iso-CTS knobs, their winners scored the same way. Data-aware methods calibrate each expert on its own
task's search split (64 examples). Timing (``--timing``): wall time and peak RSS of `evomerge merge`
and `mergekit-yaml` for the methods added with the subspace / mergekit-parity work, on the three
~170M bf16 Llamas of benchmarks/merge_speed.py.

    python benchmarks/methods_bench.py [--size small] [--trials 200] [--timing] [--out results/bench/methods.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SEARCHES = {  # label -> search space file
    "task_arithmetic family (task_arithmetic_per_layer.yaml)": "task_arithmetic_per_layer.yaml",
    "TSV-M knobs (tsv_m_per_model.yaml)": "tsv_m_per_model.yaml",
    "Iso-CTS knobs (iso_cts_per_model.yaml)": "iso_cts_per_model.yaml",
}
TIMED = ["multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "tsv_m", "iso_c", "iso_cts"]


def default_recipe(method: str, base: str, experts: dict[str, str], tasks_yaml: str) -> dict | None:
    """The recipe a user would try first with ``method`` (``evomerge.testing.recipes.default_recipe``);
    data-aware methods calibrate each expert on its own task's search split."""
    from evomerge.methods import get_method
    from evomerge.testing.recipes import default_recipe as first_recipe

    recipe = first_recipe(method, base, list(experts.values()))
    if recipe is not None and get_method(method).calibration:
        recipe["calibration"] = {"tasks": tasks_yaml, "split": "search", "examples": 64,
                                 "model_tasks": {path: [name] for name, path in experts.items()}}
    return recipe


def score_defaults(zoo, work: Path) -> list[tuple]:
    """(method, test aggregate, CI, merge seconds) of every method's default recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.engine import merge_in_memory
    from evomerge.evaluate import Evaluator, load_tasks
    from evomerge.methods import METHODS

    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    evaluator = Evaluator(load_tasks(zoo.tasks_yaml), tokenizer, split="test", bootstrap_iters=1000)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    experts = {name: str(path) for name, path in zoo.experts.items()}
    state = {str(zoo.base): read_weights(zoo.base), **{p: read_weights(p) for p in experts.values()}}
    rows = []
    for label, path in [("base", zoo.base), *[(f"expert: {n}", p) for n, p in experts.items()],
                        ("multi-task reference", zoo.multitask)]:
        model.load_state_dict(read_weights(path), strict=False)
        result = evaluator.evaluate(model)
        rows.append((label, result.aggregate, result.ci, None))
    for method in METHODS:
        recipe = default_recipe(method, str(zoo.base), experts, str(zoo.tasks_yaml))
        if recipe is None:
            continue
        t0 = time.perf_counter()
        merged = merge_in_memory(recipe, state, device="cpu", model_dirs={p: p for p in state},
                                 statistics_cache=work / "statistics")
        seconds = time.perf_counter() - t0
        model.load_state_dict(merged, strict=False)
        result = evaluator.evaluate(model)
        rows.append((method, result.aggregate, result.ci, seconds))
        print(f"{method:18s} test {result.aggregate:.4f} merge {seconds:.2f}s", flush=True)
    return rows


def run_searches(size: str, trials: int, work: Path) -> list[tuple]:
    """(label, winner's test aggregate, CI, search seconds, winner trial) per search space."""
    import yaml

    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    rows = []
    for label, space in SEARCHES.items():
        out = work / f"search-{Path(space).stem}"
        shutil.rmtree(out, ignore_errors=True)
        cfg_path = work / f"{Path(space).stem}.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "name": f"methods-bench-{Path(space).stem}", "zoo": {"size": size, "seed": 0},
            "search_space": str(SPACES / space), "budget": {"trials": trials}, "sampler": {"name": "tpe"},
            "pruner": {"name": "none"}, "output_dir": str(out), "device": "cpu", "export_checkpoint": False,
        }))
        t0 = time.perf_counter()
        run = SearchRun(load_config(cfg_path))
        run.run()
        searched = time.perf_counter() - t0
        summary = finalize(run, export_checkpoint=False, log=lambda m: None)
        winner = summary.rows[0]
        rows.append((label, winner.aggregate, winner.ci, searched, summary.winner_trial))
        print(f"{label}: winner test {winner.aggregate:.4f} (trial {summary.winner_trial}) in {searched:.0f} s",
              flush=True)
    return rows


def merge_times(work: Path) -> list[tuple]:
    """(method, evomerge s, RSS, mergekit s or None, RSS) on the ~170M bf16 Llamas of merge_speed.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import yaml
    from merge_speed import build_models, timed

    from evomerge.methods import get_method

    paths = build_models(work)
    bindir = Path(sys.executable).parent
    rows = []
    for method in TIMED:
        spec = get_method(method)
        recipe = default_recipe(method, str(paths["base"]), {"a": str(paths["ft0"]), "b": str(paths["ft1"])}, "")
        recipe["dtype"] = "bfloat16"
        file = work / f"methods-{method}.yaml"
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        ours, theirs = work / f"out-evomerge-{method}", work / f"out-mergekit-{method}"
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
        t_ours, rss_ours = timed([str(bindir / "evomerge"), "merge", str(file), str(ours), "--device", "cpu"])
        t_mk = rss_mk = None
        if spec.in_mergekit:
            t_mk, rss_mk = timed([str(bindir / "mergekit-yaml"), str(file), str(theirs)])
        rows.append((method, t_ours, rss_ours, t_mk, rss_mk))
        print(f"{method:14s} evomerge {t_ours:6.1f}s | mergekit {t_mk if t_mk is None else round(t_mk, 1)}", flush=True)
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
    return rows


def timing_table(times: list[tuple]) -> list[str]:
    """Markdown lines of ``merge_times``'s rows."""
    lines = ["## Merge time, three ~170M bf16 Llamas (base + 2 fine-tunes; merge_speed.py's models)", "",
             "Both tools on the CPU in fresh processes (`evomerge merge`, `mergekit-yaml`), `dtype: bfloat16`,",
             "each method's default recipe as above; wudi (400 Adam steps per matrix, 32000 × 768 embeddings",
             "included) is left out on the CPU.", "",
             "| method | evomerge s | evomerge peak RSS MiB | mergekit s | mergekit peak RSS MiB |",
             "|---|---:|---:|---:|---:|"]
    for method, t, r, tm, rm in times:
        lines.append(f"| {method} | {t:.1f} | {r:.0f} | {'—' if tm is None else f'{tm:.1f}'} | "
                     f"{'—' if rm is None else f'{rm:.0f}'} |")
    return lines


def read_weights(model_dir) -> dict:
    """Every tensor of a safetensors model directory."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--timing", action="store_true", help="also time merges of ~170M bf16 Llamas (minutes)")
    ap.add_argument("--timing-only", action="store_true", help="only the merge times (a separate table)")
    ap.add_argument("--work", default="/tmp/evomerge-methods-bench")
    ap.add_argument("--timing-work", default="/tmp/evomerge-merge-bench")
    ap.add_argument("--out", default="results/bench/methods.md")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from evomerge.zoo import build_zoo

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.timing_only:
        t0 = time.perf_counter()
        text = "\n".join(timing_table(merge_times(Path(args.timing_work)))) + "\n"
        text += f"\nCommand: `python benchmarks/methods_bench.py --timing-only` ({time.perf_counter() - t0:.0f} s).\n"
        print(text)
        Path(args.out).write_text(text)
        return
    zoo = build_zoo(size=args.size, seed=0, progress=False)
    t0 = time.perf_counter()
    defaults = score_defaults(zoo, work)
    searches = [] if args.skip_search else run_searches(args.size, args.trials, work)
    times = merge_times(Path(args.timing_work)) if args.timing else []
    total = time.perf_counter() - t0

    command = f"python benchmarks/methods_bench.py --size {args.size} --trials {args.trials}" + (
        " --skip-search" if args.skip_search else "") + (" --timing" if args.timing else "")
    lines = [
        "# Merge methods: defaults, searched recipes and merge time",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU, shared with other jobs. Date: {datetime.date.today()}.",
        f"Zoo: `{args.size}` (seed 0; {len(zoo.experts)} experts). Command: `{command}` ({total:.0f} s in all).",
        "Test split, aggregate over the zoo's tasks, bootstrap 95% CI (1000 resamples). Default recipes:",
        "weight 1.0 and density 0.5 per expert where the method takes them, every other parameter at its",
        "default; slerp t = 0.5 and nearswap t = 1e-4 with the first expert; nuslerp with the first two;",
        "regmean and fisher calibrated on each expert's own task (search split, 64 examples).",
        "",
        "| model | test aggregate | 95% CI | merge s |",
        "|---|---:|---|---:|",
    ]
    for label, value, ci, seconds in defaults:
        lines.append(f"| {label} | {value:.4f} | {fmt_ci(ci)} | {'' if seconds is None else f'{seconds:.2f}'} |")
    if searches:
        lines += ["", f"## Searched ({args.trials} trials, TPE, no pruner; winner by validation, scored on test)", "",
                  "| search | winner test aggregate | 95% CI | search s | winner trial |", "|---|---:|---|---:|---:|"]
        for label, value, ci, seconds, trial in searches:
            lines.append(f"| {label} | {value:.4f} | {fmt_ci(ci)} | {seconds:.0f} | {trial} |")
    if times:
        lines += ["", *timing_table(times)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
