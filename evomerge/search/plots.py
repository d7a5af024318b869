"""PNG plots of a search: optimization history, the winner's per-layer parameters, importances, Pareto front."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
import numpy as np  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.recipe import evaluate_setting  # noqa: E402


def write_plots(run, winner_recipe, out_dir: Path) -> dict[str, str]:
    """Write every plot that applies to this run; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"history": _save(history_figure(run.study), out_dir / "optimization_history.png")}
    if run.space.kind != "moe":  # an MoE candidate has no per-layer merge parameters
        files["layers"] = _save(layers_figure(winner_recipe, run.model_names, run.num_layers, run.space.attn_mlp),
                                out_dir / "winner_layers.png")
    importance = importances_figure(run.study)
    if importance is not None:
        files["importances"] = _save(importance, out_dir / "param_importances.png")
    if run.n_objectives > 1:
        files["pareto"] = _save(pareto_figure(run.study, [t.name for t in run.task_specs]),
                                out_dir / "pareto_front.png")
    return files


def _save(fig, path: Path) -> str:
    """Save ``fig`` as a PNG whole or not at all (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return str(path)


def history_figure(study):
    """Every trial's search score by trial number, the best so far, and where pruned and failed trials fell."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    xs = [t.number for t in complete]
    ys = [t.values[0] if len(t.values) == 1 else float(np.mean(t.values)) for t in complete]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=12, alpha=0.6, label="trial (search split)")
    if ys:
        ax.plot(xs, np.maximum.accumulate(ys), color="C3", label="best so far")
    floor = min(ys) if ys else 0.0
    for state, marker, color in ((TrialState.PRUNED, "x", "gray"), (TrialState.FAIL, "v", "black")):
        numbers = [t.number for t in trials if t.state == state]
        if numbers:
            ax.scatter(numbers, [floor] * len(numbers), marker=marker, color=color, s=14,
                       label=f"{state.name.lower()} ({len(numbers)})")
    ax.set_xlabel("trial")
    ax.set_ylabel("aggregate score" if not complete or len(complete[0].values) == 1 else "mean of objectives")
    ax.set_title("Optimization history")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def layers_figure(recipe, model_names: list[str], num_layers: int, attn_mlp: bool):
    """Winner's per-layer value of every numeric parameter, for MLP and attention tensors: a row per model
    (per-model parameters) or one row for all of them (global ones, such as task arithmetic's lambda)."""
    L = num_layers
    rows = {}  # parameter -> [(row label, setting)]
    for name, m in zip(model_names, recipe.models or []):
        for k, setting in (m.parameters or {}).items():
            rows.setdefault(k, []).append((name, setting))
    for k, setting in (recipe.parameters or {}).items():
        if not isinstance(setting, bool):
            rows.setdefault(k, []).append(("all models", setting))
    params = sorted(rows)
    parts = [("mlp", "model.layers.{i}.mlp.up_proj.weight"), ("attn", "model.layers.{i}.self_attn.q_proj.weight")]
    if not attn_mlp:
        parts = parts[:1]
    heights = [len(rows[p]) for p in params] or [1]
    fig, axes = plt.subplots(len(heights), len(parts), figsize=(4 + 0.35 * L * len(parts), 1.2 + 0.9 * sum(heights)),
                             squeeze=False, gridspec_kw={"height_ratios": [h + 0.8 for h in heights]})
    for pi, pname in enumerate(params):
        for ci, (part, pattern) in enumerate(parts):
            grid = np.full((len(rows[pname]), L), np.nan)
            for ri, (_, setting) in enumerate(rows[pname]):
                for i in range(L):
                    t = i / (L - 1) if L > 1 else 1.0
                    v = evaluate_setting(setting, pattern.format(i=i), t)
                    grid[ri, i] = np.nan if v is None or isinstance(v, bool) else float(v)
            ax = axes[pi][ci]
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(rows[pname])), [label for label, _ in rows[pname]])
            ax.set_xticks(range(L))
            ax.set_xlabel("layer")
            ax.set_title(f"{pname}" + (f" ({part})" if attn_mlp else ""))
            fig.colorbar(im, ax=ax)
            if grid.size <= 160:  # small grids: the values themselves, readable on the colours
                for (r, c), v in np.ndenumerate(grid):
                    if np.isfinite(v):
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white",
                                path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
    fig.suptitle("Winner: per-layer parameters")
    fig.tight_layout()
    return fig


def param_importances(study) -> dict[str, float] | None:
    """PED-ANOVA importances of the searched parameters for a high score (for several objectives, a
    high mean score); None with fewer than four complete trials."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 4:
        return None
    # PED-ANOVA takes a target as lower-is-better (and warns that it does): several objectives are
    # ranked by their negated mean; one objective goes by the study's direction
    target = None if len(complete[0].values) == 1 else (lambda t: -float(np.mean(t.values)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low")
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target)


def importances_figure(study):
    """The PED-ANOVA importances (``param_importances``) as bars, the 25 largest; None with too few trials."""
    imp = param_importances(study)
    if imp is None:
        return None
    items = list(imp.items())[:25][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title("Parameter importances")
    fig.tight_layout()
    return fig


def pareto_figure(study, tasks: list[str]):
    """Every complete trial's per-task search scores, one panel per pair of tasks, the Pareto front (over
    all objectives, so a front point may look dominated in a single panel) highlighted."""
    from itertools import combinations

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    vals = np.array([t.values for t in complete]).reshape(len(complete), len(tasks))
    on = np.array([t.number in front for t in complete], dtype=bool)
    pairs = list(combinations(range(len(tasks)), 2))
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (a, b) in zip(axes.flat, pairs):
        ax.scatter(vals[~on, a], vals[~on, b], s=12, alpha=0.5, label="trial")
        ax.scatter(vals[on, a], vals[on, b], s=24, color="C3", label="Pareto front")
        ax.set_xlabel(tasks[a])
        ax.set_ylabel(tasks[b])
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(f"Pareto front over {len(tasks)} objectives (search split)")
    fig.tight_layout()
    return fig
