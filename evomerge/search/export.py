"""The end of a search: re-rank finalists on validation, report the test split, export the winner.

Selection never looks at the test split: the top-k candidates by search score are re-scored on
the validation split and the best there wins. Then the winner, the default recipe, every single
fine-tune, the base (and the zoo's multi-task reference, when there is one) are scored on the test
split with bootstrap confidence intervals. Written to the run directory:

- ``best_recipe.yaml`` — the winner's recipe (mergekit-compatible);
- ``merged/`` — the winner's checkpoint, written by the engine from that recipe;
- ``trials.csv`` — every trial: state, scores, parameters, durations, failure reasons;
- ``summary.md`` / ``summary.json`` — the test table and where the time went (the whole study, over
  every worker and session, and this process);
- ``plots/`` — optimization history, the winner's per-layer parameters, importances, Pareto front;
- ``report.html`` — all of the above on one self-contained page (``evomerge.report``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.card import ScoreRow
from evomerge.lora import is_adapter_dir
from evomerge.lora.source import mergekit_references
from evomerge.engine import run_merge
from evomerge.recipe import load_recipe
from evomerge.search.run import SearchRun, trial_score
from evomerge.search.select import select_winner


@dataclass
class Summary:
    winner_trial: int
    winner_recipe: str
    rows: list[ScoreRow]
    finalists: list[dict[str, Any]]
    timing: dict[str, float]
    counts: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)
    selection: str = ""  # the finalists' search-minus-validation gap, and whether it widened the selection


def _row(label: str, result, validation: float | None = None) -> ScoreRow:
    return ScoreRow(label, result.aggregate, result.ci, dict(result.per_task), validation)


def _method_baselines(run: SearchRun, test, log) -> list:
    """Test rows of the data-free and data-aware method defaults (``search.baselines``); a baseline that
    cannot merge these models is skipped with a log line."""
    from evomerge.engine import STATISTICS_CACHE_NAME
    from evomerge.recipe import RecipeError
    from evomerge.search.baselines import BASELINE_METHODS, baseline_recipe, build_into

    rows = []
    names = [t.name for t in run.task_specs]
    for method in BASELINE_METHODS:
        try:
            recipe = baseline_recipe(method, run.inputs.base_model, run.inputs.models, run.inputs.tasks, names)
            if recipe is None:
                continue
            build_into(run.builder, recipe, run.out / STATISTICS_CACHE_NAME)
        except (RecipeError, ValueError) as e:
            log(f"baseline {method} skipped: {e}")
            continue
        rows.append(_row(f"{method} defaults (no search)", test.evaluate(run.builder.model)))
    return rows


def _peft_baselines(run: SearchRun, test, log) -> list:
    """Test rows of PEFT's ``add_weighted_adapter`` merges when every model is a LoRA adapter (else none)."""
    from evomerge.search.baselines import peft_merged_models
    from evomerge.search.builder import DTYPES

    if not all(is_adapter_dir(p) for p in run.inputs.models.values()):
        return []
    try:
        return [_row(label, test.evaluate(model)) for label, model in peft_merged_models(
            run.inputs.base_model, run.inputs.models, DTYPES[run.cfg.dtype], run.builder.device)]
    except (ValueError, RuntimeError) as e:  # e.g. PEFT refusing adapters of different ranks or types
        log(f"PEFT baselines skipped: {e}")
        return []


def finalize(run: SearchRun, *, export_checkpoint: bool = True, log=print) -> Summary:
    """Re-rank on validation, score baselines on test, write every report file; returns the summary."""
    t0 = time.perf_counter()
    study, cfg, out, builder = run.study, run.cfg, run.out, run.builder
    log(f"re-ranking the top {cfg.top_k} candidates on the validation split")
    val = run.evaluator("validation")

    def validate(t) -> float:
        builder.build(run.space.load_candidate(t.user_attrs["recipe"], where=f"trial {t.number}"))
        return val.evaluate(builder.model).aggregate

    selection = select_winner(study, cfg.top_k, validate, sum(val.n_examples.values()))
    log(selection.describe())
    ranked, winner, winner_val = selection.ranked, selection.winner, selection.validation
    winner_recipe = run.space.load_candidate(winner.user_attrs["recipe"], where=f"trial {winner.number}")

    log("scoring the winner and the baselines on the test split")
    test = run.evaluator("test")
    rows = []
    builder.build(winner_recipe)
    rows.append(_row(f"winner (trial {winner.number})", test.evaluate(builder.model), winner_val))
    builder.build(run.recipe_for(run.default_point))
    first = {"dataflow": "identity flow of the base (first trial)", "moe": "MoE at the space's defaults (first trial)"}
    rows.append(_row(first.get(run.space.kind, f"default recipe ({run.space.method})"), test.evaluate(builder.model)))
    if run.space.kind in ("parameters", "moe"):  # dense merges of the same models by the methods' defaults
        rows += _method_baselines(run, test, log)
        rows += _peft_baselines(run, test, log)
    for name, path in run.inputs.models.items():
        builder.load_model_weights(path)
        kind = "adapter" if is_adapter_dir(path) else "fine-tune"
        rows.append(_row(f"{kind}: {name}", test.evaluate(builder.model)))
    builder.load_model_weights(None)
    rows.append(_row("base", test.evaluate(builder.model)))
    if run.inputs.reference:
        from evomerge.checkpoint import ModelReader

        builder.readers.setdefault(run.inputs.reference, ModelReader(run.inputs.reference))
        builder.load_model_weights(run.inputs.reference)
        rows.append(_row("multi-task reference", test.evaluate(builder.model)))

    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if run.space.kind == "moe":  # the `evomerge moe` config that rebuilds it, and the atomic MoE writer
        from evomerge.moe.space import export_winner

        log("writing the winner's MoE config" + (f" and checkpoint to {out / 'merged'}" if export_checkpoint else ""))
        files, text = export_winner(run, winner_recipe, rows, checkpoint=export_checkpoint)
        export_checkpoint = False
    else:
        files = {"recipe": str(out / "best_recipe.yaml")}
        winner_recipe = mergekit_references(winner_recipe)  # adapters as base+adapter, which mergekit reads
        text = winner_recipe.to_yaml()
        write_atomic(out / "best_recipe.yaml", text)
    if export_checkpoint:
        log(f"writing the merged checkpoint to {out / 'merged'}")
        card = search_card(run, winner_recipe, rows, counts, winner.number, winner_val, len(ranked))
        run_merge(winner_recipe, out / "merged", device=builder.device, seed=cfg.seed, overwrite=True, card=card)
        files["checkpoint"] = str(out / "merged")
    files["trials"] = str(write_trials_csv(study, out / "trials.csv"))
    if cfg.sampler.name == "cmaes":  # trials finished after their generation moved on (many workers)
        from evomerge.search.workers import cmaes_discarded, cmaes_popsize

        counts["CMAES_DISCARDED"] = cmaes_discarded(study.get_trials(deepcopy=False),
                                                    cmaes_popsize(cfg.sampler.popsize, len(run.distributions)))
    timing = {"setup_s": run.stats.setup_s, "first_build_s": run.stats.first_build_s,
              "build_s": run.stats.build_s, "eval_s": run.stats.eval_s,
              "finalize_s": time.perf_counter() - t0,
              "trials_this_process": len(run.stats.trials),
              **{f"study_{k}": v for k, v in study_timing(study).items()}}
    summary = Summary(winner.number, text, rows,
                      [{"trial": t.number, "search": trial_score(t), "validation": v} for t, v in ranked],
                      timing, counts, files, selection.describe())
    try:
        from evomerge.search.plots import write_plots

        files.update(write_plots(run, winner_recipe, out / "plots"))
    except Exception as e:  # plots are a convenience; never lose a finished search over one
        log(f"warning: plots failed: {type(e).__name__}: {e}")
    summary.timing["finalize_s"] = time.perf_counter() - t0
    write_atomic(out / "summary.md", render_summary(run, summary))
    write_atomic(out / "summary.json", json.dumps(_jsonable(summary), indent=2))
    files["summary"] = str(out / "summary.md")
    try:
        from evomerge.report import write_report

        files["report"] = str(write_report(out))
    except Exception as e:  # like the plots: a convenience, never worth losing a finished search over
        log(f"warning: report.html failed: {type(e).__name__}: {e}")
    return summary


def search_card(run: SearchRun, recipe, rows: list[ScoreRow], counts: dict[str, int], winner: int, winner_val: float,
                n_finalists: int) -> str:
    """The winner's model card: the recipe, how the search found it (space, sampler, trials, selection) and
    the test table beside the baselines (``evomerge.card``)."""
    import yaml

    from evomerge.card import merge_facts, render_card, task_metrics

    space, cfg = run.space, run.cfg
    how = [f"Found by an evomerge search (`{cfg.name}`): method "
           f"`{space.method}`, granularity `{space.granularity}`, {len(run.distributions)} searched dimensions; "
           f"Optuna sampler `{cfg.sampler.name}`; {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} "
           f"pruned and {counts.get('FAIL', 0)} failed trials, each candidate merged in memory and scored on the "
           f"tasks' search split ({cfg.objectives} objective{'s' if run.n_objectives > 1 else ''}).",
           f"The top {n_finalists} candidates were re-scored on the validation split; trial {winner} won there "
           f"({winner_val:.3f}). The test split below was never used for selection.",
           "The search space:\n\n```yaml\n" + yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False).rstrip()
           + "\n```"]
    layers = (sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
              if recipe.slices else run.num_layers)  # a data-flow winner's own depth
    return render_card(merge_facts(recipe, num_layers=layers, seed=cfg.seed, how=how, results=rows,
                                   metrics=task_metrics(run.task_specs)))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file beside it, then a rename), so an
    interrupted finalize never leaves a truncated file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def append_section(path: Path, markdown: str) -> None:
    """Add a section at the end of a report (whole or not at all, like ``write_atomic``)."""
    write_atomic(path, path.read_text().rstrip("\n") + "\n\n" + markdown.strip("\n") + "\n")


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """Every trial of the study: number, state, value(s), per-task scores, durations, params, why it failed,
    and for a pruned trial where it stopped (examples per task scored, running score there)."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({p for t in trials for p in t.params})
    tasks = sorted({k for t in trials for k in (t.user_attrs.get("scores") or {})})
    header = ["number", "state", "value", *[f"score:{k}" for k in tasks], "build_s", "eval_s", "duration_s",
              "default", "fail_reason", "pruned_at_examples", "pruned_at_score", *params]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(header)
    for t in trials:
        scores = t.user_attrs.get("scores") or {}
        pruned = t.user_attrs.get("pruned_at") or {}  # examples per task seen and the running score
        value = "" if t.values is None else (t.values[0] if len(t.values) == 1 else
                                             sum(t.values) / len(t.values))
        duration = "" if t.duration is None else round(t.duration.total_seconds(), 3)
        w.writerow([t.number, t.state.name, value, *[scores.get(k, "") for k in tasks],
                    t.user_attrs.get("build_s", ""), t.user_attrs.get("eval_s", ""), duration,
                    bool(t.user_attrs.get("default")), t.user_attrs.get("fail_reason", ""),
                    pruned.get("examples", ""), pruned.get("score", ""), *[t.params.get(p, "") for p in params]])
    write_atomic(path, f.getvalue())
    return path


def study_timing(study: optuna.Study) -> dict[str, float]:
    """Where the whole study's time went, over every process and session that ran its trials.

    From what each finished trial records: its build and evaluation seconds (``build_s``,
    ``eval_s``) and its duration (ask to tell); the rest of a duration is the sampler, the storage
    and decoding the recipe. The first build of each process (``first_build``: compiling the merge
    kernels, or loading them from the cache, and planning) is a one-off, counted apart from merging. ``wall_s`` spans the first trial's start to the last one's end (with
    several workers, or pauses between sessions, it differs from the sum of durations).
    """
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state.is_finished() and t.datetime_start is not None and t.datetime_complete is not None]
    first = sum(float(t.user_attrs.get("build_s", 0.0)) for t in trials if t.user_attrs.get("first_build"))
    build = sum(float(t.user_attrs.get("build_s", 0.0)) for t in trials if not t.user_attrs.get("first_build"))
    evaluate = sum(float(t.user_attrs.get("eval_s", 0.0)) for t in trials)
    durations = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    wall = ((max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
            if trials else 0.0)
    workers = {t.user_attrs.get("worker") for t in trials if t.user_attrs.get("worker")}
    return {"trials": len(trials), "workers": len(workers), "wall_s": wall, "trial_s": durations,
            "first_build_s": first, "build_s": build, "eval_s": evaluate,
            "other_s": max(durations - first - build - evaluate, 0.0)}


def _fmt_ci(row: ScoreRow) -> str:
    return "" if row.ci is None else f"[{row.ci[0]:.3f}, {row.ci[1]:.3f}]"


def render_summary(run: SearchRun, s: Summary) -> str:
    """summary.md: the test table, the finalists, and where the time went."""
    tasks = list(s.rows[0].per_task)
    lines = [f"# evomerge search: {run.cfg.name}", "",
             f"Method `{run.space.method}`, granularity `{run.space.granularity}`"
             + (f" (blocks of {run.space.block_size})" if run.space.granularity == "block" else "")
             + (", attention and MLP separately" if run.space.attn_mlp else "")
             + f"; sampler `{run.cfg.sampler.name}`; {len(run.distributions)} searched dimensions.",
             f"Trials: {s.counts.get('COMPLETE', 0)} complete, {s.counts.get('PRUNED', 0)} pruned, "
             f"{s.counts.get('FAIL', 0)} failed."
             + (f" CMA-ES learned nothing from {s.counts['CMAES_DISCARDED']} complete trials that finished after "
                f"their generation had moved on (more workers than its population: docs/distributed.md)."
                if s.counts.get("CMAES_DISCARDED") else ""), "",
             "## Test split (never used for selection)", "",
             "| model | aggregate | 95% CI | " + " | ".join(tasks) + " |",
             "|---|---:|---|" + "---:|" * len(tasks)]
    for r in s.rows:
        lines.append(f"| {r.label} | {r.aggregate:.3f} | {_fmt_ci(r)} | "
                     + " | ".join(f"{r.per_task.get(t, float('nan')):.3f}" for t in tasks) + " |")
    lines += ["", "## Finalists (selection on the validation split)", "", "| trial | search | validation |",
              "|---:|---:|---:|"]
    for f in s.finalists:
        mark = " **winner**" if f["trial"] == s.winner_trial else ""
        lines.append(f"| {f['trial']}{mark} | {f['search']:.3f} | {f['validation']:.3f} |")
    lines += ["", s.selection] if s.selection else []
    t = s.timing
    lines += _study_time_lines(t)
    searched = t["build_s"] + t["eval_s"]
    lines += ["", "## This process", "",
              "| phase | seconds | share of search |", "|---|---:|---:|",
              f"| setup (zoo build if not cached, load models, task vectors, order statistics) | {t['setup_s']:.1f} | |",
              f"| first build (one-off: compile or load the merge kernels, plan) | {t['first_build_s']:.1f} | |",
              f"| merging candidates | {t['build_s']:.1f} | {100 * t['build_s'] / max(searched, 1e-9):.0f}% |",
              f"| evaluating candidates (search split) | {t['eval_s']:.1f} | "
              f"{100 * t['eval_s'] / max(searched, 1e-9):.0f}% |",
              f"| finalize (validation, test, export) | {t['finalize_s']:.1f} | |", "",
              f"Trials run by this process: {t['trials_this_process']}.", "",
              "## Winner's recipe", "", "```yaml", s.winner_recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def _study_time_lines(t: dict[str, float]) -> list[str]:
    """The whole study's share of merging, evaluating and the rest (``study_timing``), as markdown."""
    total = max(t["study_trial_s"], 1e-9)
    workers = int(t["study_workers"])
    return ["", "## Where the time went (the whole study)", "",
            f"{int(t['study_trials'])} finished trials by {workers} worker process{'es' if workers != 1 else ''}, "
            f"first start to last end {_duration(t['study_wall_s'])}; "
            f"{t['study_trial_s'] / max(t['study_trials'], 1):.2f} s per trial.", "",
            "| phase | seconds | share of trial time |", "|---|---:|---:|",
            f"| first build of each process (one-off: compile or load the merge kernels, plan) | "
            f"{t['study_first_build_s']:.1f} | {100 * t['study_first_build_s'] / total:.0f}% |",
            f"| merging candidates | {t['study_build_s']:.1f} | {100 * t['study_build_s'] / total:.0f}% |",
            f"| evaluating candidates (search split) | {t['study_eval_s']:.1f} | "
            f"{100 * t['study_eval_s'] / total:.0f}% |",
            f"| sampler, storage, recipe decoding | {t['study_other_s']:.1f} | "
            f"{100 * t['study_other_s'] / total:.0f}% |"]


def _duration(seconds: float) -> str:
    """'1 h 02 min', '3 min 05 s' or '12.3 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def export_trial(run_dir: str | Path, out_dir: str | Path, *, trial: int | None = None, storage: str | None = None,
                 study_name: str | None = None, device: str = "auto", seed: int | None = None,
                 overwrite: bool = False) -> Path:
    """Re-export a recorded trial of a run (default: the winner in summary.json) as a checkpoint."""
    import yaml

    from evomerge.search.study import make_storage

    run_dir = Path(run_dir)
    cfg_path = run_dir / "run_config.yaml"
    saved = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not saved and storage is None:
        raise FileNotFoundError(f"{run_dir}: not a search run directory (no run_config.yaml)")
    storage_obj = make_storage(storage or saved.get("storage"), run_dir)
    name = study_name or saved.get("study_name") or saved.get("name")
    study = optuna.load_study(study_name=name, storage=storage_obj)
    if trial is None:
        summary = run_dir / "summary.json"
        if not summary.is_file():
            raise FileNotFoundError(f"{run_dir}: no summary.json yet; pass --trial N")
        trial = json.loads(summary.read_text())["winner_trial"]
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
    if not matches:
        raise ValueError(f"{run_dir}: study '{name}' has no trial {trial}")
    t = matches[0]
    if "recipe" not in t.user_attrs:
        raise ValueError(f"{run_dir}: trial {trial} has no recorded recipe (state {t.state.name})")
    if "gate_mode" in yaml.safe_load(t.user_attrs["recipe"]):  # a ``kind: moe`` candidate, not a merge recipe
        raise ValueError(f"{run_dir}: trial {trial} is an MoE candidate (search space kind moe): `evomerge finalize` "
                         f"exports the winner, and `evomerge moe {run_dir}/best_moe.yaml OUT` rebuilds it")
    recipe = load_recipe(t.user_attrs["recipe"], where=f"{run_dir} trial {trial}")
    seed = saved.get("seed", 0) if seed is None else seed
    from evomerge.card import merge_facts, render_card
    from evomerge.engine import plan_merge

    plan = plan_merge(recipe)
    score = "" if t.values is None else f", search-split score {trial_score(t):.4f}"
    card = render_card(merge_facts(recipe, num_layers=plan.num_layers, seed=seed, how=[
        f"Trial {trial} of the evomerge search in `{run_dir}` (study `{name}`, state {t.state.name}{score}), "
        "re-exported with `evomerge export`."]))
    return run_merge(plan, out_dir, device=device, seed=seed, overwrite=overwrite, card=card)
