"""Re-plan a candidate recipe in microseconds: the engine's plan with only the parameter values redone.

A search's recipes share one *structure* (models, slices, filters, gradient lengths, flags); only
numbers change. The first recipe of a structure is planned in full by ``plan_merge`` with a trace
of where each per-tensor parameter value came from: which recipe scope, evaluated for which
tensor name at which gradient position t. A later recipe of the same structure re-evaluates each
distinct (scope, parameter, tensor, t) once with the engine's own ``evaluate_setting`` and
scatters the values to per-tensor tables: the numbers ``plan_merge`` would give. The values are
checked with the method's own ``check_params`` once per distinct row of parameters; on any
problem the recipe is planned in full, which raises the engine's error message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.engine import MergePlan, plan_merge
from evomerge.recipe import Recipe, coerce, evaluate_setting


def structure_signature(recipe: Recipe) -> str:
    """The recipe with every number inside ``parameters`` replaced by '#': equal for recipes that plan alike."""

    def walk(node: Any, in_parameters: bool) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, in_parameters or k == "parameters") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, in_parameters) for v in node]
        if in_parameters and isinstance(node, (int, float)) and not isinstance(node, bool):
            return "#"
        return node

    return json.dumps(walk(recipe.model_dump(mode="json"), False), sort_keys=True)


def scope_at(recipe: Recipe, path: tuple) -> Any:
    """The object at ``path`` (attribute names and list indices) inside ``recipe``."""
    node: Any = recipe
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    return node


@dataclass
class Lookup:
    """One distinct value to evaluate per recipe: ``evaluate_setting(scope[name], tensor, t)``."""

    path: tuple
    name: str
    tensor: str
    t: float


class PlanTemplate:
    """The traced plan of one recipe structure; ``values(recipe)`` gives every tensor's parameters."""

    def __init__(self, recipe: Recipe, readers: dict[str, Any]):
        self.signature = structure_signature(recipe)
        records: list[tuple] = []
        self.plan: MergePlan = plan_merge(recipe, readers=readers,
                                          trace=lambda *record: records.append(record))
        self.method = self.plan.method
        self.specs = {spec.name: spec for spec in self.method.params}
        self.task_index = {task.name: i for i, task in enumerate(self.plan.tasks)}
        slots = max((len(task.inputs) for task in self.plan.tasks), default=0)
        self.model_params = [n for n, spec in self.specs.items() if spec.per_model]
        self.global_params = [n for n, spec in self.specs.items() if not spec.per_model]
        # index tables into the per-recipe value vector; -1: the parameter's default
        n_tasks = len(self.plan.tasks)
        self.model_index = {n: np.full((n_tasks, slots), -1, dtype=np.int64) for n in self.model_params}
        self.global_index = {n: np.full(n_tasks, -1, dtype=np.int64) for n in self.global_params}
        self.lookups: list[Lookup] = []
        seen: dict[tuple, int] = {}
        for out_name, slot, name, path, tensor, t in records:
            task = self.task_index.get(out_name)
            if task is None or path is None:
                continue
            setting = scope_at(recipe, path)[name]
            key = (path, name, t, _filter_outcome(setting, tensor))
            if key not in seen:
                seen[key] = len(self.lookups)
                self.lookups.append(Lookup(path, name, tensor, t))
            if slot is None:
                self.global_index[name][task] = seen[key]
            else:
                self.model_index[name][task, slot] = seen[key]

        # lookups grouped by setting: each setting is fetched from the recipe once
        groups: dict[tuple, list[tuple[int, str, float]]] = {}
        for i, lk in enumerate(self.lookups):
            groups.setdefault((lk.path, lk.name), []).append((i, lk.tensor, lk.t))
        self.groups = [(path, name, self.specs[name], entries) for (path, name), entries in groups.items()]
        # per lookup: the parameter's range, for the vectorized check (bool parameters: any value)
        self.low = np.array([_bound(self.specs[lk.name], "minimum", -np.inf) for lk in self.lookups] + [-np.inf])
        self.high = np.array([_bound(self.specs[lk.name], "maximum", np.inf) for lk in self.lookups] + [np.inf])

        # the distinct rows of value indices (one per kind of tensor): cross-parameter rules run once per row
        rows: dict[tuple, int] = {}
        for i, task in enumerate(self.plan.tasks):
            if task.method == self.method.name:
                k = len(task.inputs)
                key = tuple(int(self.model_index[n][i, j]) for j in range(k) for n in self.model_params) + \
                    tuple(int(self.global_index[n][i]) for n in self.global_params)
                rows.setdefault(key, k)
        self.check_rows = list(rows.items())

    def values(self, recipe: Recipe) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-model [tasks, slots] and global [tasks] float64 tables of ``recipe``'s parameter values.

        Booleans are stored as 0/1. Raises the engine's error (by planning in full) if any value
        is invalid.
        """
        vector = np.empty(len(self.lookups) + 1)
        vector[-1] = 0.0
        for path, name, spec, entries in self.groups:
            setting = scope_at(recipe, path)[name]
            if type(setting) in (float, int):  # a plain number: the same value for every tensor
                vector[[i for i, _, _ in entries]] = coerce(spec, setting)
                continue
            for i, tensor, t in entries:
                value = evaluate_setting(setting, tensor, t)
                vector[i] = coerce(spec, spec.default if value is None else value)
        self._check(recipe, vector)
        model = {}
        for name, index in self.model_index.items():
            vector[-1] = _default(self.specs[name])
            model[name] = vector[index]
        glob = {}
        for name, index in self.global_index.items():
            vector[-1] = _default(self.specs[name])
            glob[name] = vector[index]
        return model, glob

    def _check(self, recipe: Recipe, vector: np.ndarray) -> None:
        """The method's checks on ``recipe``'s values; on a problem, plan in full to raise the engine's message.

        Names, types and which values are missing belong to the structure (the first, full plan
        checked them), so a value can only be out of range or not finite: checked for all values
        at once. The method's cross-parameter rules (``cross_check``) run once per distinct row.
        """
        if not (np.isfinite(vector[:-1]).all() and (vector >= self.low).all() and (vector <= self.high).all()):
            self._raise(recipe)
        if self.method.cross_check is None:
            return
        per_model = len(self.model_params)
        for key, k in self.check_rows:
            def value(position: int, name: str):
                index = key[position]
                return _typed(self.specs[name], vector[index] if index >= 0 else _default(self.specs[name]))
            mps = [{n: value(j * per_model + p, n) for p, n in enumerate(self.model_params)} for j in range(k)]
            params = {n: value(k * per_model + p, n) for p, n in enumerate(self.global_params)}
            if self.method.check_params(mps, params):
                self._raise(recipe)

    def _raise(self, recipe: Recipe) -> None:
        plan_merge(recipe, readers=self.plan.readers)  # raises the engine's message
        raise AssertionError("a value failed the checks but the full plan did not")  # pragma: no cover


def _bound(spec, attribute: str, missing: float) -> float:
    value = getattr(spec, attribute) if spec.type is not bool else None
    return missing if value is None else float(value)


def _filter_outcome(setting: Any, tensor: str) -> tuple:
    """Which conditional filters of ``setting`` match ``tensor`` (empty for plain values)."""
    conds = setting if isinstance(setting, list) else [setting]
    return tuple(getattr(c, "filter", None) in (None, "*") or getattr(c, "filter", "") in tensor
                 for c in conds if hasattr(c, "filter"))


def _default(spec) -> float:
    return float(spec.default) if spec.default is not None else float("nan")


def _typed(spec, value: float):
    return bool(value) if spec.type is bool else float(value)
