"""The candidate builder: merge a recipe into one resident model, in place, without touching disk.

Loaded once: the base model (the live ``nn.Module`` every candidate is written into) and the inputs
of every tensor, resident on the device in float32. For the task-arithmetic family the residents
are the task vectors δᵢ = xᵢ − base; for the other methods the fine-tuned tensors themselves.

Precomputed once per tensor and model, lazily, because they never change between candidates:
- the stable ascending rank of every |δᵢ| over its tensor (a TIES or breadcrumbs mask becomes one
  comparison per element, so no candidate sorts or selects over a tensor);
- DELLA's per-row ranks of |δᵢ|;
- the DARE/DELLA random fields (``random_field(seed, tensor, model)``), so a candidate's mask depends
  only on its density (common random numbers);
- on the host path also: each tensor's magnitudes in ascending order (a TIES bound becomes a
  comparison of |δ| with one value), DELLA's rank term q per element, and for DARE and DELLA the
  fields in ascending order with running sums of |δ| (DELLA: also q and |δ| in that order), from
  which the rescale norm of a candidate is read off.

A candidate is planned with the engine's own planner and each tensor is computed by the same
float32 operations as ``evomerge merge``: the result equals, bit for bit, what the engine writes
from the exported recipe with the same seed (tests check it).

On the host, the task-arithmetic family takes a faster road (a candidate of a small model in well
under a millisecond): every resident buffer is one flat array with a segment per tensor (the live
model's parameters are views into one of them), the plan is re-used from the first recipe of the
same structure (``fast_plan``), and one compiled pass merges all tensors at once
(``flat_kernel``). On other devices (CUDA) the same tables drive the device path: buffers laid
out with every tensor at a multiple of ``L1_BLOCK``, and a candidate as up to three fused Triton
kernels (``device_kernels``) or, without Triton, batched torch operations (``device_path``). The
fused kernels keep the GPU lean: a bf16 model's fine-tunes stay bf16 (the kernels form δ), the
random fields are computed where used, TIES/breadcrumbs windows are compared with their bound
elements (the stable order lives on the host) and DELLA's rank term is a 16-bit row rank. Other
methods are merged tensor by tensor.

Everything stays resident, so a builder refuses to start on a GPU whose free memory cannot hold it
(``resident_bytes``), before loading anything.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import numpy as np

from evomerge.checkpoint import ModelReader
from evomerge.lora import open_source
from evomerge.engine import MergeError, MergePlan, TensorTask, all_finite, plan_merge, resolve_device
from evomerge.methods import della_ranks, field_seed, flat_ranks, random_field, stable_order
from evomerge.methods.l1 import L1_BLOCK, l1_norm, lane_block_sums
from evomerge.methods.task_arithmetic import VARIANTS, merge_task_vectors
from evomerge.recipe import Recipe
from evomerge.search import device_path as dp
from evomerge.search import flat_kernel as fk
from evomerge.search.fast_plan import PlanTemplate, structure_signature
from evomerge.search.memory import (RANK16_MAX_ROW, SCRATCH_CHUNK, fused_kernels_available, host_path_bytes,
                                    resident_bytes)

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
                 device: str | torch.device = "auto", dtype: str = "float32", seed: int = 0, path: str = "auto",
                 statistics_cache: str | Path | None = None):
        """``path``: how task-arithmetic candidates are merged. "host": the compiled flat pass
        (``flat_kernel``, CPU only); "device": batched torch operations over the flat buffers
        (``device_path``, any device); "tensors": tensor by tensor. "auto": host on the CPU, device
        elsewhere. Other methods always go tensor by tensor. Data-aware methods (RegMean) compute
        their calibration statistics once per builder, cached in ``statistics_cache`` when given."""
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.seed = seed
        self.method = method
        self.statistics_cache = statistics_cache
        self._statistics: dict[str, dict] = {}  # calibration settings (JSON) -> per model statistics
        self.variant = VARIANTS.get(method)
        if path not in ("auto", "host", "device", "tensors"):
            raise ValueError(f"path must be auto, host, device or tensors, got {path!r}")
        if path == "auto":
            path = "host" if self.device.type == "cpu" else "device"
        if path == "host" and self.device.type != "cpu":
            raise ValueError("the host path merges on the CPU only")
        self.path = path if self.variant is not None else "tensors"
        self.base_dir = str(base_dir)
        self.model_paths = {name: str(p) for name, p in models.items()}
        self.readers = {self.base_dir: ModelReader(base_dir)}
        for p in self.model_paths.values():  # a LoRA adapter directory reads as base + ΔW (evomerge.lora)
            self.readers[p] = open_source(p, base=self.readers[self.base_dir])
        self.model_dtype = DTYPES[dtype]
        self.rescale_tables = True  # the host path's rescale-norm tables (``_check_host_memory``)
        if self.device.type == "cuda":
            self._check_device_memory()
        elif self.path == "host":
            self._check_host_memory()
        # the flat paths move the model to the device only once its parameters are views of their output
        # buffer (``_setup_segments``): moved first, its own parameters would sit beside the buffers until
        # replaced, a peak of one more model (14 GB for a bf16 7B) that no memory check counts
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=self.model_dtype).eval()
        if self.path not in ("host", "device"):
            self.model.to(self.device)
        self.params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self.tokenizer_dir = Path(base_dir)
        self.num_layers = self.readers[self.base_dir].num_layers

        t0 = time.perf_counter()
        base_reader = self.readers[self.base_dir]
        self.names = [n for n in base_reader.tensor_names()
                      if n in self.params and base_reader.dtype(n).is_floating_point]
        shapes = {n: tuple(base_reader.shape(n)) for n in self.names}
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        aligned = self.path == "device"  # each tensor from a multiple of L1_BLOCK: its L1 blocks are whole rows
        for n in self.names:
            size = int(np.prod(shapes[n], dtype=np.int64))
            if aligned:
                total = -(-total // L1_BLOCK) * L1_BLOCK
            self.offsets[n] = (total, total + size)
            total += size
        if aligned:
            total = -(-total // L1_BLOCK) * L1_BLOCK
        # one flat float32 buffer per input, a segment per tensor; the dicts hold views into them. On the
        # device path a bf16 model's fine-tunes stay bf16 (2 bytes per parameter, not 4) and the kernels
        # form δ = x − base as the engine does (``inputs16``)
        self.inputs16 = self.path == "device" and self.model_dtype == torch.bfloat16 and self.variant is not None
        alloc = torch.zeros if aligned else torch.empty  # the gaps between aligned segments hold zeros
        self.flat_base = alloc(total, dtype=torch.float32, device=self.device)
        self.flat_inputs = alloc((len(self.model_paths), total), device=self.device,
                                 dtype=torch.bfloat16 if self.inputs16 else torch.float32)
        self.base: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, Mapping[str, torch.Tensor]] = {}
        views: dict[str, dict[str, torch.Tensor]] = {p: {} for p in self.model_paths.values()}
        for name in self.names:
            a, e = self.offsets[name]
            b = self.flat_base[a:e].view(shapes[name])
            # inputs are read as the engine reads them for recipes of this dtype (cast to it), then held in float32
            b.copy_(base_reader.get_tensor(name, dtype=self.model_dtype))
            _check_finite_input(b, self.base_dir, name)
            self.base[name] = b
            for i, p in enumerate(self.model_paths.values()):
                reader = self.readers[p]
                view = self.flat_inputs[i, a:e].view(shapes[name])
                view.copy_(reader.get_tensor(reader.resolve_tied(name), dtype=self.model_dtype))
                _check_finite_input(view, p, name)  # as ``evomerge merge`` refuses them; the kernels assume it
                if self.variant:
                    delta = torch.sub(view, b) if self.inputs16 else view.sub_(b)  # the task vector δ = x − base
                    if not all_finite(delta):
                        raise MergeError(f"model '{p}': tensor {name}: its difference from the base model "
                                         f"overflows float32")
                views[p][name] = view
        for i, p in enumerate(self.model_paths.values()):
            self.inputs[p] = TaskVectors(self.flat_inputs[i], self.flat_base, self.offsets, shapes) \
                if self.inputs16 else views[p]
        self.load_seconds = time.perf_counter() - t0
        self._flat_ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._fields: dict[tuple[str, int], torch.Tensor] = {}
        self.flat = self.path == "host"
        if self.path in ("host", "device"):
            self._setup_segments(total)
        if self.flat:
            self._setup_flat()
        elif self.path == "device":
            self._setup_device()

    def _tensor_sizes(self) -> tuple[list[int], list[int]]:
        """Element counts and DELLA row lengths of the base model's floating-point tensors, from its headers."""
        reader = self.readers[self.base_dir]
        names = [n for n in reader.tensor_names() if reader.dtype(n).is_floating_point]
        sizes = [int(np.prod(reader.shape(n), dtype=np.int64)) for n in names]
        rows = [reader.shape(n)[1] if len(reader.shape(n)) >= 2 else size for n, size in zip(names, sizes)]
        return sizes, rows

    def _check_host_memory(self) -> None:
        """On the host path, before loading anything: refuse a model whose buffers exceed the available
        memory, and leave out the optional rescale-norm tables (slower DARE/DELLA norms, same bits)
        when only they do not fit."""
        import warnings

        import psutil

        sizes, _ = self._tensor_sizes()
        k = len(self.model_paths)
        need, optional = host_path_bytes(sum(sizes), max(sizes, default=0), k, self.variant.sparsification,
                                         self.model_dtype)
        available = psutil.virtual_memory().available
        gib = 2 ** 30
        if need > available:
            raise MergeError(f"the candidate builder needs about {need / gib:.1f} GiB of memory for "
                             f"{sum(sizes) / 1e9:.2f}B parameters and {k} fine-tune(s) ({self.method}), but "
                             f"{available / gib:.1f} GiB are available: use fewer fine-tunes or a smaller model")
        if optional and need + optional > available:
            self.rescale_tables = False
            warnings.warn(f"{self.method}: the rescale-norm tables ({optional / gib:.1f} GiB) do not fit in the "
                          f"{available / gib:.1f} GiB available besides the {need / gib:.1f} GiB needed: each "
                          f"candidate sums its rescale norms instead (slower, same result)", RuntimeWarning,
                          stacklevel=3)

    def _check_device_memory(self) -> None:
        """Refuse, before loading anything, a model whose resident buffers exceed the GPU's free memory."""
        sizes, rows = self._tensor_sizes()
        k = len(self.model_paths)
        laid_out = sum(-(-n // L1_BLOCK) * L1_BLOCK for n in sizes) if self.path == "device" else sum(sizes)
        need = resident_bytes(laid_out, max(sizes, default=0), k,
                              self.variant.sparsification if self.variant else None,
                              self.model_dtype, self.path, fused_kernels_available(self.device),
                              max(rows, default=0))
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            gib = 2 ** 30
            raise MergeError(f"the candidate builder needs about {need / gib:.1f} GiB on {self.device} for "
                             f"{sum(sizes) / 1e9:.2f}B parameters and {k} fine-tune(s) ({self.method}), but "
                             f"{free / gib:.1f} GiB are free: use fewer fine-tunes, a smaller model, or "
                             f"--device cpu")
        sparsification = self.variant.sparsification if self.variant else None
        if self.path == "device" and fused_kernels_available(self.device) \
                and sparsification in ("magnitude", "magnitude_outliers"):
            import psutil

            host = 4 * k * laid_out  # the fused magnitude rules' order per tensor, held in host memory
            available = psutil.virtual_memory().available
            if host > available:
                gib = 2 ** 30
                raise MergeError(f"the candidate builder keeps each fine-tune's magnitude order in host memory: "
                                 f"about {host / gib:.1f} GiB for {self.method}, but {available / gib:.1f} GiB "
                                 f"are available: use fewer fine-tunes or a smaller model")

    # -- precomputed statistics -------------------------------------------------------------------
    def precompute(self) -> float:
        """Compute every order statistic / rank / field the method needs now (else lazily)."""
        t0 = time.perf_counter()
        if self.variant is None:
            return 0.0
        if self.flat:
            self._ensure_flat_stats(len(self.model_paths))
            return time.perf_counter() - t0
        if self.path == "device":
            self._ensure_device_stats(len(self.model_paths))
            if self.fused and self.variant.sparsification is not None:  # masked inputs are rescaled by default
                self._ensure_norm_tables()
            return time.perf_counter() - t0
        for name in self.base:
            for i, p in enumerate(self.model_paths.values()):
                self._stats(name, p, i)
        return time.perf_counter() - t0

    def _stats(self, name: str, path: str, index: int) -> dict[str, torch.Tensor | None]:
        sp = self.variant.sparsification
        out: dict[str, torch.Tensor | None] = {"flat_ranks": None, "ranks": None, "field": None}
        if self.flat:
            self._ensure_flat_stats(index + 1)
            (a, e), shape, m = self.offsets[name], self.base[name].shape, self.model_index[path]
            if sp in ("magnitude", "magnitude_outliers"):
                out["flat_ranks"] = self.flat_ranks[m, a:e].view(shape)
            if sp == "della_magprune":
                out["ranks"] = self.flat_ranks[m, a:e].view(shape)
            if sp in ("random", "della_magprune"):
                out["field"] = self.flat_fields[index, a:e].view(shape)
            return out
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

    # -- the flat host path -----------------------------------------------------------------------
    def _setup_segments(self, total: int) -> None:
        """What the host and device paths share: segment tables, and the live parameters as views of one flat buffer."""
        self.model_index = {p: i for i, p in enumerate(self.model_paths.values())}
        self.seg_index = {n: i for i, n in enumerate(self.names)}
        self.numel = np.array([e - a for a, e in (self.offsets[n] for n in self.names)], dtype=np.int64)
        # DELLA ranks run along dim 1 (the whole tensor for 1-D): the row length of each segment
        self.row = np.array([self.base[n].shape[1] if self.base[n].dim() >= 2 else self.base[n].numel()
                             for n in self.names], dtype=np.int64)
        params = [self.params[n] for n in self.names]
        own = len({id(p) for p in params}) == len(params)  # no tied parameters
        self.aliased = own and self.model_dtype == torch.float32
        # a bf16 model on the device path: its parameters are views of a bf16 twin of the output, which
        # the fused merge kernel writes directly (rounded as torch rounds), with no copy afterwards; the
        # float32 output is then made only if a build needs it (``flat_out``)
        self.flat_out16 = (torch.zeros(total, dtype=torch.bfloat16, device=self.device)
                           if own and self.path == "device" and self.model_dtype == torch.bfloat16 else None)
        self._flat_out: torch.Tensor | None = None
        if self.flat_out16 is None:
            self._flat_out = (torch.zeros if self.path == "device" else torch.empty)(total, dtype=torch.float32,
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
        self.keep_rule = {"magnitude": fk.RULE_TOP, "magnitude_outliers": fk.RULE_MAGNITUDE,
                          "random": fk.RULE_FIELD, "della_magprune": fk.RULE_DELLA}.get(self.variant.sparsification,
                                                                                        fk.RULE_FIELD)
        self.sparsification = fk.SPARSIFICATION[self.variant.sparsification]
        self._before: np.ndarray | None = None  # float32 ‖δ‖₁ per segment and model
        self._templates: dict[str, PlanTemplate] = {}
        self._tables: dict[int, dict] = {}

    def _setup_flat(self) -> None:
        """The host path: cache-sized blocks, thread cuts, and numpy views of the buffers."""
        blocks = []
        for si, n in enumerate(self.names):
            a, e = self.offsets[n]
            blocks += [(si, x, min(e, x + L1_BLOCK)) for x in range(a, e, L1_BLOCK)]
        self.blocks = np.array(blocks, dtype=np.int64).reshape(-1, 3)
        first = np.searchsorted(self.blocks[:, 0], np.arange(len(self.names)))
        self.seg_blocks = np.stack([first, np.append(first[1:], len(self.blocks))], axis=1).astype(np.int64)
        self.cuts = fk.segment_cuts(self.numel, torch.get_num_threads())  # one run of segments per thread
        self.flat_ranks: torch.Tensor | None = None
        self.flat_fields: torch.Tensor | None = None
        empty32 = np.empty((0, 0), dtype=np.float32)
        self.flat_q = self.flat_sorted = empty32  # filled by ``_ensure_flat_stats``
        self.prefix_field = np.empty((0, 0, 0), dtype=np.float32)
        self.prefix_sum = np.empty((0, 0), dtype=np.float64)
        self.strata_bounds = np.empty((0, 0, 0), dtype=np.int64)
        self.strata_q = np.empty((0, 0, 0, 2), dtype=np.float32)
        self._refresh_buffers()

    def _ensure_flat_stats(self, slots: int) -> None:
        """Fill the flat statistics of the method's mask rule, and the random fields of input slots < ``slots``, once.

        Magnitude rules: stable ranks and, per segment, the ascending magnitudes (the fused pass
        compares |δ| with the magnitudes ranked at a window's bounds). DELLA: row ranks and
        q = (r/(n−1))·2 per element. DARE: per segment the fields in ascending order and the
        running float64 sums of |δ| in that order (slot i with model i), for ``_prefix_l1``; DELLA:
        the same within strata of similar q, with q and |δ| in that order (``della_band_tables``).
        """
        sp = self.variant.sparsification
        if sp in ("magnitude", "magnitude_outliers", "della_magprune") and self.flat_ranks is None:
            ranks = torch.empty_like(self.flat_inputs, dtype=torch.int32)
            rank_fn = della_ranks if sp == "della_magprune" else flat_ranks
            for n in self.names:
                a, e = self.offsets[n]
                for i, p in enumerate(self.model_paths.values()):
                    ranks[i, a:e] = rank_fn(self.inputs[p][n]).reshape(-1)
            self.flat_ranks = ranks
            if sp == "della_magprune":
                self.flat_q = fk.della_q(ranks.numpy(), self.offsets_array, self.row)
            else:
                self.flat_sorted = np.empty_like(self.flat_inputs.numpy())
                for a, e in self.offsets_array:
                    self.flat_sorted[:, a:e] = np.sort(np.abs(self.flat_inputs.numpy()[:, a:e]), axis=1)
        have = 0 if self.flat_fields is None else self.flat_fields.shape[0]
        if sp in ("random", "della_magprune") and have < slots:
            fields = self._flat_fields(slots, self.flat_fields)
            self.flat_fields = fields
            # per segment, slot i with model i: the field in ascending order (DELLA: with q and |δ| in
            # that order) and the running float64 sums of |δ| in that order (``_prefix_l1``, ``_band_l1``)
            pairs = min(slots, len(self.model_paths)) if self.rescale_tables else 0
            F, D = fields.numpy(), self.flat_inputs.numpy()
            della = sp == "della_magprune"
            self.prefix_field = np.empty((3 if della else 1, pairs, F.shape[1]), dtype=np.float32)
            self.prefix_sum = np.empty((pairs, F.shape[1]), dtype=np.float64)
            strata = [fk.della_strata(int(n)) if della else 1 for n in self.numel]
            self.strata_bounds = np.zeros((pairs, len(self.names), max(strata) + 1), dtype=np.int64)
            self.strata_q = np.zeros((pairs, len(self.names), max(strata), 2), dtype=np.float32)
            for i in range(pairs):
                for si, (a, e) in enumerate(self.offsets_array):
                    if della:  # in q strata, each in field order (``della_band_tables``)
                        tables = fk.della_band_tables(F[i, a:e], self.flat_q[i, a:e], np.abs(D[i, a:e]), strata[si])
                        for plane, values in enumerate(tables[:3]):
                            self.prefix_field[plane, i, a:e] = values
                        self.prefix_sum[i, a:e], bounds, q_range = tables[3:]
                        self.strata_bounds[i, si, : len(bounds)] = bounds
                        self.strata_bounds[i, si, len(bounds):] = bounds[-1]  # unused strata are empty
                        self.strata_q[i, si, : len(q_range)] = q_range
                        continue
                    order = np.argsort(F[i, a:e], kind="stable")
                    self.prefix_field[0, i, a:e] = F[i, a:e][order]
                    np.cumsum(np.abs(D[i, a:e][order]).astype(np.float64), out=self.prefix_sum[i, a:e])
        self._refresh_buffers()

    def _flat_fields(self, slots: int, have: torch.Tensor | None) -> torch.Tensor:
        """The random fields of input slots < ``slots`` in the flat layout (slot i: ``model_index=i``), keeping ``have``'s rows."""
        fields = torch.zeros((slots, self.flat_base.numel()), dtype=torch.float32, device=self.device)
        start = 0 if have is None else have.shape[0]
        if start:
            fields[:start] = have
        for i in range(start, slots):
            for n in self.names:
                a, e = self.offsets[n]
                fields[i, a:e] = random_field(self.base[n].shape, seed=self.seed, tensor_name=n, model_index=i,
                                              device=self.device, compiled=True).reshape(-1)
        return fields

    def _refresh_buffers(self) -> None:
        """The kernel's buffers as numpy arrays (D, R, Q, F, SM, PF, PS, SB, SQ, base, out; absent ones empty)."""
        D = self.flat_inputs.numpy()
        if self.flat_q.shape[0]:  # DELLA: both the block path and the fused pass read q
            R = Q = self.flat_q
        else:
            R = self.flat_ranks.numpy() if self.flat_ranks is not None else np.empty((0, 0), dtype=np.int32)
            Q = D  # a stand-in: only DELLA's rule reads q
        F = self.flat_fields.numpy() if self.flat_fields is not None else np.empty((0, 0), dtype=np.float32)
        self._buffers = (D, R, Q, F, self.flat_sorted, self.prefix_field, self.prefix_sum, self.strata_bounds,
                         self.strata_q, self.flat_base.numpy(), self.flat_out.numpy())

    # -- the device path --------------------------------------------------------------------------
    def _setup_device(self) -> None:
        """The device path: block → segment index, each segment's L1 blocks, and element chunks."""
        total = self.flat_base.numel()
        block_seg = np.empty(total // L1_BLOCK, dtype=np.int32)  # the segment of each L1 block
        self.first_block = np.empty(len(self.names), dtype=np.int64)
        self.n_blocks = np.empty(len(self.names), dtype=np.int64)
        for si, (a, e) in enumerate(self.offsets_array):
            end = (self.offsets_array[si + 1][0] if si + 1 < len(self.names) else total)
            block_seg[a // L1_BLOCK: end // L1_BLOCK] = si  # the gap after a segment belongs to it (δ = 0 there)
            self.first_block[si], self.n_blocks[si] = a // L1_BLOCK, -(-(e - a) // L1_BLOCK)
        self.block_seg = torch.from_numpy(block_seg).to(self.device)
        self._seg_of: torch.Tensor | None = None  # element → segment, for the batched torch path only (``seg_of``)
        self.first_block_t = torch.from_numpy(self.first_block).to(self.device)
        self.n_blocks_t = torch.from_numpy(self.n_blocks).to(self.device)
        self._before_t: torch.Tensor | None = None  # ‖δ‖₁ per segment and model on the device
        self._staging: dict[tuple, tuple] = {}  # per table layout: host buffer, its device twin, views (``_upload``)
        self.rescale_slack = 1.0  # widens the device rescale factors' error interval (tests force the fallback)
        # fused Triton kernels on CUDA (EVOMERGE_DEVICE_KERNELS=torch: the batched torch operations)
        self.fused = fused_kernels_available(self.device)
        # chunks of whole L1 blocks whose scratch ([inputs, chunk] float64 and float32) fits in a budget
        budget = (4 << 30) if self.device.type == "cuda" else (64 << 20)
        step = max(L1_BLOCK, budget // (16 * len(self.model_paths)) // L1_BLOCK * L1_BLOCK)
        self.chunks = [(c, min(total, c + step)) for c in range(0, total, step)]
        self.device_stat: torch.Tensor | None = None  # ranks (magnitude rules) or DELLA's q (or row ranks) per model
        self.row_inverse: torch.Tensor | None = None  # DELLA: float64 1/(n − 1) per segment
        self.magnitude_order: np.ndarray | None = None  # fused magnitude rules: stable order per tensor (host)
        # the random fields: stored per input slot for the batched torch operations; the fused kernels
        # compute them from each slot's key per tensor and the tensor's start
        self.device_fields: torch.Tensor | None = None
        self.field_keys: torch.Tensor | None = None  # int64 [slots, segments]
        self.seg_starts = torch.tensor([a for a, _ in self.offsets_array], dtype=torch.int64, device=self.device)

    def _ensure_device_stats(self, slots: int) -> None:
        """Stable ranks (TIES, breadcrumbs), DELLA's q = (r/(n−1))·2 from row ranks, and the random fields of
        input slots < ``slots``, on the device, once."""
        sp = self.variant.sparsification
        if sp in ("magnitude", "magnitude_outliers") and self.fused:
            self._ensure_magnitude_order()
        elif sp in ("magnitude", "magnitude_outliers") and self.device_stat is None:
            self._ensure_device_ranks()
        elif sp == "della_magprune" and self.device_stat is None:
            della = True
            # DELLA on the fused kernels: the 16-bit row rank r, from which they compute q (``della_q_kernel``)
            rank16 = della and self.fused and int(self.row.max(initial=0)) <= RANK16_MAX_ROW
            dtype = torch.int16 if rank16 else torch.float32 if della else torch.int32
            stat = torch.zeros_like(self.flat_inputs, dtype=dtype)
            for si, n in enumerate(self.names):
                a, e = self.offsets[n]
                for i, p in enumerate(self.model_paths.values()):
                    if not della:
                        stat[i, a:e] = flat_ranks(self.inputs[p][n]).reshape(-1)
                        continue
                    row = int(self.row[si])
                    if row < 2:
                        continue  # one-element rows keep with p = density: q (and r) stay 0
                    ranks = della_ranks(self.inputs[p][n]).reshape(-1)
                    if rank16:  # r < 65536 as the int16 with the same 16 bits
                        stat[i, a:e] = torch.where(ranks >= 1 << 15, ranks - (1 << 16), ranks).to(torch.int16)
                        continue
                    # della_probability_table's float32 ops: arange / (n − 1), then · 2 (then · ε, + (d − ε))
                    q = torch.arange(row, dtype=torch.float32, device=self.device) / (row - 1) * 2
                    stat[i, a:e] = q.index_select(0, ranks.long())
            self.device_stat = stat
            # 1/(n − 1) per segment in float64 (0 for one-element rows), with which a 16-bit rank becomes q
            inv = np.where(self.row >= 2, 1.0 / np.maximum(self.row - 1, 1), 0.0)
            self.row_inverse = torch.from_numpy(inv.astype(np.float64)).to(self.device)
        if sp in ("random", "della_magprune"):
            have = 0 if self.field_keys is None else self.field_keys.shape[0]
            if have < slots:
                keys = np.array([[field_seed(self.seed, n, i) for n in self.names] for i in range(slots)],
                                dtype=np.uint64)
                self.field_keys = torch.from_numpy(keys.view(np.int64)).to(self.device)
            if not self.fused:
                self._ensure_stored_fields(slots)

    def _ensure_device_ranks(self) -> None:
        """Stable ranks of |δ| per tensor and model on the device (int32), for the batched torch path."""
        ranks = torch.zeros_like(self.flat_inputs, dtype=torch.int32)
        for n in self.names:
            a, e = self.offsets[n]
            for i, p in enumerate(self.model_paths.values()):
                ranks[i, a:e] = flat_ranks(self.inputs[p][n]).reshape(-1)
        self.device_stat = ranks

    def _ensure_magnitude_order(self) -> None:
        """For the fused kernels' magnitude rules: each tensor's elements in stable ascending order of |δ|
        (the positions in the tensor, int32), per model, held on the host: a candidate looks up the
        elements at its windows' ends there (``_bound_positions``); the GPU holds nothing per element."""
        if self.magnitude_order is not None:
            return
        order = np.zeros(tuple(self.flat_inputs.shape), dtype=np.int32)
        for n in self.names:
            a, e = self.offsets[n]
            for i, p in enumerate(self.model_paths.values()):
                order[i, a:e] = stable_order(self.inputs[p][n]).to(torch.int32).cpu().numpy()
        self.magnitude_order = order

    def _bound_positions(self, ints: np.ndarray, slot_models: list[int]) -> np.ndarray:
        """int64 [2, slots, segments]: the flat positions of the elements ranked at each rank window's ends
        (``rule_tables``' [lo, hi)), −1 for an open end, −2 at ``lo`` for an empty window (``device_kernels._keep``)."""
        self._ensure_magnitude_order()
        lo, hi = ints[0].astype(np.int64), ints[1].astype(np.int64)
        n = self.numel[None, :]
        start = np.array([a for a, _ in self.offsets_array], dtype=np.int64)[None, :]
        rows = np.asarray(slot_models, dtype=np.int64)[:, None]
        last = np.maximum(n - 1, 0)
        at_lo = start + self.magnitude_order[rows, start + np.clip(lo, 0, last)]
        at_hi = start + self.magnitude_order[rows, start + np.clip(hi, 0, last)]
        positions = np.empty((2, *lo.shape), dtype=np.int64)
        positions[0] = np.where(lo >= hi, -2, np.where(lo <= 0, -1, at_lo))
        positions[1] = np.where(hi >= n, -1, at_hi)
        return positions

    def _ensure_stored_fields(self, slots: int) -> None:
        """The random fields of input slots < ``slots``, stored on the device (the batched torch path reads them)."""
        have = 0 if self.device_fields is None else self.device_fields.shape[0]
        if have < slots:
            self.device_fields = self._flat_fields(slots, self.device_fields)

    @property
    def flat_out(self) -> torch.Tensor:
        """The float32 output buffer (the merged segments before any cast). Next to a bf16 twin
        (``flat_out16``) it is made on first use, holding the parameters' values, since the fused
        kernels usually write the twin directly."""
        if self._flat_out is None:
            self._flat_out = self.flat_out16.to(torch.float32)
        return self._flat_out

    def _delta_chunk(self, m: int, c0: int, c1: int) -> torch.Tensor:
        """Model m's task vector δ on flat elements [c0, c1) (float32; formed from bf16 values when ``inputs16``)."""
        if self.inputs16:
            return torch.sub(self.flat_inputs[m, c0:c1], self.flat_base[c0:c1])
        return self.flat_inputs[m, c0:c1]

    @property
    def seg_of(self) -> torch.Tensor:
        """The segment of every element (int32), made on first use: only the batched torch path reads it
        (the fused kernels look up a whole block's segment)."""
        if self._seg_of is None:
            self._seg_of = self.block_seg.repeat_interleave(L1_BLOCK)
        return self._seg_of

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _keep(self, i: int, m: int, c0: int, c1: int, seg: torch.Tensor, ints: torch.Tensor,
              floats: torch.Tensor) -> torch.Tensor | None:
        """Slot i's keep mask (model m) on elements [c0, c1); None when the method keeps everything."""
        if self.variant.sparsification is None:
            return None
        if self.variant.sparsification in ("magnitude", "magnitude_outliers") and self.device_stat is None:
            self._ensure_device_ranks()
        stat = self.device_stat[m, c0:c1] if self.device_stat is not None else None
        if stat is not None and stat.dtype == torch.int16:  # 16-bit DELLA ranks: q as the kernels compute it
            stat = ((stat.to(torch.int32) & 0xFFFF).double() * self.row_inverse[seg]).float() * 2
        field = None
        if self.variant.sparsification in ("random", "della_magprune"):
            self._ensure_stored_fields(i + 1)
            field = self.device_fields[i, c0:c1]
        return dp.keep_mask(self.keep_rule, stat, field, ints[:, i], floats[:, i], seg)

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Copy small int32 / int64 / float32 / bool host tables to the device in one transfer (bool → int32).

        Per layout of tables, a packed host buffer (pinned on CUDA, copied asynchronously) and its
        device twin are made once, with the views the kernels read; later candidates of that
        layout only fill the host buffer. Reusing it is safe: every build synchronizes before it ends.
        """
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        entry = self._staging.get(key)
        if entry is None:
            words = [a.size * (2 if a.dtype == np.int64 else 1) for a in arrays]  # in int32 words
            size = sum(words)
            host = torch.empty(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
            packed = host if self.device.type == "cpu" else torch.empty(size, dtype=torch.int32, device=self.device)
            views, at = [], 0
            for a, w in zip(arrays, words):
                v = packed[at: at + w]
                if a.dtype == np.int64:
                    assert at % 2 == 0, "int64 tables go first (8-byte aligned)"
                    v = v.view(torch.int64)
                views.append((v.view(torch.float32) if a.dtype == np.float32 else v).view(a.shape))
                at += w
            if len(self._staging) >= 16:
                self._staging.clear()
            entry = self._staging[key] = (host, host.numpy(), packed, views)
        host, host_np, packed, views = entry
        np.concatenate([(a.astype(np.int32) if a.dtype == np.bool_ else a.view(np.int32)).ravel() for a in arrays],
                       out=host_np)
        if packed is not host:
            packed.copy_(host, non_blocking=True)
        return views

    def _device_after_norms(self, st: dict, ints: torch.Tensor, floats: torch.Tensor) -> np.ndarray:
        """‖m⊙δ‖₁ (float32, ``l1_norm``'s order) of every input slot and segment: [slots, segments]."""
        slot_models = st["slot_models"]
        k = len(slot_models)
        if self.fused:
            from evomerge.search import device_kernels as dk

            block_sums = dk.lane_sums(self.keep_rule, self.flat_inputs, self.device_stat, self.field_keys,
                                      self.seg_starts, st["slot_models_t"], self.block_seg, ints, floats,
                                      base=self.flat_base, row_inverse=self.row_inverse)
            return dp.segment_totals(block_sums.cpu().numpy(), self.first_block, self.n_blocks)
        block_sums = torch.empty((k, self.flat_base.numel() // L1_BLOCK), dtype=torch.float64, device=self.device)
        for c0, c1 in self.chunks:
            seg = self.seg_of[c0:c1]
            mags = torch.empty((k, c1 - c0), dtype=torch.float64, device=self.device)
            for i, m in enumerate(slot_models):
                mags[i] = self._delta_chunk(m, c0, c1).abs()  # as l1_norm: |x| in float64, dropped → +0
                keep = self._keep(i, m, c0, c1, seg, ints, floats)
                if keep is not None:
                    mags[i].masked_fill_(~keep, 0.0)
            block_sums[:, c0 // L1_BLOCK: c1 // L1_BLOCK] = lane_block_sums(mags)
        return dp.segment_totals(block_sums.cpu().numpy(), self.first_block, self.n_blocks)

    def _build_device(self, recipe: Recipe, stats: BuildStats) -> None:
        """The whole candidate over the flat buffers: fused Triton kernels on CUDA, else batched torch
        operations per chunk (``device_path``)."""
        t0 = time.perf_counter()
        st = self._candidate_tables(recipe)
        if not st["uniform"]:  # an input slot fed by different models in different tensors
            stats.extra["path"] = "tensors"
            self._build_tensors(recipe, stats)
            return
        mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = st["tables"]
        k, slot_models, active = st["slots"], st["slot_models"], st["active"]
        ints_np, floats_np = dp.rule_tables(self.keep_rule, mode, lo, hi, thr, dme, eps)
        if self.fused and self.keep_rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE):  # rank windows as bound elements
            ints_np = self._bound_positions(ints_np, slot_models)
        n_seg = len(self.names)
        # the engine rescales each input it masks by ‖δ‖₁/‖m⊙δ‖₁ (factors computed below, 1 elsewhere)
        rescales = (active & rescale)[None, :] & (mode.T != fk.MODE_ALL)  # [slots, segments]
        lanes = bool(rescales.any())
        total = np.where(st["use_total"] & normalize, st["total"], np.float32(1))
        rows = np.concatenate([weight.T, np.ones((k, n_seg), dtype=np.float32), lam[None, :], total[None, :]])
        ints, floats, per_seg, flags, uses = self._upload(ints_np, floats_np, rows.astype(np.float32),
                                                          np.stack([normalize, active]), rescales)
        ambiguous = block_sums = None
        if lanes and self.fused:  # lane sums, then the factors on the device; no round trip
            ambiguous, block_sums = self._device_scales(st, ints, floats, per_seg, uses)
        elif lanes:
            self._host_scales(st, ints, floats, per_seg, rescales)
        stats.plan = time.perf_counter() - t0
        t1 = time.perf_counter()
        # a bf16 model whose merged tensors are all rounded to bf16 (or float32 recipes, which the copy
        # into the model would round): the kernel stores bf16 into the parameters themselves (tensors it
        # does not take are merged one by one afterwards, as always)
        direct16 = (self.fused and self.flat_out16 is not None
                    and all(dtype == torch.bfloat16 for _, dtype in st["rounding"]))
        settings = dict(normalize=bool(normalize.any()), lambda_=bool(use_lambda[active].any()),
                        divide=not self.variant.consensus and bool((total != 1).any()), direct16=direct16)
        self._device_merge(st, ints, floats, per_seg, flags, scale=lanes, **settings)
        if ambiguous is not None and ambiguous.cpu().numpy().any():  # rare: a factor the tree sum cannot decide
            stats.extra["in_order_norms"] = True
            self._host_scales(st, ints, floats, per_seg, rescales, block_sums)
            self._device_merge(st, ints, floats, per_seg, flags, scale=True, **settings)
        if direct16:
            self._merge_leftovers(recipe, st)
        elif st["rounding"] or not self.aliased or st["leftover"]:
            self._finish_flat(recipe, st)
        self._sync()
        stats.tensors = int(active.sum()) + len(st["leftover"])
        stats.merge = time.perf_counter() - t1

    def _device_scales(self, st: dict, ints: torch.Tensor, floats: torch.Tensor, per_seg: torch.Tensor,
                       uses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused: the rescale factors into ``per_seg[k:2k]`` on the device; returns where they are ambiguous,
        and the block sums."""
        from evomerge.search import device_kernels as dk

        self._ensure_norm_tables()
        block_sums = dk.lane_sums(self.keep_rule, self.flat_inputs, self.device_stat, self.field_keys,
                                  self.seg_starts, st["slot_models_t"], self.block_seg, ints, floats,
                                  base=self.flat_base, row_inverse=self.row_inverse)
        return dk.rescale_factors(block_sums, self.first_block_t, self.n_blocks_t, self._before_t, self._exact_t,
                                  st["slot_models_t"], uses, per_seg, slack=self.rescale_slack), block_sums

    def _ensure_norm_tables(self) -> None:
        """Once, for the fused rescale factors: ‖δ‖₁ of every segment and model, and the totals below which
        their sums are exact (``device_kernels.exact_sum_limits``), on the device."""
        if self._before_t is not None:
            return
        from evomerge.search import device_kernels as dk

        self._before_t = torch.from_numpy(self._before_norms()).to(self.device)
        limits = []
        total, step = self.flat_base.numel(), SCRATCH_CHUNK  # small steps: ~60 bytes of scratch per element
        for m in range(self.flat_inputs.shape[0]):  # over chunks of δ, each a whole number of blocks
            per_chunk = [dk.exact_sum_limits(self._delta_chunk(m, c0, min(total, c0 + step)),
                                             self.block_seg[c0 // L1_BLOCK: min(total, c0 + step) // L1_BLOCK],
                                             len(self.names)) for c0 in range(0, total, step)]
            limits.append(torch.stack(per_chunk).amin(0))
        self._exact_t = torch.stack(limits, dim=1).contiguous()

    def _host_scales(self, st: dict, ints: torch.Tensor, floats: torch.Tensor, per_seg: torch.Tensor,
                     rescales: np.ndarray, block_sums: torch.Tensor | None = None) -> None:
        """The rescale factors from ``l1_norm``'s in-order sums (block sums on the device, or ``block_sums``
        already computed; the blocks added on the host), into ``per_seg[k:2k]``."""
        k = st["slots"]
        if block_sums is not None:
            after = dp.segment_totals(block_sums.cpu().numpy(), self.first_block, self.n_blocks)
        else:
            after = self._device_after_norms(st, ints, floats)
        before = self._before_norms()[:, st["slot_models"]].T
        use = rescales & ~(before < fk.L1_EPS32) & ~(after < fk.L1_EPS32)
        scale = np.ones((k, len(self.names)), dtype=np.float32)
        scale[use] = before[use] / after[use]
        per_seg[k: 2 * k].copy_(torch.from_numpy(scale))

    def _device_merge(self, st: dict, ints: torch.Tensor, floats: torch.Tensor, per_seg: torch.Tensor,
                      flags: torch.Tensor, *, normalize: bool, scale: bool, lambda_: bool, divide: bool,
                      direct16: bool) -> None:
        """out = base + λ·mix(((δᵢ·keepᵢ)·scaleᵢ)·wᵢ) on the active segments of the flat output (``direct16``:
        rounded to bf16 into the bf16 parameters instead; fused only)."""
        k, slot_models, active = st["slots"], st["slot_models"], st["active"]
        if self.fused:
            from evomerge.search import device_kernels as dk

            dk.merge(dk.rule_code(self.keep_rule, self.variant.sparsification), self.flat_inputs, self.device_stat,
                     self.field_keys, self.seg_starts, st["slot_models_t"], self.block_seg, ints, floats, per_seg,
                     flags[0], flags[1], self.flat_base, None if direct16 else self.flat_out,
                     consensus=self.variant.consensus, normalize=normalize, scale=scale,
                     lambda_=lambda_, divide=divide, out16=self.flat_out16 if direct16 else None,
                     row_inverse=self.row_inverse)
            return
        norm = flags[0].bool() if normalize else None
        for c0, c1 in self.chunks:
            seg = self.seg_of[c0:c1]
            w = per_seg[:k].index_select(1, seg)
            sc = per_seg[k: 2 * k].index_select(1, seg) if scale else None
            weighted = torch.empty((k, c1 - c0), dtype=torch.float32, device=self.device)
            for i, m in enumerate(slot_models):
                keep = self._keep(i, m, c0, c1, seg, ints, floats)
                if keep is None:
                    weighted[i] = self._delta_chunk(m, c0, c1)
                else:
                    torch.mul(self._delta_chunk(m, c0, c1), keep, out=weighted[i])  # δ·keep: dropped → ±0
                if sc is not None:
                    weighted[i].mul_(sc[i])
                weighted[i].mul_(w[i])
            mixed = dp.mix(weighted, w, consensus=self.variant.consensus,
                           normalize=norm.index_select(0, seg) if norm is not None else None,
                           total=per_seg[2 * k + 1].index_select(0, seg) if divide else None)
            if lambda_:
                mixed *= per_seg[2 * k].index_select(0, seg)
            if st["all_active"]:
                torch.add(self.flat_base[c0:c1], mixed, out=self.flat_out[c0:c1])
                continue
            merged = torch.add(self.flat_base[c0:c1], mixed)
            for si in np.flatnonzero(active):
                a, e = self.offsets_array[si]
                if a < c1 and e > c0:
                    self.flat_out[max(a, c0): min(e, c1)] = merged[max(a, c0) - c0: min(e, c1) - c0]

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

    def _structure(self, tmpl: PlanTemplate) -> dict:
        """Per template: which task feeds each segment, its inputs' models, and the leftover tasks."""
        key = id(tmpl)
        if key in self._tables and self._tables[key]["template"] is tmpl:
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
                      and all(r.model in self.model_index for r in task.inputs) and self._same_tensor(task))
            if not usable:
                if task.method != "copy" and task.name in self.base:  # copies leave the base's values
                    leftover.append(task)
                continue
            seg_task[si], seg_k[si] = ti, len(task.inputs)
            slot_model[si, : len(task.inputs)] = [self.model_index[r.model] for r in task.inputs]
            dtype = tmpl.plan._out_dtype_of(task)
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
        if self.flat:
            self._ensure_flat_stats(slots)
        else:
            self._ensure_device_stats(slots)
        # the device path reads slot i of every segment from one model: is there one per slot?
        slot_models, uniform = [], True
        for i in range(slots):
            users = slot_model[(seg_task >= 0) & (seg_k > i), i]
            uniform &= bool((users == users[0]).all()) if len(users) else True
            slot_models.append(int(users[0]) if len(users) else 0)
        shape = (n_seg, slots)  # the candidate's tables, filled by ``segment_tables`` for each candidate
        tables = (np.zeros(shape, dtype=np.int8), np.zeros(shape, dtype=np.int32), np.zeros(shape, dtype=np.int32),
                  *(np.zeros(shape, dtype=np.float32) for _ in range(4)),
                  *(np.zeros(n_seg, dtype=np.bool_) for _ in range(3)), np.zeros(n_seg, dtype=np.float32))
        table = dict(template=tmpl, seg_task=seg_task, seg_k=seg_k, slot_model=slot_model, slots=slots,
                     slot_models=slot_models, uniform=uniform, all_active=bool((seg_task >= 0).all()),
                     slot_models_t=torch.tensor(slot_models, dtype=torch.int64, device=self.device),
                     leftover=leftover, rounding=rounding, active=seg_task >= 0, indices=indices, tables=tables,
                     use_total=np.zeros(n_seg, dtype=np.bool_), total=np.ones(n_seg, dtype=np.float32))
        self._tables[key] = table
        return table

    @staticmethod
    def _weight_total(weights: tuple, seen: dict) -> tuple[bool, np.float32]:
        """Σw as ``weighted_sum`` computes it (float32 torch sum) and whether |Σw| ≥ 1e-8; ``seen`` holds the
        candidate's sums so far (segments often share weights; a cache across candidates would grow all night)."""
        if weights not in seen:
            total = torch.tensor(list(weights), dtype=torch.float32).sum()
            seen[weights] = (bool(total.abs() >= 1e-8), np.float32(total.item()))
        return seen[weights]

    def _candidate_tables(self, recipe: Recipe) -> dict:
        """The candidate's per-segment tables (``segment_tables``, and Σw where sums are normalized), in its structure's dict."""
        tmpl = self._template(recipe)
        if tmpl.method.name != self.method:
            raise ValueError(f"builder was set up for '{self.method}', recipe uses '{tmpl.method.name}'")
        vector = tmpl.vector(recipe)
        st = self._structure(tmpl)
        seg_k, active = st["seg_k"], st["active"]
        tables = st["tables"]
        fk.segment_tables(self.sparsification, vector, *st["indices"], seg_k, self.numel, self.row, *tables)
        weight, normalize = tables[6], tables[7]
        use_total, total = st["use_total"], st["total"]
        if not self.variant.consensus and normalize.any():
            seen: dict = {}
            for si in np.flatnonzero(active & normalize):
                use_total[si], total[si] = self._weight_total(tuple(float(x) for x in weight[si, : seg_k[si]]), seen)
        return st

    def _build_flat(self, recipe: Recipe, stats: BuildStats) -> None:
        """The whole candidate in one compiled loop over the segments (``flat_kernel``); leftovers tensor by tensor."""
        t0 = time.perf_counter()
        st = self._candidate_tables(recipe)
        seg_k, active = st["seg_k"], st["active"]
        mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = st["tables"]
        use_total, total = st["use_total"], st["total"]
        before = self._before_norms() if rescale.any() else np.zeros((1, 1), dtype=np.float32)
        stats.plan = time.perf_counter() - t0
        t1 = time.perf_counter()
        args = (self.keep_rule, *self._buffers, self.blocks, self.seg_blocks, st["slot_model"], mode,
                lo, hi, thr, dme, eps, seg_k, weight, rescale, before, self.variant.consensus, normalize, use_total,
                total, use_lambda, lam)
        if len(self.cuts) > 2:
            blocked = fk.merge_parallel(*args, self.cuts)
        else:
            blocked = fk.merge_segments(*args, 0, len(self.names))
        stats.extra["block_segments"] = int(blocked) & 0xFFFFFFFF  # merged by blocks, not in one fused pass
        stats.extra["rank_segments"] = int(blocked) >> 32  # fused, comparing stable ranks (ties at a bound)
        if st["rounding"] or not self.aliased or st["leftover"]:
            with torch.inference_mode():
                self._finish_flat(recipe, st)
        stats.tensors = int(active.sum()) + len(st["leftover"])
        stats.merge = time.perf_counter() - t1

    def _finish_flat(self, recipe: Recipe, st: dict) -> None:
        """What the flat pass leaves to torch: casts to the recipe's dtype, copies into unaliased
        parameters, and tensors it cannot take (merged one by one)."""
        active = st["active"]
        for si, dtype in st["rounding"]:  # the engine casts to the recipe's dtype; the model holds float32
            a, e = self.offsets[self.names[si]]
            self.flat_out[a:e] = self.flat_out[a:e].to(dtype).to(torch.float32)
        if not self.aliased:
            for si in np.flatnonzero(active):
                n = self.names[si]
                a, e = self.offsets[n]
                self.params[n].copy_(self.flat_out[a:e].view(self.params[n].shape))
        self._merge_leftovers(recipe, st)

    def _merge_leftovers(self, recipe: Recipe, st: dict) -> None:
        """The tensors the flat pass cannot take: planned in full, merged one by one into the parameters."""
        if st["leftover"]:
            active = st["active"]
            plan = self.plan(recipe)
            for task in plan.tasks:
                if task.name not in self.seg_index or not active[self.seg_index[task.name]]:
                    self.params[task.name].copy_(self.merge_tensor(plan, task))

    # -- building ---------------------------------------------------------------------------------
    def plan(self, recipe: Recipe) -> MergePlan:
        """The engine's plan of ``recipe`` against the resident models' headers."""
        return plan_merge(recipe, readers=self.readers)

    def calibration_statistics(self, plan: MergePlan) -> dict[str, dict[str, torch.Tensor]]:
        """The plan's calibration statistics per model, computed on first use and kept for every later candidate."""
        from evomerge.engine import prepare_statistics

        key = plan.recipe.calibration.model_dump_json()
        if key not in self._statistics:
            prepare_statistics(plan, device=self.device, cache_dir=self.statistics_cache)
            self._statistics[key] = plan.statistics
        return self._statistics[key]

    def build(self, recipe: Recipe) -> BuildStats:
        """Write the merge of ``recipe`` into the live model's parameters, in place."""
        stats = BuildStats()
        if self.flat:  # numpy and compiled code on the flat buffers; torch (inference mode) only for leftovers
            self._build_flat(recipe, stats)
            return stats
        if self.path == "device":
            with torch.inference_mode():
                self._build_device(recipe, stats)
            return stats
        with torch.inference_mode():
            self._build_tensors(recipe, stats)
        return stats

    def _build_tensors(self, recipe: Recipe, stats: BuildStats) -> None:
        """Tensor by tensor through ``merge_tensor``."""
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

    def _same_tensor(self, task: TensorTask) -> bool:
        """Whether every input of ``task`` is the output tensor itself in its model (no layer shift)."""
        refs = list(task.inputs) + ([task.base] if task.base is not None else [])
        return all(r.name == self.readers[r.model].resolve_tied(task.name) for r in refs)

    def merge_tensor(self, plan: MergePlan, task: TensorTask) -> torch.Tensor:
        """One output tensor from resident inputs; identical to ``engine.compute_tensor``."""
        name = task.name
        if task.method == "copy" or name not in self.base:
            return self.params[name]
        if not self._same_tensor(task):
            refs = list(task.inputs) + ([task.base] if task.base is not None else [])
            shifted = next(r for r in refs if r.name != self.readers[r.model].resolve_tied(name))
            raise ValueError(f"the candidate builder merges each tensor from the same tensor of every model; "
                             f"tensor {name} takes '{shifted.name}' from '{shifted.model}' (layer-shifted "
                             f"slices): merge such recipes with `evomerge merge`")
        out_dtype = plan._out_dtype_of(task)
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
                                             model_index=index, device=self.device, compiled=True)
        return self._fields[key]

    @torch.inference_mode()
    def floor(self, threads: int | None = None) -> float:
        """The floor of one candidate: read every resident input once, write every parameter once.

        On the flat host path, one compiled pass base + Σδ over the same blocks as a candidate, on
        the candidates' threads (or ``threads`` threads). On CUDA, Σδ and + base over the flat
        buffers (two kernels). Elsewhere, eager torch tensor by tensor.
        """
        if self.flat:
            cuts = self.cuts if threads is None else fk.segment_cuts(self.numel, threads)
            args = (self.flat_inputs.numpy(), self.flat_base.numpy(), self.flat_out.numpy(), self.blocks,
                    self.seg_blocks)
            t0 = time.perf_counter()
            if len(cuts) > 2:
                fk.floor_parallel(*args, cuts)
            else:
                fk.floor_segments(*args, 0, len(self.names))
            return time.perf_counter() - t0
        if self.device.type == "cuda" or self.path == "device":  # base + Σδ over the flat buffers: two kernels
            if getattr(self, "_floor_out", None) is None:
                self._floor_out = torch.empty_like(self.flat_base)
            self._sync()
            t0 = time.perf_counter()
            torch.sum(self.flat_inputs, dim=0, dtype=torch.float32, out=self._floor_out)
            self._floor_out.add_(self.flat_base)
            self._sync()
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        for name, b in self.base.items():
            p = self.params[name]
            acc = b.clone()
            for inputs in self.inputs.values():
                acc.add_(inputs[name])
            p.copy_(acc)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def nonfinite_tensor(self) -> str | None:
        """The name of a live parameter holding NaN or ±inf (None if all are finite): one check on the host path."""
        from evomerge.engine import all_finite

        merged = None  # the flat paths' segment parameters (the tensor path, for other methods, has none)
        if self.path in ("host", "device"):
            merged = self.flat_out if self.aliased else getattr(self, "flat_out16", None)
        if merged is not None and all_finite(merged):
            others = [n for n in self.params if n not in self.seg_index]
        else:
            others = list(self.params)
        return next((n for n in others if not all_finite(self.params[n])), None)

    @torch.inference_mode()
    def load_model_weights(self, path: str | None) -> None:
        """Put a source model's own weights (None: the base) into the live model, from its file."""
        reader = self.readers[path or self.base_dir]
        for name, p in self.params.items():
            if reader.has_tensor(name) or name in getattr(reader, "tied_aliases", {}):
                p.copy_(reader.get_tensor(reader.resolve_tied(name)).to(p.device, p.dtype))

    def close(self) -> None:
        """Close the model files."""
        for r in self.readers.values():
            r.close()


class TaskVectors(Mapping):
    """One fine-tune's task vectors δ = x − base by tensor name, formed on access (float32, the engine's
    ``torch.sub``) from its resident bf16 values ``x`` and the float32 base, both flat."""

    def __init__(self, x: torch.Tensor, base: torch.Tensor, offsets: dict[str, tuple[int, int]],
                 shapes: dict[str, tuple[int, ...]]):
        self.x, self.flat_base, self.offsets, self.shapes = x, base, offsets, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        a, e = self.offsets[name]
        return torch.sub(self.x[a:e], self.flat_base[a:e]).view(self.shapes[name])

    def __iter__(self):
        return iter(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets)


def _check_finite_input(x: torch.Tensor, model: str, name: str) -> None:
    """``evomerge merge``'s refusal of inputs with NaN or infinite values, at load time."""
    if not all_finite(x):
        raise MergeError(f"model '{model}': tensor {name} contains NaN or infinite values")
