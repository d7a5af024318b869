"""The reference backend: every method, tensor by tensor, through ``evomerge.methods`` (what ``evomerge merge`` runs).

Each output tensor is computed from the resident inputs by the engine's own kernels with the
same float32 operations as ``engine.compute_tensor``. For the task-arithmetic family the
per-tensor statistics that never change between candidates are computed once and kept: the
stable ranks of |δᵢ| (a TIES or breadcrumbs mask is then one comparison per element), DELLA's
row ranks and the DARE/DELLA random fields (``random_field(seed, tensor, model)``: a
candidate's mask depends only on its density, common random numbers).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from evomerge.backends.base import Backend, BuildStats
from evomerge.backends.memory import resident_bytes
from evomerge.engine import MergePlan, TensorTask
from evomerge.methods import della_ranks, flat_ranks, random_field
from evomerge.methods.registry import EPSILON, GAMMA
from evomerge.methods.task_arithmetic import merge_task_vectors
from evomerge.recipe import Recipe


class TensorStatistics(NamedTuple):
    """What ``merge_task_vectors`` takes per input besides δ (None where the rule needs none)."""

    flat_ranks: torch.Tensor | None = None  # stable ranks of |δ| (TIES, breadcrumbs)
    ranks: torch.Tensor | None = None  # DELLA's row ranks
    field: torch.Tensor | None = None  # the random field (DARE, DELLA)


NO_STATISTICS = TensorStatistics()


class ReferenceBackend(Backend):
    """Tensor by tensor through the reference kernels (see the module docstring)."""

    name = "reference"

    def resident_bytes(self, sizes: list[int], rows: list[int]) -> int:
        return resident_bytes(sum(sizes), max(sizes, default=0), len(self.model_paths),
                              self.variant.sparsification if self.variant else None, self.model_dtype, "tensors")

    def setup(self, total: int) -> None:
        self._flat_ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._fields: dict[tuple[str, int], torch.Tensor] = {}

    def prepare(self) -> None:
        if self.variant is None:
            return
        for name in self.base:
            for i, p in enumerate(self.model_paths.values()):
                self.tensor_statistics(name, p, i)

    def build(self, recipe: Recipe, stats: BuildStats) -> None:
        """Tensor by tensor through ``merge_tensor``."""
        with torch.inference_mode():
            self.build_tensors(recipe, stats)

    def build_tensors(self, recipe: Recipe, stats: BuildStats) -> None:
        """Every tensor of ``recipe``'s plan through ``merge_tensor`` into the live parameters."""
        t0 = time.perf_counter()
        plan = self.plan(recipe)
        if plan.method.name != self.method:
            raise ValueError(f"builder was set up for '{self.method}', recipe uses '{plan.method.name}'")
        t1 = time.perf_counter()
        stats.plan = t1 - t0
        for task in plan.tasks:
            out = self.merge_tensor(plan, task)
            self.params[task.name].copy_(out)
            stats.tensors += 1
        self.sync()
        stats.merge = time.perf_counter() - t1

    def tensor_statistics(self, name: str, path: str, index: int) -> TensorStatistics:
        """The stable ranks (TIES, breadcrumbs), DELLA's row ranks and the random field of input ``index``
        (model ``path``) for tensor ``name``, as ``merge_task_vectors`` takes them; computed once."""
        sp = self.variant.sparsification
        key = (name, path)
        if sp in ("magnitude", "magnitude_outliers"):
            if key not in self._flat_ranks:
                self._flat_ranks[key] = flat_ranks(self.inputs[path][name])
            return TensorStatistics(flat_ranks=self._flat_ranks[key])
        if sp == "della_magprune" and key not in self._ranks:
            self._ranks[key] = della_ranks(self.inputs[path][name])
        field = self._fields_for(name, index) if sp in ("random", "della_magprune") else None
        return TensorStatistics(ranks=self._ranks.get(key) if sp == "della_magprune" else None, field=field)

    def calibration_statistics(self, plan: MergePlan) -> dict[str, dict[str, torch.Tensor]]:
        """The plan's calibration statistics per model, computed on first use and kept for every later candidate."""
        from evomerge.engine import prepare_statistics

        key = plan.recipe.calibration.model_dump_json()
        if key not in self._statistics:
            prepare_statistics(plan, device=self.device, cache_dir=self.statistics_cache)
            self._statistics[key] = plan.statistics
        return self._statistics[key]

    def same_tensor(self, task: TensorTask) -> bool:
        """Whether every input of ``task`` is the output tensor itself in its model (no layer shift)."""
        refs = list(task.inputs) + ([task.base] if task.base is not None else [])
        return all(r.name == self.readers[r.model].resolve_tied(task.name) for r in refs)

    def merge_tensor(self, plan: MergePlan, task: TensorTask) -> torch.Tensor:
        """One output tensor from resident inputs; identical to ``engine.compute_tensor``."""
        name = task.name
        if task.method == "copy" or name not in self.base:
            return self.params[name]
        if not self.same_tensor(task):
            refs = list(task.inputs) + ([task.base] if task.base is not None else [])
            shifted = next(r for r in refs if r.name != self.readers[r.model].resolve_tied(name))
            raise ValueError(f"the candidate builder merges each tensor from the same tensor of every model; "
                             f"tensor {name} takes '{shifted.name}' from '{shifted.model}' (layer-shifted "
                             f"slices): merge such recipes with `evomerge merge`")
        out_dtype = plan.out_dtype_of(task)
        if self.variant is None:
            base = self.base[name] if task.base is not None else None
            tensors = [self.base[name] if r.model == self.base_dir else self.inputs[r.model][name] for r in task.inputs]
            fields = None
            if plan.method.needs_fields:
                fields = [self._fields_for(name, i) for i in range(len(tensors))]
            statistics = None
            if plan.method.calibration is not None:
                by_model = self.calibration_statistics(plan)
                statistics = [by_model[r.model].get(r.name) for r in task.inputs]
                statistics = [None if x is None else x.to(self.device) for x in statistics]
            out = plan.method.merge(base=base, tensors=tensors, model_params=task.model_params,
                                    params=task.params, fields=fields, statistics=statistics)
            return out.to(out_dtype)
        v, mps = self.variant, task.model_params
        deltas = [self.inputs[ref.model][name] for ref in task.inputs]
        # the engine draws input i's random field with model_index=i: the same key here
        stats = [self.tensor_statistics(name, ref.model, i) if v.sparsification and mp["density"] < 1
                 else NO_STATISTICS for i, (ref, mp) in enumerate(zip(task.inputs, mps))]
        out = merge_task_vectors(
            v, self.base[name], deltas,
            weights=[mp["weight"] for mp in mps], densities=[mp["density"] for mp in mps],
            gammas=[mp.get("gamma", GAMMA.default) for mp in mps],
            epsilons=[mp.get("epsilon", EPSILON.default) for mp in mps],
            normalize=task.params["normalize"], rescale=task.params["rescale"], lambda_=task.params["lambda"],
            fields=[st.field for st in stats], flat_ranks=[st.flat_ranks for st in stats],
            ranks=[st.ranks for st in stats])
        return out.to(out_dtype)

    def _fields_for(self, name: str, index: int) -> torch.Tensor:
        key = (name, index)
        if key not in self._fields:
            self._fields[key] = random_field(self.base[name].shape, seed=self.seed, tensor_name=name,
                                             model_index=index, device=self.device, compiled=True)
        return self._fields[key]
