"""Search quality on a suite of zoos that differ in what makes merging hard, not only the demo.

For each zoo of the suite (``evomerge.zoo.ZooVariant``: the base knows the tasks or not; 2, 4, 6 or 8
experts; one task per expert or overlapping pairs; float32 or bf16; zoo seeds), on the test split with
bootstrap 95% CIs:

- the base, the best single expert, every method's default merge (the best of them is the baseline a
  search must beat), and the multi-task reference (the ceiling);
- the winner of one search run at each budget in ``--budgets``: the first B trials of the run, its top-k
  by search score re-ranked on the validation split, exactly as ``evomerge search`` finalizes; read off
  one run, since a sampler does not know the budget;
- the share of the gap from the best default to the reference that the winner closes.

Zoos marked ``unseen`` are never used to choose defaults; they are reported apart, as a user's problem.

    python benchmarks/search_quality.py [--suite bench|ci] [--budgets 50,200,1000] [--seeds 0]
        [--only demo,naive] [--set pruner.name=none --set search_metric=proxy ...] [--label TEXT]
        [--out results/bench/search_quality.md] [--json FILE]

``--set`` overrides keys of the run config every case uses (``DEFAULT_RUN`` below: what a user gets
with no settings besides the search space), so one command compares a setting across the suite.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from evomerge.zoo import ZooVariant, build_zoo, default_zoo_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One zoo of the suite."""

    name: str
    size: str
    seed: int
    variant: ZooVariant
    unseen: bool = False
    adapters: bool = False  # the experts are the zoo's LoRA adapters (evomerge.zoo_adapters), not full fine-tunes

    def describe(self) -> str:
        v = self.variant
        n = len(v.families(self.size))
        kind = "LoRA experts" if self.adapters else "experts"
        return (f"{n} {kind}, {'overlapping pairs' if v.overlap else 'one task each'}, base "
                f"{'knows' if v.base_knows_tasks else 'never saw'} the tasks, {v.dtype}, zoo seed {self.seed}")


SUITES = {
    "bench": [
        Case("demo", "small", 0, ZooVariant()),
        Case("naive", "small", 0, ZooVariant(base_knows_tasks=False)),
        Case("e2", "small", 0, ZooVariant(experts=2)),
        Case("e8", "small", 0, ZooVariant(experts=8)),
        Case("overlap", "small", 0, ZooVariant(overlap=True)),
        Case("bf16", "small", 0, ZooVariant(dtype="bfloat16")),
        Case("unseen-e8-naive", "small", 1, ZooVariant(experts=8, base_knows_tasks=False), unseen=True),
        Case("unseen-e6-overlap-naive-bf16", "small", 2,
             ZooVariant(experts=6, overlap=True, base_knows_tasks=False, dtype="bfloat16"), unseen=True),
        Case("unseen-lora", "small", 0, ZooVariant(), unseen=True, adapters=True),
    ],
    # what CI can afford: tiny zoos, small budgets (tests/test_search_quality.py runs one case)
    "ci": [
        Case("tiny", "tiny", 0, ZooVariant()),
        Case("tiny-naive-e4", "tiny", 0, ZooVariant(experts=4, base_knows_tasks=False), unseen=True),
    ],
}

# The run config of every case, before --set: the search space and what a user gets by default.
DEFAULT_RUN = {
    "search_space": str(ROOT / "search_spaces" / "regmean_per_layer.yaml"),
    "top_k": 5,
}

# Each method's default merge (weight 1 per expert; the usual density; the subspace and data-aware
# methods' own defaults), the baselines a search must beat. Data-aware methods calibrate each expert on
# the search split of its own tasks (never validation or test).
DEFAULT_MERGES = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "della": {"weight": 1.0, "density": 0.5},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.5},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
    "regmean": {},
}
NO_BASE = {"linear", "regmean"}  # methods that merge the experts alone
DATA_AWARE = {"regmean"}


@dataclass
class Score:
    value: float
    ci: tuple[float, float] | None

    def cell(self) -> str:
        ci = f" [{self.ci[0]:.3f}, {self.ci[1]:.3f}]" if self.ci else ""
        return f"{self.value:.3f}{ci}"


@dataclass
class CaseResult:
    case: Case
    baselines: dict[str, Score]
    best_default: str
    best_expert: str
    winners: dict[int, dict] = field(default_factory=dict)  # budget -> {trial, test, validation, share, ...}
    search_s: float = 0.0
    trials_s: float = 0.0


# ---------------------------------------------------------------------------------------------------
def _score(result) -> Score:
    return Score(result.aggregate, tuple(result.ci) if result.ci else None)


def default_methods() -> list[str]:
    """The methods of DEFAULT_MERGES this evomerge has."""
    from evomerge.methods import METHODS

    return [m for m in DEFAULT_MERGES if m in METHODS]


def default_recipe(method: str, zoo) -> dict:
    """The recipe of `method` at its default merge over every expert of `zoo` (a data-aware method calibrates
    each expert on its own tasks, by the rule a search uses: ``evomerge.calibration.own_tasks``)."""
    from evomerge.calibration import own_tasks

    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": e, **({"parameters": dict(DEFAULT_MERGES[method])} if DEFAULT_MERGES[method] else {})}
                         for e in zoo.experts]}
    if method not in NO_BASE:
        recipe["base_model"] = "base"
    if method in DATA_AWARE:
        recipe["calibration"] = {"tasks": str(zoo.tasks_yaml), "split": "search", "examples": 64,
                                 "model_tasks": own_tasks({e: e for e in zoo.experts}, zoo.variant.families(zoo.size))}
    return recipe


def lora_zoo(zoo, cache_dir: Path):
    """`zoo` with each expert replaced by its LoRA adapter merged into the base (PEFT ``merge_and_unload``,
    saved once under `cache_dir`): the same tensors a merge of the adapters reads, as full checkpoints for
    ``baselines``."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evomerge.zoo_adapters import build_adapters

    out = {}
    for name, adapter in build_adapters(zoo).items():
        out[name] = cache_dir / f"{zoo.root.name}-lora-merged" / name
        if not out[name].is_dir():
            staging = out[name].with_name(name + ".partial")
            base = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
            PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(staging)
            zoo.tokenizer().save_pretrained(staging)
            staging.rename(out[name])
    return dataclasses.replace(zoo, experts=out)


def baselines(zoo, cache: Path) -> dict[str, Score]:
    """Test-split scores with CIs of the base, each expert, each default merge and the reference (cached)."""
    if cache.exists():
        data = json.loads(cache.read_text())
        if set(data) >= {f"default:{m}" for m in default_methods()}:
            return {k: Score(v["value"], tuple(v["ci"]) if v["ci"] else None) for k, v in data.items()}
    from transformers import AutoModelForCausalLM

    from evomerge.engine import merge_in_memory
    from evomerge.evaluate import Evaluator

    ev = Evaluator(zoo.tasks_yaml, zoo.tokenizer(), split="test", batch_size=64, bootstrap_iters=1000, seed=0)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    out: dict[str, Score] = {}
    base = load(zoo.base)
    out["base"] = _score(ev.evaluate(base))
    states = {"base": base.state_dict()}
    for name, path in zoo.experts.items():
        m = load(path)
        out[f"expert:{name}"] = _score(ev.evaluate(m))
        states[name] = m.state_dict()
    work = copy.deepcopy(base)
    dirs = {"base": zoo.base, **zoo.experts}
    for method in default_methods():
        merged = merge_in_memory(default_recipe(method, zoo), states, seed=0, model_dirs=dirs,
                                 statistics_cache=cache.parent / "statistics") if method in DATA_AWARE else \
            merge_in_memory(default_recipe(method, zoo), states, seed=0)
        work.load_state_dict(merged)
        out[f"default:{method}"] = _score(ev.evaluate(work))
    out["reference"] = _score(ev.evaluate(load(zoo.multitask)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: {"value": v.value, "ci": v.ci} for k, v in out.items()}, indent=1))
    return out


def share(winner: float, baseline: float, reference: float) -> float | None:
    """The share of the baseline-to-reference gap that the winner closes (None without a gap)."""
    gap = reference - baseline
    return None if gap <= 1e-9 else (winner - baseline) / gap


def run_case(case: Case, run_overrides: dict, budgets: list[int], seed: int, log, zoo=None,
             cache_dir: Path | None = None) -> CaseResult:
    """Baselines and the winner at each budget for one zoo (built, or `zoo` if given) and one search seed."""
    from evomerge.search.config import RunConfig
    from evomerge.recipe import load_recipe
    from evomerge.search.run import SearchRun
    from evomerge.search.select import select_winner

    zoo = zoo or build_zoo(None, size=case.size, seed=case.seed, variant=case.variant, progress=False)
    cache_dir = cache_dir or default_zoo_dir(case.size, case.seed, case.variant).parent.parent / "bench"
    if case.adapters:
        base_scores = baselines(lora_zoo(zoo, cache_dir), cache_dir / f"{zoo.root.name}-lora.json")
    else:
        base_scores = baselines(zoo, cache_dir / f"{zoo.root.name}.json")
    defaults = {k: v for k, v in base_scores.items() if k.startswith("default:")}
    best_default = max(defaults, key=lambda k: defaults[k].value)
    experts = {k: v for k, v in base_scores.items() if k.startswith("expert:")}
    best_expert = max(experts, key=lambda k: experts[k].value)
    res = CaseResult(case, base_scores, best_default, best_expert)

    with tempfile.TemporaryDirectory(prefix="evomerge-sq-") as tmp:
        data = {**DEFAULT_RUN, **run_overrides, "name": f"sq-{case.name}",
                "zoo": {"size": case.size, "seed": case.seed, "dir": str(zoo.root), **_variant_keys(case.variant),
                        **({"adapters": True} if case.adapters else {})},
                "budget": {"trials": max(budgets)}, "output_dir": tmp, "seed": seed,
                "storage": f"journal:{tmp}/study.journal"}
        cfg = RunConfig.model_validate(data).resolved(ROOT)
        t0 = time.perf_counter()
        run = SearchRun(cfg)
        run.run()
        res.search_s = time.perf_counter() - t0
        trials = run.study.get_trials(deepcopy=False)
        res.trials_s = sum(t.user_attrs.get("build_s", 0) + t.user_attrs.get("eval_s", 0) for t in trials)
        val, test = run.evaluator("validation"), run.evaluator("test")
        cache_val: dict[int, float] = {}

        def validate(t) -> float:
            if t.number not in cache_val:
                run.builder.build(load_recipe(t.user_attrs["recipe"]))
                cache_val[t.number] = val.evaluate(run.builder.model).aggregate
            return cache_val[t.number]

        for budget in budgets:
            sel = select_winner(run.study, cfg.top_k, validate, sum(val.n_examples.values()), within=budget)
            run.builder.build(load_recipe(sel.winner.user_attrs["recipe"]))
            w = _score(test.evaluate(run.builder.model))
            best = defaults[best_default]
            res.winners[budget] = {
                "trial": sel.winner.number, "test": w, "validation": sel.validation, "search": sel.winner.value,
                "share": share(w.value, best.value, base_scores["reference"].value),
                "separated": bool(w.ci and best.ci and w.ci[0] > best.ci[1]),
                "overfit_gap": sel.gap, "widened": sel.widened,
                "pruned": sum(1 for t in trials if t.number < budget and t.state.name == "PRUNED"),
            }
            log(f"  {case.name} seed {seed} @{budget}: winner trial {sel.winner.number} test {w.cell()} "
                f"share {_pct(res.winners[budget]['share'])}")
        run.builder.close()
    return res


def _variant_keys(v: ZooVariant) -> dict:
    keys = {"base_knows_tasks": v.base_knows_tasks, "overlap": v.overlap, "dtype": v.dtype}
    if v.experts is not None:
        keys["experts"] = v.experts
    return keys


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


# ---------------------------------------------------------------------------------------------------
def render(results: dict[int, list[CaseResult]], budgets: list[int], args, wall_s: float) -> str:
    """The markdown report: per-zoo tables and the median shares (tuning zoos and unseen zoos apart)."""
    seeds = sorted(results)
    first = results[seeds[0]]
    lines = [
        f"# Search quality ({args.suite} suite)",
        "",
        f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}; wall time {wall_s / 60:.1f} min.",
        "",
        f"Command: `python benchmarks/search_quality.py {' '.join(sys.argv[1:])}`",
        "",
        f"Run config of every case: `{json.dumps({**DEFAULT_RUN, **_overrides(args)}).replace(str(ROOT) + '/', '')}`; "
        f"search seeds {seeds}. Scores: test split, aggregate over the zoo's tasks (exact match, or accuracy "
        "for multiple choice), bootstrap 95% CI. *Best default*: the best of every method's default merge "
        f"({', '.join(default_methods())}; weight 1, density 0.5, the others' own defaults) on the test split. *Share*: of the gap from the "
        "best default to the multi-task reference, closed by the winner (validation-selected from the top "
        "5 of the first B trials); mean over seeds. *Sep.*: seeds whose winner's CI lies above the best "
        "default's.",
        "",
        "| zoo | base | best expert | best default | winner @" + " | winner @".join(map(str, budgets))
        + " | reference | share @" + " | share @".join(map(str, budgets)) + " | sep. @" + str(budgets[-1]) + " |",
        "|---|" + "---:|" * (3 + 2 * len(budgets) + 2),
    ]
    shares: dict[tuple[bool, int], list[float]] = {}
    for i, r in enumerate(first):
        per_seed = [results[s][i] for s in seeds]
        b = r.baselines
        cells = [f"{r.case.name}{' (unseen)' if r.case.unseen else ''}", b["base"].cell(),
                 f"{b[r.best_expert].cell()} ({r.best_expert.split(':', 1)[1]})",
                 f"{b[r.best_default].cell()} ({r.best_default.split(':', 1)[1]})"]
        for budget in budgets:
            ws = [pr.winners[budget]["test"] for pr in per_seed if budget in pr.winners]
            cells.append(ws[0].cell() if len(ws) == 1 else f"{statistics.mean(w.value for w in ws):.3f}"
                         + f" ({', '.join(f'{w.value:.3f}' for w in ws)})")
        cells.append(b["reference"].cell())
        for budget in budgets:
            ss = [pr.winners[budget]["share"] for pr in per_seed if budget in pr.winners
                  and pr.winners[budget]["share"] is not None]
            mean_share = statistics.mean(ss) if ss else None
            if mean_share is not None:
                shares.setdefault((r.case.unseen, budget), []).append(mean_share)
            cells.append(_pct(mean_share))
        sep = sum(1 for pr in per_seed if pr.winners.get(budgets[-1], {}).get("separated"))
        cells.append(f"{sep}/{len(per_seed)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| zoos | " + " | ".join(f"median share @{b}" for b in budgets) + " |",
              "|---|" + "---:|" * len(budgets)]
    for unseen, label in ((False, "tuning zoos"), (True, "unseen zoos")):
        lines.append(f"| {label} | " + " | ".join(
            _pct(statistics.median(shares[(unseen, b)])) if shares.get((unseen, b)) else "n/a" for b in budgets) + " |")
    lines += ["", "Per zoo: what it is, search time, finalists' search-minus-validation gap and pruned trials "
              f"at {budgets[-1]} trials (first seed).", "",
              "| zoo | what | search wall s | trials' build+eval s | overfit gap | pruned |", "|---|---|---:|---:|---:|---:|"]
    for r in first:
        w = r.winners.get(budgets[-1], {})
        lines.append(f"| {r.case.name} | {r.case.describe()} | {r.search_s:.0f} | {r.trials_s:.0f} | "
                     f"{w.get('overfit_gap', float('nan')):+.3f}{' (widened)' if w.get('widened') else ''} | "
                     f"{w.get('pruned', 0)} |")
    return "\n".join(lines) + "\n"


def _overrides(args) -> dict:
    """The --set options as a nested mapping of run-config keys."""
    out: dict = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="bench")
    ap.add_argument("--budgets", default="50,200,1000")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--set", action="append", help="run-config override KEY=VALUE (dotted keys), repeatable")
    ap.add_argument("--out", default=None, help="markdown report (default: print only)")
    ap.add_argument("--json", default=None, help="raw results as JSON")
    args = ap.parse_args()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    cases = [c for c in SUITES[args.suite] if not args.only or c.name in args.only.split(",")]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    results: dict[int, list[CaseResult]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        results[seed] = [run_case(c, _overrides(args), budgets, seed, log=lambda m: print(m, flush=True))
                         for c in cases]
    report = render(results, budgets, args, time.perf_counter() - t0)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {s: [{"case": r.case.name, "unseen": r.case.unseen, "best_default": r.best_default,
                  "baselines": {k: vars(v) for k, v in r.baselines.items()},
                  "winners": {b: {**w, "test": vars(w["test"])} for b, w in r.winners.items()},
                  "search_s": r.search_s} for r in rs] for s, rs in results.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
