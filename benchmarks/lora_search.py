"""A LoraHub-style weight search over LoRA adapters: evomerge's CMA-ES (scalings, nothing dense) vs nevergrad's
NGOpt on the same objective, beside the base, each adapter, the default merge and PEFT's `cat` and `ties`.

Adapters: rank-16 LoRA extractions (``extract_lora(..., lora_only=True)``) of the demo zoo's experts.
Objective: the search split's aggregate score of the merge base + Σ wᵢ·ΔWᵢ, wᵢ in [-1.5, 1.5], all
starting at 0 (``search_spaces/lora_hub_per_model.yaml``, run config ``lora_scalings: true``); each
searched winner is then scored on the test split, as are the fixed merges.

    python benchmarks/lora_search.py [--size tiny] [--budgets 40 150] [--out results/bench/lora_search.md]

NGOpt needs nevergrad (``pip install nevergrad``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RANK = 16


def make_run(zoo, adapters: dict[str, str], out: Path, budget: int, seed: int):
    from evomerge.search.config import load_config
    from evomerge.search.run import SearchRun

    cfg = {"name": "lora-bench", "base_model": str(zoo.base), "models": adapters, "tasks": str(zoo.tasks_yaml),
           "search_space": str(ROOT / "search_spaces" / "lora_hub_per_model.yaml"), "budget": {"trials": budget},
           "lora_scalings": True, "sampler": {"name": "cmaes"}, "start": "default", "pruner": {"name": "none"},
           "output_dir": str(out), "device": "cpu", "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    return SearchRun(load_config(out / "run.yaml"))


def score(run, split: str) -> float:
    return run.evaluator(split).evaluate(run.builder.model).aggregate


def cmaes(run) -> tuple[float, float, float]:
    """(best search score, its test score, seconds) of evomerge's own search."""
    t0 = time.perf_counter()
    run.run()
    seconds = time.perf_counter() - t0
    best = run.study.best_trial
    run.builder.build(run.recipe_for(best.params))
    return best.value, score(run, "test"), seconds


def ngopt(run, budget: int, seed: int) -> tuple[float, float, float]:
    """The same objective minimised by nevergrad's NGOpt from 0."""
    import nevergrad as ng

    names = list(run.distributions)
    param = ng.p.Array(init=[0.0] * len(names), lower=-1.5, upper=1.5)
    param.random_state.seed(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)

    def objective(x):
        run.builder.build(run.recipe_for(dict(zip(names, map(float, x)))))
        return -score(run, "search")

    t0 = time.perf_counter()
    recommendation = optimizer.minimize(objective)
    seconds = time.perf_counter() - t0
    best = -objective(recommendation.value)
    return best, score(run, "test"), seconds


def peft_merges(run) -> dict[str, float]:
    """Test scores of PEFT's add_weighted_adapter merges with weights 1 (the search report's PEFT baselines)."""
    from evomerge.search.baselines import peft_merged_models

    return {label: run.evaluator("test").evaluate(model).aggregate for label, model in
            peft_merged_models(run.inputs.base_model, run.inputs.models, torch.float32, run.builder.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--budgets", type=int, nargs="+", default=[40, 150])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from evomerge.lora.extract import extract_lora
    from evomerge.zoo import build_zoo

    zoo = build_zoo(None, size=args.size, seed=0, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    adapters = {name: str(extract_lora(path, zoo.base, tmp / "adapters" / name, rank=RANK, lora_only=True).path)
                for name, path in zoo.experts.items()}
    rows = []
    first = make_run(zoo, adapters, tmp / "fixed", 1, args.seed)
    first.builder.load_model_weights(None)
    rows.append(("base", None, score(first, "test"), None))
    for name, path in adapters.items():
        first.builder.load_model_weights(path)
        rows.append((f"adapter {name} alone", None, score(first, "test"), None))
    first.builder.build(first.recipe_for({k: 1.0 for k in first.distributions}))
    rows.append(("task arithmetic, weights 1 (= PEFT cat)", None, score(first, "test"), None))
    rows += [(label, None, value, None) for label, value in peft_merges(first).items()]
    for budget in args.budgets:
        run = make_run(zoo, adapters, tmp / f"cma{budget}", budget, args.seed)
        best, test, seconds = cmaes(run)
        rows.append((f"evomerge CMA-ES, {budget} trials", best, test, seconds))
        run = make_run(zoo, adapters, tmp / f"ng{budget}", 1, args.seed)
        best, test, seconds = ngopt(run, budget, args.seed)
        rows.append((f"nevergrad NGOpt, {budget} evaluations", best, test, seconds))
        print(rows[-2], rows[-1], flush=True)
    table = ["| merge | best search score | test score | search time (s) |", "|---|---:|---:|---:|"]
    table += [f"| {label} | {'' if s is None else f'{s:.3f}'} | {t:.3f} | {'' if sec is None else f'{sec:.1f}'} |"
              for label, s, t, sec in rows]
    text = "\n".join([
        "# LoRA adapter weight search (LoraHub-style): evomerge vs NGOpt vs PEFT's merges", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), shared with other jobs while this ran, torch "
        f"{torch.__version__}. Date: {datetime.date.today()}. Command: `python benchmarks/lora_search.py --size "
        f"{args.size} --budgets {' '.join(map(str, args.budgets))}`. Zoo `{args.size}` (seed 0); adapters: rank-{RANK} "
        f"extractions of its {len(adapters)} experts (`extract-lora --lora-only`); weights in [-1.5, 1.5] from 0; "
        f"both searches score the search split, the winner is shown on the test split.", "", *table, ""])
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
