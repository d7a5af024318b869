"""What the compiled backends share: flat buffers, a segment per tensor, and a candidate's per-segment tables.

Every resident buffer is one flat array with a segment per tensor (the live model's parameters
are views into the output buffer, or of a bf16 twin the cuda kernels write). A candidate is
planned with the engine's own planner once per recipe structure (``fast_plan``: a search's
recipes share one structure, only numbers change), and its parameter values become per-segment,
per-input tables (``cpu_kernel.segment_tables``) that a backend's kernels read. Tensors the flat
pass cannot take (another method, layer-shifted inputs) are merged one by one by the reference
backend's ``merge_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from evomerge.backends import cpu_kernel as fk
from evomerge.backends.fast_plan import PlanTemplate, structure_signature
from evomerge.backends.reference import ReferenceBackend
from evomerge.engine import TensorTask, all_finite
from evomerge.methods.consensus import weight_divisor
from evomerge.methods.l1 import l1_norm
from evomerge.recipe import Recipe


class SegmentTables(NamedTuple):
    """One candidate's per-segment (and per input slot) values, filled by ``cpu_kernel.segment_tables``."""

    mode: np.ndarray  # int8 [segments, slots]: each input's mask rule (``MODE_*``)
    lo: np.ndarray  # int32: rank window [lo, hi)
    hi: np.ndarray
    thr: np.ndarray  # float32: DARE's field threshold
    dme: np.ndarray  # float32: DELLA's density − ε
    eps: np.ndarray  # float32: DELLA's ε
    weight: np.ndarray  # float32 (0 beyond a segment's inputs)
    normalize: np.ndarray  # bool [segments]
    rescale: np.ndarray  # bool [segments]
    use_lambda: np.ndarray  # bool [segments]
    lam: np.ndarray  # float32 [segments]


@dataclass
class Structure:
    """What one recipe structure (``PlanTemplate``) fixes for every candidate of it, and the tables they fill."""

    template: PlanTemplate
    seg_task: np.ndarray  # int64 [segments]: the plan task merging each segment, −1 for none
    seg_k: np.ndarray  # int64 [segments]: its number of inputs
    slot_model: np.ndarray  # int64 [segments, slots]: the model of each input slot
    slots: int
    slot_models: list[int]  # per slot, the one model feeding it (when ``uniform``)
    uniform: bool  # whether every slot is fed by one model in every segment (the cuda kernels need it)
    all_active: bool
    slot_models_t: torch.Tensor
    leftover: list[TensorTask]  # tasks the flat pass cannot take, merged one by one
    rounding: list[tuple[int, torch.dtype]]  # segments cast to the recipe's dtype after the pass
    active: np.ndarray  # bool [segments]
    indices: tuple  # where each parameter's value sits in the template's value vector (``segment_tables``)
    tables: SegmentTables
    use_total: np.ndarray  # bool [segments]: whether Σw divides (normalized sums)
    total: np.ndarray  # float32 [segments]: that Σw


class FlatBackend(ReferenceBackend):
    """Flat buffers and per-segment candidate tables (see the module docstring); subclasses merge them."""

    FLAT = True

    def ensure_statistics(self, slots: int) -> None:
        """The per-element statistics of the method's mask rule for input slots < ``slots``, once."""
        raise NotImplementedError

    def setup(self, total: int) -> None:
        """Segment tables, and the live parameters as views of one flat buffer."""
        super().setup(total)
        self.model_index = {p: i for i, p in enumerate(self.model_paths.values())}
        self.seg_index = {n: i for i, n in enumerate(self.names)}
        self.numel = np.array([e - a for a, e in (self.offsets[n] for n in self.names)], dtype=np.int64)
        # DELLA ranks run along dim 1 (the whole tensor for 1-D): the row length of each segment
        self.row = np.array([self.base[n].shape[1] if self.base[n].dim() >= 2 else self.base[n].numel()
                             for n in self.names], dtype=np.int64)
        params = [self.params[n] for n in self.names]
        own = len({id(p) for p in params}) == len(params)  # no tied parameters
        self.aliased = own and self.model_dtype == torch.float32
        # a bf16 model on the cuda backend: its parameters are views of a bf16 twin of the output, which
        # the fused merge kernel writes directly (rounded as torch rounds), with no copy afterwards; the
        # float32 output is then made only if a build needs it (``flat_out``)
        self.flat_out16 = (torch.zeros(total, dtype=torch.bfloat16, device=self.device)
                           if own and self.ALIGNED and self.model_dtype == torch.bfloat16 else None)
        self._flat_out: torch.Tensor | None = None
        if self.flat_out16 is None:
            self._flat_out = (torch.zeros if self.ALIGNED else torch.empty)(total, dtype=torch.float32,
                                                                                     device=self.device)
        for n, p in zip(self.names, params):
            a, e = self.offsets[n]
            if self.flat_out16 is not None:
                self.flat_out16[a:e].copy_(p.detach().reshape(-1))
                p.data = self.flat_out16[a:e].view(p.shape)
                continue
            self._flat_out[a:e].copy_(p.detach().reshape(-1))
            if self.aliased:
                p.data = self._flat_out[a:e].view(p.shape)
        self.model.to(self.device)  # what is not a view yet: buffers, tied or other parameters (views stay)
        self.offsets_array = [self.offsets[n] for n in self.names]
        self.keep_rule = fk.KEEP_RULE[self.variant.sparsification]
        self.sparsification = fk.SPARSIFICATION[self.variant.sparsification]
        self._before: np.ndarray | None = None  # float32 ‖δ‖₁ per segment and model
        self._templates: dict[str, PlanTemplate] = {}
        self._tables: dict[int, Structure] = {}

    @property
    def flat_out(self) -> torch.Tensor:
        """The float32 output buffer (the merged segments before any cast). Next to a bf16 twin
        (``flat_out16``) it is made on first use, holding the parameters' values, since the fused
        kernels usually write the twin directly."""
        if self._flat_out is None:
            self._flat_out = self.flat_out16.to(torch.float32)
        return self._flat_out

    def _before_norms(self) -> np.ndarray:
        """‖δ‖₁ of every segment and model (float32, the engine's ``l1_norm``), computed once."""
        if self._before is None:
            before = np.empty((len(self.names), len(self.model_paths)), dtype=np.float32)
            for si, n in enumerate(self.names):
                for i, p in enumerate(self.model_paths.values()):
                    before[si, i] = l1_norm(self.inputs[p][n]).item()
            self._before = before
        return self._before

    def _template(self, recipe: Recipe) -> PlanTemplate:
        """The traced plan of ``recipe``'s structure (planned in full the first time it is seen)."""
        signature = structure_signature(recipe)
        tmpl = self._templates.get(signature)
        if tmpl is None:
            tmpl = PlanTemplate(recipe, self.readers)
            if len(self._templates) >= 8:
                self._templates.pop(next(iter(self._templates)))
            self._templates[signature] = tmpl
        return tmpl

    def _structure(self, tmpl: PlanTemplate) -> Structure:
        """Per template: which task feeds each segment, its inputs' models, and the leftover tasks."""
        key = id(tmpl)
        if key in self._tables and self._tables[key].template is tmpl:
            return self._tables[key]
        n_seg = len(self.names)
        slots = max(1, max((len(t.inputs) for t in tmpl.plan.tasks), default=0))
        seg_task = np.full(n_seg, -1, dtype=np.int64)
        seg_k = np.full(n_seg, -1, dtype=np.int64)
        slot_model = np.zeros((n_seg, slots), dtype=np.int64)
        leftover, rounding = [], []
        for ti, task in enumerate(tmpl.plan.tasks):
            si = self.seg_index.get(task.name)
            usable = (si is not None and task.method == self.method and seg_task[si] < 0
                      and all(r.model in self.model_index for r in task.inputs) and self.same_tensor(task))
            if not usable:
                if task.method != "copy" and task.name in self.base:  # copies leave the base's values
                    leftover.append(task)
                continue
            seg_task[si], seg_k[si] = ti, len(task.inputs)
            slot_model[si, : len(task.inputs)] = [self.model_index[r.model] for r in task.inputs]
            dtype = tmpl.plan.out_dtype_of(task)
            if dtype != torch.float32:
                rounding.append((si, dtype))
        # per segment and slot, where each parameter's value sits in the template's value vector
        rows = np.where(seg_task >= 0, seg_task, 0)
        def index(name: str) -> np.ndarray:
            if name in tmpl.model_index:
                return np.ascontiguousarray(tmpl.model_index[name][rows][:, :slots])
            if name in tmpl.global_index:
                return tmpl.global_index[name][rows]
            return np.full(n_seg, tmpl.zero_slot, dtype=np.int64)  # not a parameter of this method
        model = {n: index(n) if n in tmpl.model_index else np.full((n_seg, slots), tmpl.zero_slot, dtype=np.int64)
                 for n in ("weight", "density", "gamma", "epsilon")}
        indices = (*model.values(), *(index(n) for n in ("normalize", "rescale", "lambda")))
        self.ensure_statistics(slots)
        # the cuda kernels read slot i of every segment from one model: is there one per slot?
        slot_models, uniform = [], True
        for i in range(slots):
            users = slot_model[(seg_task >= 0) & (seg_k > i), i]
            uniform &= bool((users == users[0]).all()) if len(users) else True
            slot_models.append(int(users[0]) if len(users) else 0)
        shape = (n_seg, slots)  # the candidate's tables, filled by ``segment_tables`` for each candidate
        tables = SegmentTables(np.zeros(shape, dtype=np.int8), np.zeros(shape, dtype=np.int32),
                               np.zeros(shape, dtype=np.int32), *(np.zeros(shape, dtype=np.float32) for _ in range(4)),
                               *(np.zeros(n_seg, dtype=np.bool_) for _ in range(3)), np.zeros(n_seg, dtype=np.float32))
        table = Structure(template=tmpl, seg_task=seg_task, seg_k=seg_k, slot_model=slot_model, slots=slots,
                     slot_models=slot_models, uniform=uniform, all_active=bool((seg_task >= 0).all()),
                     slot_models_t=torch.tensor(slot_models, dtype=torch.int64, device=self.device),
                     leftover=leftover, rounding=rounding, active=seg_task >= 0, indices=indices, tables=tables,
                     use_total=np.zeros(n_seg, dtype=np.bool_), total=np.ones(n_seg, dtype=np.float32))
        self._tables[key] = table
        return table

    @staticmethod
    def _weight_total(weights: tuple, seen: dict) -> tuple[bool, np.float32]:
        """Whether ``weighted_sum`` divides by Σw, and that Σw (``weight_divisor``; 1 where it does not); ``seen``
        holds the candidate's sums so far (segments often share weights; a cache across candidates would grow)."""
        if weights not in seen:
            total = weight_divisor(weights)
            seen[weights] = (total is not None, np.float32(1.0 if total is None else total.item()))
        return seen[weights]

    def _candidate_tables(self, recipe: Recipe) -> Structure:
        """The candidate's per-segment tables (``segment_tables``, and Σw where sums are normalized), in its ``Structure``."""
        tmpl = self._template(recipe)
        if tmpl.method.name != self.method:
            raise ValueError(f"builder was set up for '{self.method}', recipe uses '{tmpl.method.name}'")
        vector = tmpl.vector(recipe)
        st = self._structure(tmpl)
        seg_k, active = st.seg_k, st.active
        tables = st.tables
        fk.segment_tables(self.sparsification, vector, *st.indices, seg_k, self.numel, self.row, *tables)
        weight, normalize = tables.weight, tables.normalize
        use_total, total = st.use_total, st.total
        if not self.variant.consensus and normalize.any():
            seen: dict = {}
            for si in np.flatnonzero(active & normalize):
                use_total[si], total[si] = self._weight_total(tuple(float(x) for x in weight[si, : seg_k[si]]), seen)
        return st

    def _finish_flat(self, recipe: Recipe, st: Structure) -> None:
        """What the flat pass leaves to torch: casts to the recipe's dtype, copies into unaliased
        parameters, and tensors it cannot take (merged one by one)."""
        active = st.active
        for si, dtype in st.rounding:  # the engine casts to the recipe's dtype; the model holds float32
            a, e = self.offsets[self.names[si]]
            self.flat_out[a:e] = self.flat_out[a:e].to(dtype).to(torch.float32)
        if not self.aliased:
            for si in np.flatnonzero(active):
                n = self.names[si]
                a, e = self.offsets[n]
                self.params[n].copy_(self.flat_out[a:e].view(self.params[n].shape))
        self._merge_leftovers(recipe, st)

    def _merge_leftovers(self, recipe: Recipe, st: Structure) -> None:
        """The tensors the flat pass cannot take: planned in full, merged one by one into the parameters."""
        if st.leftover:
            active = st.active
            plan = self.plan(recipe)
            for task in plan.tasks:
                if task.name not in self.seg_index or not active[self.seg_index[task.name]]:
                    self.params[task.name].copy_(self.merge_tensor(plan, task))


    @torch.inference_mode()
    def nonfinite_tensor(self) -> str | None:
        """The name of a live parameter holding NaN or ±inf (None if all are finite): one check of the flat output."""
        merged = self.flat_out if self.aliased else self.flat_out16
        if merged is not None and all_finite(merged):
            others = [n for n in self.params if n not in self.seg_index]
        else:
            others = list(self.params)
        return next((n for n in others if not all_finite(self.params[n])), None)
