"""Evaluate a model directory end to end, and present an EvalResult (rich table, JSON file)."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluator import EvalResult, Evaluator
from .spec import load_tasks


def _fmt(x: float | None) -> str:
    """A metric value with 4 significant decimals."""
    return "-" if x is None else f"{x:.4f}"


def render_table(result: EvalResult):
    """A rich Table: one row per task (metric, value, 95% CI, score, weight, n) and the aggregate."""
    from rich.table import Table

    table = Table(title=f"evaluation ({result.split} split)")
    for col, justify in [("task", "left"), ("kind", "left"), ("metric", "left"), ("value", "right"),
                         ("95% CI", "right"), ("score", "right"), ("weight", "right"), ("n", "right")]:
        table.add_column(col, justify=justify)
    for r in result.tasks.values():
        ci = f"[{_fmt(r.ci[0])}, {_fmt(r.ci[1])}]" if r.ci else "-"
        arrow = "↑" if r.higher_is_better else "↓"
        table.add_row(r.name, r.kind, f"{r.metric} {arrow}", _fmt(r.value), ci, _fmt(r.score),
                      f"{r.weight:g}", str(r.n_examples))
    ci = f"[{_fmt(result.ci[0])}, {_fmt(result.ci[1])}]" if result.ci else "-"
    table.add_section()
    table.add_row("aggregate", "", "weighted mean of scores", "", ci, _fmt(result.aggregate), "",
                  str(sum(result.n_examples.values())))
    return table


def write_result_json(result: EvalResult, path: str | Path, **extra) -> Path:
    """Write the result (plus `extra` keys) as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, **result.to_dict()}, indent=2) + "\n", encoding="utf-8")
    return path


def evaluate_model_dir(
    model_dir: str | Path,
    tasks_path: str | Path,
    *,
    split: str = "test",
    device: str | None = None,
    batch_size: int = 32,
    out_json: str | Path | None = None,
) -> EvalResult:
    """Load a local HF model directory (safetensors only) and score it on `split` of a task file.

    Tasks are validated and tokenized before the model is loaded, so bad input fails fast.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    specs = load_tasks(tasks_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    evaluator = Evaluator(specs, tokenizer, split=split, batch_size=batch_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=False, use_safetensors=True
    ).to(device).eval()
    result = evaluator.evaluate(model)
    if out_json is not None:
        write_result_json(result, out_json, model_dir=str(model_dir), tasks=str(tasks_path))
    return result
