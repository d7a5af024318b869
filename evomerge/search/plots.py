"""PNG plots of a search: optimization history, the winner's per-layer parameters, importances, Pareto front."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.recipe import evaluate_setting  # noqa: E402


def write_plots(run, winner_recipe, out_dir: Path) -> dict[str, str]:
    """Write every plot that applies to this run; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"history": _history(run.study, out_dir / "optimization_history.png"),
             "layers": _layer_heatmap(run, winner_recipe, out_dir / "winner_layers.png")}
    importance = _importances(run.study, out_dir / "param_importances.png")
    if importance:
        files["importances"] = importance
    if run.n_objectives > 1:
        files["pareto"] = _pareto(run, out_dir / "pareto_front.png")
    return files


def _save(fig, path: Path) -> None:
    """Save ``fig`` as a PNG whole or not at all (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _history(study, path: Path) -> str:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    xs = [t.number for t in trials]
    ys = [t.values[0] if len(t.values) == 1 else float(np.mean(t.values)) for t in trials]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=12, alpha=0.6, label="trial (search split)")
    if ys:
        ax.plot(xs, np.maximum.accumulate(ys), color="C3", label="best so far")
    pruned = [t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED]
    if pruned and ys:
        ax.scatter(pruned, [min(ys)] * len(pruned), marker="x", color="gray", s=12, label="pruned")
    ax.set_xlabel("trial")
    ax.set_ylabel("aggregate score")
    ax.set_title("Optimization history")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return str(path)


def _layer_heatmap(run, recipe, path: Path) -> str:
    """Winner's per-layer value of every per-model parameter, for MLP and attention tensors."""
    L = run.num_layers
    names = list(run.inputs.models)
    params = sorted({k for m in recipe.models or [] for k in (m.parameters or {})})
    parts = [("mlp", "model.layers.{i}.mlp.up_proj.weight"), ("attn", "model.layers.{i}.self_attn.q_proj.weight")]
    if not run.space.attn_mlp:
        parts = parts[:1]
    fig, axes = plt.subplots(len(params) or 1, len(parts), figsize=(4 + 0.35 * L * len(parts), 1.2 + 1.1 * len(names) * max(1, len(params))),
                             squeeze=False)
    for pi, pname in enumerate(params):
        for ci, (part, pattern) in enumerate(parts):
            grid = np.full((len(names), L), np.nan)
            for mi, m in enumerate(recipe.models):
                setting = (m.parameters or {}).get(pname)
                if setting is None:
                    continue
                for i in range(L):
                    t = i / (L - 1) if L > 1 else 1.0
                    v = evaluate_setting(setting, pattern.format(i=i), t)
                    grid[mi, i] = np.nan if v is None else float(v)
            ax = axes[pi][ci]
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(names)), names)
            ax.set_xticks(range(L))
            ax.set_xlabel("layer")
            ax.set_title(f"{pname}" + (f" ({part})" if run.space.attn_mlp else ""))
            fig.colorbar(im, ax=ax)
    fig.suptitle("Winner: per-layer parameters per model")
    fig.tight_layout()
    _save(fig, path)
    return str(path)


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


def _importances(study, path: Path) -> str | None:
    imp = param_importances(study)
    if imp is None:
        return None
    items = list(imp.items())[:25][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title("Parameter importances")
    fig.tight_layout()
    _save(fig, path)
    return str(path)


def _pareto(run, path: Path) -> str:
    """Every complete trial's per-task search scores, one panel per pair of tasks, the Pareto front (over
    all objectives, so a front point may look dominated in a single panel) highlighted."""
    from itertools import combinations

    study = run.study
    tasks = [t.name for t in run.task_specs]
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
    _save(fig, path)
    return str(path)
