"""The candidate builder: merge a recipe into one resident model, in place, without touching disk.

Loaded once: the base model (the live ``nn.Module`` every candidate is written into) and the inputs
of every tensor, resident on the device in float32. For the task-arithmetic family the residents
are the task vectors δᵢ = xᵢ − base; for the other methods the fine-tuned tensors themselves.

Precomputed once per tensor and model, lazily, because they never change between candidates:
- the stable ascending rank of every |δᵢ| over its tensor (a TIES or breadcrumbs mask becomes one
  comparison per element, so no candidate sorts or selects over a tensor);
- DELLA's per-row ranks of |δᵢ|;
- the DARE/DELLA random fields (``random_field(seed, tensor, model)``), so a candidate's mask depends
  only on its density (common random numbers).

A candidate is planned with the engine's own planner (headers only, milliseconds) and each tensor is
computed by the same kernels as ``evomerge merge``: the result equals, bit for bit, what the engine
writes from the exported recipe with the same seed (tests check it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint import ModelReader
from evomerge.engine import MergePlan, TensorTask, plan_merge, resolve_device
from evomerge.methods import della_ranks, flat_ranks, random_field
from evomerge.methods.task_arithmetic import VARIANTS, merge_task_vectors
from evomerge.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BuildStats:
    """Where a candidate's build time went (seconds)."""

    plan: float = 0.0
    merge: float = 0.0
    precompute: float = 0.0
    tensors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.plan + self.merge


class CandidateBuilder:
    """Merges candidates of one method into a resident model (see the module docstring)."""

    def __init__(self, base_dir: str | Path, models: dict[str, str | Path], *, method: str,
                 device: str | torch.device = "auto", dtype: str = "float32", seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.seed = seed
        self.method = method
        self.variant = VARIANTS.get(method)
        self.base_dir = str(base_dir)
        self.model_paths = {name: str(p) for name, p in models.items()}
        self.readers = {self.base_dir: ModelReader(base_dir)}
        for p in self.model_paths.values():
            self.readers[p] = ModelReader(p)
        self.model_dtype = DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=self.model_dtype).to(self.device).eval()
        self.params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self.tokenizer_dir = Path(base_dir)
        self.num_layers = self.readers[self.base_dir].num_layers

        t0 = time.perf_counter()
        self.base: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, dict[str, torch.Tensor]] = {p: {} for p in self.model_paths.values()}
        base_reader = self.readers[self.base_dir]
        for name in base_reader.tensor_names():
            if name not in self.params:
                continue
            b = base_reader.get_tensor(name, dtype=torch.float32).to(self.device)
            if not b.is_floating_point():
                continue
            self.base[name] = b
            for p in self.model_paths.values():
                reader = self.readers[p]
                x = reader.get_tensor(reader.resolve_tied(name), dtype=torch.float32).to(self.device)
                self.inputs[p][name] = x - b if self.variant else x
        self.load_seconds = time.perf_counter() - t0
        self._flat_ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._fields: dict[tuple[str, int], torch.Tensor] = {}

    # -- precomputed statistics -------------------------------------------------------------------
    def precompute(self) -> float:
        """Compute every order statistic / rank / field the method needs now (else lazily)."""
        t0 = time.perf_counter()
        if self.variant is None:
            return 0.0
        for name in self.base:
            for i, p in enumerate(self.model_paths.values()):
                self._stats(name, p, i)
        return time.perf_counter() - t0

    def _stats(self, name: str, path: str, index: int) -> dict[str, torch.Tensor | None]:
        sp = self.variant.sparsification
        out: dict[str, torch.Tensor | None] = {"flat_ranks": None, "ranks": None, "field": None}
        key = (name, path)
        if sp in ("magnitude", "magnitude_outliers"):
            if key not in self._flat_ranks:
                self._flat_ranks[key] = flat_ranks(self.inputs[path][name])
            out["flat_ranks"] = self._flat_ranks[key]
        if sp == "della_magprune":
            if key not in self._ranks:
                self._ranks[key] = della_ranks(self.inputs[path][name])
            out["ranks"] = self._ranks[key]
        if sp in ("random", "della_magprune"):
            out["field"] = self._fields_for(name, index)
        return out

    # -- building ---------------------------------------------------------------------------------
    def plan(self, recipe: Recipe) -> MergePlan:
        """The engine's plan of ``recipe`` against the resident models' headers."""
        return plan_merge(recipe, readers=self.readers)

    @torch.inference_mode()
    def build(self, recipe: Recipe) -> BuildStats:
        """Write the merge of ``recipe`` into the live model's parameters, in place."""
        stats = BuildStats()
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.merge = time.perf_counter() - t1
        return stats

    def merge_tensor(self, plan: MergePlan, task: TensorTask) -> torch.Tensor:
        """One output tensor from resident inputs; identical to ``engine.compute_tensor``."""
        name = task.name
        if task.method == "copy" or name not in self.base:
            return self.params[name]
        out_dtype = plan._out_dtype_of(task)
        if self.variant is None:
            base = self.base[name] if task.base is not None else None
            tensors = [self.base[name] if r.model == self.base_dir else self.inputs[r.model][name] for r in task.inputs]
            fields = None
            if plan.method.needs_fields:
                fields = [self._fields_for(name, i) for i in range(len(tensors))]
            out = plan.method.merge(base=base, tensors=tensors, model_params=task.model_params,
                                    params=task.params, fields=fields)
            return out.to(out_dtype)
        v, mps = self.variant, task.model_params
        deltas = [self.inputs[ref.model][name] for ref in task.inputs]
        # the engine draws input i's random field with model_index=i: the same key here
        stats = [self._stats(name, ref.model, i) if v.sparsification and mp["density"] < 1 else {}
                 for i, (ref, mp) in enumerate(zip(task.inputs, mps))]
        out = merge_task_vectors(
            v, self.base[name], deltas,
            weights=[mp["weight"] for mp in mps], densities=[mp["density"] for mp in mps],
            gammas=[mp.get("gamma", 0.01) for mp in mps], epsilons=[mp.get("epsilon", 0.15) for mp in mps],
            normalize=task.params["normalize"], rescale=task.params["rescale"], lambda_=task.params["lambda"],
            fields=[st.get("field") for st in stats], flat_ranks=[st.get("flat_ranks") for st in stats],
            ranks=[st.get("ranks") for st in stats])
        return out.to(out_dtype)

    def _fields_for(self, name: str, index: int) -> torch.Tensor:
        key = (name, index)
        if key not in self._fields:
            self._fields[key] = random_field(self.base[name].shape, seed=self.seed, tensor_name=name,
                                             model_index=index, device=self.device)
        return self._fields[key]

    @torch.inference_mode()
    def floor(self) -> float:
        """The floor of one candidate: read every resident input once, write every parameter once."""
        t0 = time.perf_counter()
        for name, b in self.base.items():
            p = self.params[name]
            acc = b.clone()
            for inputs in self.inputs.values():
                acc.add_(inputs[name])
            p.copy_(acc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def load_model_weights(self, path: str | None) -> None:
        """Put a source model's own weights (None: the base) into the live model, from its file."""
        reader = self.readers[path or self.base_dir]
        for name, p in self.params.items():
            if reader.has_tensor(name) or name in getattr(reader, "tied_aliases", {}):
                p.copy_(reader.get_tensor(reader.resolve_tied(name)).to(p.device, p.dtype))

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
