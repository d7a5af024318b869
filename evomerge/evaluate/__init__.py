"""Scoring: task specs and splits, native batched scorers, the lm-eval adapter, aggregation.

    tasks = load_tasks("tasks.yaml")                      # validates everything, reads all data
    ev = Evaluator(tasks, tokenizer, split="search")       # tokenizes / loads each task once
    res = ev.evaluate(model)                               # EvalResult: aggregate, per_task, ci, ...
    for seen, running in ev.evaluate_chunks(model, 64):    # for pruning; ev.last_result at the end
        ...

Splits: `search` is what a search optimizes, `validation` re-ranks finalists, `test` is only
for final reports. The aggregate is higher-is-better; see `metrics.py` for lower-is-better metrics.
"""

from .data import SPLITS, Example, TaskError
from .evaluator import EvalResult, Evaluator, RunningScore, TaskResult
from .report import evaluate_model_dir, render_table, write_result_json
from .spec import (
    GenerateTask,
    LmEvalTask,
    LoglikelihoodTask,
    MultipleChoiceTask,
    TaskSpec,
    load_tasks,
)

__all__ = [
    "SPLITS",
    "EvalResult",
    "Evaluator",
    "Example",
    "GenerateTask",
    "LmEvalTask",
    "LoglikelihoodTask",
    "MultipleChoiceTask",
    "RunningScore",
    "TaskError",
    "TaskResult",
    "TaskSpec",
    "evaluate_model_dir",
    "load_tasks",
    "render_table",
    "write_result_json",
]
