"""Each expert's routing prompts: its own ``positive_prompts`` / ``negative_prompts``, plus, for an expert
with ``tasks``, the calibration texts (prompt + gold answer) of those tasks from ``calibration``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.calibration import Calibration, CalibrationError, calibration_texts
from evomerge.moe.config import MoeConfig, MoeError


@dataclass(frozen=True)
class ExpertPrompts:
    """The texts that should (positive) and should not (negative) be routed to one expert."""

    positive: list[str]
    negative: list[str]


def expert_prompts(cfg: MoeConfig) -> list[ExpertPrompts]:
    """One ExpertPrompts per routed expert, in config order (empty lists for data-free configs)."""
    task_texts: dict[str, list[str]] = {}
    with_tasks = {f"experts[{i}]": e.tasks for i, e in enumerate(cfg.experts) if e.tasks}
    if with_tasks:
        cal = Calibration(tasks=cfg.calibration.tasks, split=cfg.calibration.split,
                          examples=cfg.calibration.examples, model_tasks=with_tasks)
        try:
            task_texts = calibration_texts(cal, list(with_tasks), Path(cfg.calibration.tasks).parent,
                                           where="calibration")
        except CalibrationError as e:
            raise MoeError(str(e)) from None
    return [ExpertPrompts(positive=list(e.positive_prompts or []) + task_texts.get(f"experts[{i}]", []),
                          negative=list(e.negative_prompts or []))
            for i, e in enumerate(cfg.experts)]
