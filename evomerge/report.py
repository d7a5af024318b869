"""``evomerge report``: one self-contained HTML page of what a search did and found.

Everything is read from the run directory (``run_config.yaml``, the study in its storage and, once
the search has finalized, ``summary.json``), so the page can be refreshed while a search runs and
is written at the end of every search. Charts are matplotlib PNGs embedded as base64 ``data:`` URIs
and the style sheet is inline: the file opens offline, has no script, and can be mailed around.

Sections: the test table with confidence intervals (winner, default recipe, each fine-tune, base,
reference), the optimization history with pruned and failed trials, the winner's per-layer
parameters, parameter importances, the Pareto front (multi-objective runs), the finalists on the
validation split, where the time went, the run config and the winner's recipe.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from evomerge.search.combined import STAGE_DIR  # noqa: E402

REPORT_NAME = "report.html"


@dataclass
class RunData:
    """What the report reads from a run directory."""

    run_dir: Path
    config: dict[str, Any]
    study: optuna.Study
    summary: dict[str, Any] | None  # summary.json, once the search has finalized

    @property
    def multi_objective(self) -> bool:
        return len(self.study.directions) > 1


def load_run(run_dir: str | Path) -> RunData:
    """The run's saved config, its study (read from the run's storage) and summary.json if written yet."""
    from evomerge.search.study import make_storage

    run_dir = Path(run_dir)
    cfg_path = run_dir / "run_config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a search run directory (no run_config.yaml)")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    name = config.get("study_name") or config.get("name")
    study = optuna.load_study(study_name=name, storage=make_storage(config.get("storage"), run_dir))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return RunData(run_dir, config, study, summary)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the run's report and write it whole or not at all (default ``RUN_DIR/report.html``)."""
    data = load_run(run_dir)
    path = Path(out) if out is not None else data.run_dir / REPORT_NAME
    page = render_report(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------- the page
def render_report(data: RunData) -> str:
    """The whole HTML page: a header, then one section per chart or table that applies to the run."""
    sections = [_status(data)]
    if data.summary:
        sections.append(_test_section(data.summary))
    stage2 = data.run_dir / STAGE_DIR / "summary.json"  # a combined run's data-flow stage (search.combined)
    if data.summary and stage2.is_file():
        sections.append(_test_section(json.loads(stage2.read_text()), key="dataflow-test",
                                      title=f"Stage 2: data-flow search over the winner ({STAGE_DIR}/), test split"))
    sections.append(_chart_section("history", "Optimization history", _history(data),
                                   "Search-split score of every trial; pruned and failed trials at the bottom."))
    recipe = _winner_recipe(data)
    layers = _layers(data, recipe) if recipe is not None else None
    if layers is not None:
        sections.append(_chart_section("layers", "Winner's per-layer parameters", layers,
                                       "One heatmap per parameter: a row per model, a column per layer."))
    importances = _importances(data)
    if importances is not None:
        sections.append(_chart_section("importances", "Parameter importances", importances,
                                       "PED-ANOVA: which searched parameters matter most for a high score."))
    if data.multi_objective and any(t.state == TrialState.COMPLETE for t in data.study.get_trials(deepcopy=False)):
        sections.append(_chart_section("pareto", "Pareto front", _pareto(data),
                                       "Per-task search scores in every pair of tasks."))
    if data.summary and data.summary.get("finalists"):
        sections.append(_finalists_section(data.summary))
    sections.append(_time_section(data))
    sections.append(_text_section("config", "Run config", yaml.safe_dump(data.config, sort_keys=False)))
    if recipe is not None:
        label = "Winner's recipe (mergekit-compatible)" if data.summary else "Best recipe so far (search split)"
        sections.append(_text_section("recipe", label, recipe.to_yaml()))
    title = f"evomerge search: {data.config.get('name', data.run_dir.name)}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;background:#fff}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}tr.winner{font-weight:bold;background:#fff6d6}
figure.chart{margin:.5em 0}figure.chart img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em}pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}
.status{background:#eef5ff;padding:.6em .9em;border-radius:4px}
"""


def _png(fig) -> str:
    """A figure as a base64 PNG data URI (the figure is closed)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _chart_section(key: str, title: str, fig, caption: str, extra: str = "") -> str:
    return (f"<section id=\"{key}\"><h2>{html.escape(title)}</h2>{extra}"
            f"<figure class=\"chart\" data-chart=\"{key}\"><img alt=\"{html.escape(title)}\" src=\"{_png(fig)}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure></section>")


def _text_section(key: str, title: str, text: str) -> str:
    return f"<section id=\"{key}\"><h2>{html.escape(title)}</h2><pre>{html.escape(text.rstrip())}</pre></section>"


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    classes = classes or [""] * len(rows)
    body = "".join(f"<tr class=\"{cls}\">" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for cls, r in zip(classes, rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {s.name: sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}


def _status(data: RunData) -> str:
    """One paragraph: finalized or still running, trials by state, the budget, the method."""
    c = _counts(data.study)
    budget = (data.config.get("budget") or {}).get("trials")
    method = data.study.user_attrs.get("method", "?")
    sampler = (data.config.get("sampler") or {}).get("name", "?")
    state = ("Finalized: the winner was chosen on the validation split and scored on the test split."
             if data.summary else "Not finalized yet (search running or stopped): no test scores; "
             "refresh with <code>evomerge report RUN_DIR</code>.")
    dims = len(data.study.user_attrs.get("distributions") or [])
    return (f"<p class=\"status\">{state}<br>Method <b>{html.escape(method)}</b>, sampler "
            f"<b>{html.escape(sampler)}</b>, {dims} searched dimensions; trials: {c['COMPLETE']} complete, "
            f"{c['PRUNED']} pruned, {c['FAIL']} failed, {c['RUNNING']} running"
            + (f", budget {budget}" if budget else "") + ".</p>")


# ---------------------------------------------------------------------------------------- test table
def _ci(row: dict) -> str:
    return "" if not row.get("ci") else f"[{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"


def _test_section(summary: dict, key: str = "test", title: str = "Test split (never used for selection)") -> str:
    """The test split's table and the same as a chart: each model's aggregate with its 95% CI."""
    rows = summary["rows"]
    tasks = list(rows[0]["per_task"])
    table = _table(["model", "aggregate", "95% CI", *tasks],
                   [[r["label"], f"{r['aggregate']:.3f}", _ci(r), *[f"{r['per_task'].get(t, float('nan')):.3f}"
                                                                   for t in tasks]] for r in rows],
                   ["winner" if r["label"].startswith("winner") else "" for r in rows])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.3))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        color = "C3" if r["label"].startswith("winner") else "C0"
        lo, hi = (r["ci"] if r.get("ci") else (r["aggregate"], r["aggregate"]))
        ax.errorbar(r["aggregate"], y, xerr=[[r["aggregate"] - lo], [hi - r["aggregate"]]], fmt="o", color=color,
                    capsize=4)
    ax.set_yticks(ys, [r["label"] for r in rows])
    ax.set_xlabel("aggregate score on the test split (95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _chart_section(key, title, fig,
                          "The winner (red) beside the default recipe, each fine-tune, the base and the reference.",
                          extra=table)


# ---------------------------------------------------------------------------------------- charts
def _history(data: RunData):
    from evomerge.search.plots import history_figure

    return history_figure(data.study)


def _winner_recipe(data: RunData):
    """The winner's recipe (summary.json), else the best complete trial's so far; None before any."""
    from evomerge.recipe import load_recipe
    from evomerge.search.run import best_trials

    from evomerge.recipe import RecipeError

    best = best_trials(data.study, 1)
    if data.summary:
        text, where = data.summary["winner_recipe"], f"{data.run_dir}/summary.json"
    elif best and "recipe" in best[0].user_attrs:
        text, where = best[0].user_attrs["recipe"], f"trial {best[0].number}"
    else:
        return None
    try:
        return load_recipe(text, where=where)
    except RecipeError:  # not a merge recipe: an MoE search's candidate (evomerge/moe/space.py)
        return None


def _layers(data: RunData, recipe):
    """The per-layer heatmap of ``recipe``; None when the base model's layer count cannot be read."""
    from evomerge.checkpoint import ModelReader
    from evomerge.search.plots import layers_figure
    from evomerge.search.space import load_space

    try:
        num_layers = ModelReader(recipe.base_model).num_layers
        attn_mlp = load_space(data.config["search_space"]).attn_mlp
    except Exception:  # models moved or deleted since the search: the page goes without this chart
        return None
    if not num_layers or not recipe.models:
        return None
    return layers_figure(recipe, [Path(m.model).name for m in recipe.models], num_layers, attn_mlp)


def _importances(data: RunData):
    from evomerge.search.plots import importances_figure

    return importances_figure(data.study)


def _pareto(data: RunData):
    from evomerge.search.plots import pareto_figure

    first = next(t for t in data.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
    return pareto_figure(data.study, list(first.user_attrs.get("scores") or
                                          [f"objective {i}" for i in range(len(first.values))]))


def _finalists_section(summary: dict) -> str:
    """The top candidates by search score and their validation score, which picked the winner."""
    fin = summary["finalists"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = range(len(fin))
    ax.bar([x - 0.2 for x in xs], [f["search"] for f in fin], width=0.4, label="search split")
    ax.bar([x + 0.2 for x in xs], [f["validation"] for f in fin], width=0.4, label="validation split")
    ax.set_xticks(list(xs), [f"trial {f['trial']}" + (" (winner)" if f["trial"] == summary["winner_trial"] else "")
                             for f in fin])
    ax.set_ylabel("aggregate score")
    ax.legend(loc="lower right")
    fig.tight_layout()
    table = _table(["trial", "search", "validation"],
                   [[str(f["trial"]), f"{f['search']:.3f}", f"{f['validation']:.3f}"] for f in fin],
                   ["winner" if f["trial"] == summary["winner_trial"] else "" for f in fin])
    return _chart_section("finalists", "Finalists (selection on the validation split)", fig,
                          "The top candidates by search score, re-scored on the validation split: "
                          "the best there wins.", extra=table)


def _time_section(data: RunData) -> str:
    """Where the whole study's trial time went (every worker and session), from what each trial records."""
    from evomerge.search.export import study_timing

    t = study_timing(data.study)
    phases = {"first build of each process (one-off compile)": t["first_build_s"], "merging candidates": t["build_s"],
              "evaluating (search split)": t["eval_s"], "sampler, storage, recipe": t["other_s"]}
    if data.summary:
        phases["finalize (validation, test, export)"] = data.summary["timing"].get("finalize_s", 0.0)
    phases = {k: v for k, v in phases.items() if v > 0}
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(phases), 1) + 1.2))
    names = list(phases)[::-1]
    ax.barh(names, [phases[k] for k in names], color="C2")
    for y, k in enumerate(names):
        ax.text(phases[k], y, f" {phases[k]:.1f} s", va="center")
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(phases.values(), default=1.0) * 1.25)
    fig.tight_layout()
    text = (f"<p>{t['trials']} finished trials by {t['workers']} worker process(es); "
            f"first start to last end {t['wall_s']:.1f} s; {t['trial_s'] / max(t['trials'], 1):.2f} s per trial.</p>")
    return _chart_section("time", "Where the time went", fig,
                          "Summed over every trial of the study (all workers and sessions); finalize from this run's "
                          "summary.", extra=text)
