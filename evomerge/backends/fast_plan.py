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
from numba import njit

from evomerge.engine import MergePlan, plan_merge
from evomerge.recipe import Conditional, Recipe, coerce, evaluate_setting


def structure_signature(recipe: Recipe) -> str:
    """The recipe with every number inside ``parameters`` replaced by '#': equal for recipes that plan alike.

    A recipe whose producer already knows its structure (``SearchSpace.to_recipe``: every point
    of a space decodes to the same structure) carries it (``Recipe.stamp_structure``) and skips
    the walk.
    """
    stamped = recipe.stamped_structure()
    if stamped is not None:
        return stamped

    def walk(node: Any, in_parameters: bool) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, in_parameters or k == "parameters") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, in_parameters) for v in node]
        if in_parameters and isinstance(node, (int, float)) and not isinstance(node, bool):
            return "#"
        return node

    data = recipe.model_dump(mode="json")
    data.pop("name", None)  # a label: recipes that differ only in name plan alike
    return json.dumps(walk(data, False), sort_keys=True)


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
        # index tables into the per-recipe value vector; -1 until resolved to the parameter's default slot
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

        # the value vector: one entry per lookup, then each parameter's default, then a 0 (``zero_slot``)
        n = len(self.lookups)
        self.default_slot = {name: n + j for j, name in enumerate(self.specs)}
        self.zero_slot = n + len(self.specs)
        self.defaults = np.array([_default(spec) for spec in self.specs.values()] + [0.0])
        for name, index in (*self.model_index.items(), *self.global_index.items()):
            index[index < 0] = self.default_slot[name]

        # lookups grouped by setting: each setting is fetched from the recipe once
        groups: dict[tuple, list[tuple[int, str, float]]] = {}
        for i, lk in enumerate(self.lookups):
            groups.setdefault((lk.path, lk.name), []).append((i, lk.tensor, lk.t))
        self._plan_gather(recipe, groups)
        # per lookup: the parameter's range, for the vectorized check (bool parameters: any value)
        self.low = np.array([_bound(self.specs[lk.name], "minimum", -np.inf) for lk in self.lookups])
        self.high = np.array([_bound(self.specs[lk.name], "maximum", np.inf) for lk in self.lookups])

        # the distinct rows of value indices (one per kind of tensor): cross-parameter rules run once per row
        rows: dict[tuple, int] = {}
        for i, task in enumerate(self.plan.tasks):
            if task.method == self.method.name:
                k = len(task.inputs)
                key = tuple(int(self.model_index[n][i, j]) for j in range(k) for n in self.model_params) + \
                    tuple(int(self.global_index[n][i]) for n in self.global_params)
                rows.setdefault(key, k)
        self.check_rows = list(rows.items())
        # the same rows as (row, input) pairs: per parameter, where its value sits in the vector
        per_model = len(self.model_params)
        pairs = [(key, k, j) for key, k in self.check_rows for j in range(k)]
        self.pair_model = {n: np.array([key[j * per_model + p] for key, k, j in pairs], dtype=np.int64)
                           for p, n in enumerate(self.model_params)}
        self.pair_global = {n: np.array([key[k * per_model + p] for key, k, j in pairs], dtype=np.int64)
                            for p, n in enumerate(self.global_params)}

    def vector(self, recipe: Recipe) -> np.ndarray:
        """``recipe``'s checked value vector (float64, booleans as 0/1), laid out for the index tables.

        ``model_index[name]`` [tasks, slots] and ``global_index[name]`` [tasks] index it; entries a
        recipe leaves unset point at the parameter's default. Raises the engine's error (by
        planning in full) if any value is invalid.
        """
        n = len(self.lookups)
        vector = np.empty(n + len(self.defaults))
        vector[n:] = self.defaults
        numbers: list = []
        for path, name, routes in self.gathered:
            setting = scope_at(recipe, path)[name]
            for route in routes:
                leaf = _leaf(setting, route)
                if type(leaf) is list:
                    numbers.extend(leaf)
                else:
                    numbers.append(leaf)
        vector[self.fixed_target] = self.fixed_values
        for path, name, spec, entries in self.evaluated:
            setting = scope_at(recipe, path)[name]
            for i, tensor, t in entries:
                value = evaluate_setting(setting, tensor, t)
                vector[i] = coerce(spec, spec.default if value is None else value)
        x = np.array(numbers, dtype=np.float64)
        if not _interpolate_and_check(x, self.target, self.src0, self.src1, self.frac, vector, self.low, self.high):
            self._raise(recipe)
        self._cross_check(recipe, vector)
        return vector

    def _plan_gather(self, recipe: Recipe, groups: dict[tuple, list[tuple[int, str, float]]]) -> None:
        """How ``vector`` reads each setting: numeric ones gathered and interpolated at once, others one by one.

        A number or a list of numbers (a gradient), possibly inside the conditional entry that
        matches the tensor, is gathered into one array with every other such leaf; each lookup
        is then ``(1 − f)·x[i₀] + f·x[i₁]``, ``evaluate_setting``'s interpolation with its
        structural i₀, i₁ and f (a number is a one-entry gradient: x·1 + x·0 = x). Lookups with
        no matching entry take the default. Booleans belong to the structure (the signature keeps
        them), so they are evaluated once, here. Anything else is evaluated per lookup with
        ``evaluate_setting``.
        """
        self.gathered, self.evaluated = [], []
        target, src0, src1, frac, fixed_target, fixed_values = [], [], [], [], [], []
        offset = 0
        for (path, name), entries in groups.items():
            spec = self.specs[name]
            setting = scope_at(recipe, path)[name]
            if spec.type is bool:
                values = [evaluate_setting(setting, tensor, t) for _, tensor, t in entries]
                if all(isinstance(v, bool) or v is None for v in values):  # kept by the signature: fixed
                    fixed_target += [i for i, _, _ in entries]
                    fixed_values += [coerce(spec, spec.default if v is None else v) for v in values]
                else:  # numbers where booleans belong: evaluated per recipe (the engine refuses them)
                    self.evaluated.append((path, name, spec, entries))
                continue
            routes = {i: _route(setting, tensor) for i, tensor, _ in entries}
            leaves = {r: _leaf(setting, r) for r in set(routes.values()) if r is not None}
            if not all(_numeric_leaf(v) for v in leaves.values()) or (
                    None in routes.values() and spec.default is None):
                self.evaluated.append((path, name, spec, entries))
                continue
            start = {}
            for r, leaf in leaves.items():
                start[r] = offset
                offset += len(leaf) if type(leaf) is list else 1
            for i, _, t in entries:
                r = routes[i]
                if r is None:  # no conditional entry matches: the default
                    fixed_target.append(i)
                    fixed_values.append(coerce(spec, spec.default))
                    continue
                length = len(leaves[r]) if type(leaves[r]) is list else 1
                scaled = t * (length - 1)
                i0 = int(scaled)
                target.append(i)
                src0.append(start[r] + i0)
                src1.append(start[r] + min(length - 1, i0 + 1))
                frac.append(scaled - i0)
            self.gathered.append((path, name, list(leaves)))
        self.target, self.src0, self.src1 = (np.array(v, dtype=np.int64) for v in (target, src0, src1))
        self.frac = np.array(frac, dtype=np.float64)
        self.fixed_target = np.array(fixed_target, dtype=np.int64)
        self.fixed_values = np.array(fixed_values, dtype=np.float64)

    def values(self, recipe: Recipe) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-model [tasks, slots] and global [tasks] float64 tables of ``recipe``'s parameter values."""
        vector = self.vector(recipe)
        return ({name: vector[index] for name, index in self.model_index.items()},
                {name: vector[index] for name, index in self.global_index.items()})

    def _cross_check(self, recipe: Recipe, vector: np.ndarray) -> None:
        """The method's cross-parameter rules, once per distinct row; on a problem, plan in full to raise.

        Names, types and which values are missing belong to the structure (the first, full plan
        checked them); ranges and finiteness are checked for all values at once
        (``_interpolate_and_check``).
        """
        if self.method.cross_check is None:
            return
        if self.method.cross_check_arrays is not None:  # every row at once
            model = {n: vector[index] for n, index in self.pair_model.items()}
            glob = {n: vector[index] for n, index in self.pair_global.items()}
            if self.method.cross_check_arrays(model, glob):
                self._raise(recipe)
            return
        per_model = len(self.model_params)
        for key, k in self.check_rows:
            def value(position: int, name: str):
                return _typed(self.specs[name], vector[key[position]])
            mps = [{n: value(j * per_model + p, n) for p, n in enumerate(self.model_params)} for j in range(k)]
            params = {n: value(k * per_model + p, n) for p, n in enumerate(self.global_params)}
            if self.method.cross_check(mps, params):  # names, types and ranges are already checked
                self._raise(recipe)

    def _raise(self, recipe: Recipe) -> None:
        plan_merge(recipe, readers=self.plan.readers)  # raises the engine's message
        raise AssertionError("a value failed the checks but the full plan did not")  # pragma: no cover


@njit(cache=True, nogil=True)
def _interpolate_and_check(x, target, src0, src1, frac, vector, low, high) -> bool:
    """vector[target] = (1 − f)·x[src0] + f·x[src1] (``evaluate_setting``'s float64 arithmetic), then
    whether every looked-up value (the first ``len(low)``) is finite and within [low, high]."""
    for j in range(target.shape[0]):
        f = frac[j]
        vector[target[j]] = (1 - f) * x[src0[j]] + f * x[src1[j]]
    for i in range(low.shape[0]):
        v = vector[i]
        if not (np.isfinite(v) and low[i] <= v <= high[i]):
            return False
    return True


def _route(setting: Any, tensor: str) -> tuple | None:
    """Where ``evaluate_setting`` finds ``tensor``'s value in ``setting``: () itself, (k,) the k-th
    conditional entry (the first whose filter matches), None if no entry matches."""
    if isinstance(setting, Conditional) or (isinstance(setting, list) and setting and isinstance(setting[0], Conditional)):
        conds = setting if isinstance(setting, list) else [setting]
        for k, cond in enumerate(conds):
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor:
                return (k,)
        return None
    return ()


def _leaf(setting: Any, route: tuple) -> Any:
    """The value ``route`` (from ``_route``) points at."""
    if not route:
        return setting
    conds = setting if isinstance(setting, list) else [setting]
    return conds[route[0]].value


def _numeric_leaf(value: Any) -> bool:
    """A number, or a non-empty list of numbers (booleans are not numbers here)."""
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


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
