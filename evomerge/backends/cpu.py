"""The cpu backend: a candidate of the task-arithmetic family in one compiled pass on the host (numba).

The flat buffers (``flat``), plus precomputed once per tensor and model: the stable ranks of
|δᵢ| and each tensor's magnitudes in ascending order (a TIES/breadcrumbs bound becomes one
comparison of |δ| with a value), DELLA's rank term q per element, and for DARE and DELLA the
random fields, in ascending order with running sums of |δ| (DELLA: also q and |δ| in that order),
from which a candidate's rescale norms are read off. One compiled pass (``cpu_kernel``) then
merges all tensors at once, on numba's threads for larger models; a candidate of a small model
takes well under a millisecond. Before loading it checks the host's available memory
(``host_path_bytes``) and leaves out the optional rescale-norm tables when only they do not fit.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from evomerge.backends import cpu_kernel as fk
from evomerge.backends.base import BuildStats
from evomerge.backends.flat import FlatBackend
from evomerge.backends.memory import host_path_bytes
from evomerge.backends.reference import TensorStatistics
from evomerge.engine import MergeError
from evomerge.methods import della_ranks, flat_ranks, random_field
from evomerge.methods.l1 import L1_BLOCK
from evomerge.recipe import Recipe


class CpuBackend(FlatBackend):
    """The compiled host pass over flat buffers (see the module docstring)."""

    name = "cpu"

    def resident_bytes(self, sizes: list[int], rows: list[int]) -> int:
        need, _ = host_path_bytes(sum(sizes), max(sizes, default=0), len(self.model_paths),
                                  self.variant.sparsification, self.model_dtype)
        return need

    def check_memory(self) -> None:
        """Before loading anything: refuse a model whose buffers exceed the available memory, and leave
        out the optional rescale-norm tables (slower DARE/DELLA norms, same bits) when only they do not fit."""
        import psutil

        self.rescale_tables = True
        sizes, _ = self.tensor_sizes()
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
                          stacklevel=5)

    def prepare(self) -> None:
        if self.variant is not None:
            self.ensure_statistics(len(self.model_paths))

    def build(self, recipe: Recipe, stats: BuildStats) -> None:
        """numpy and compiled code on the flat buffers; torch (inference mode) only for leftovers."""
        self._build_flat(recipe, stats)

    def tensor_statistics(self, name: str, path: str, index: int) -> TensorStatistics:
        """As the reference backend's, as views of the flat statistics."""
        sp = self.variant.sparsification
        self.ensure_statistics(index + 1)
        (a, e), shape, m = self.offsets[name], self.base[name].shape, self.model_index[path]
        ranks = self.flat_ranks[m, a:e].view(shape) if self.flat_ranks is not None else None
        field = self.flat_fields[index, a:e].view(shape) if sp in ("random", "della_magprune") else None
        return TensorStatistics(flat_ranks=ranks if sp in ("magnitude", "magnitude_outliers") else None,
                                ranks=ranks if sp == "della_magprune" else None, field=field)

    def setup(self, total: int) -> None:
        """Cache-sized blocks, thread cuts, and numpy views of the buffers."""
        super().setup(total)
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

    def ensure_statistics(self, slots: int) -> None:
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


    def _build_flat(self, recipe: Recipe, stats: BuildStats) -> None:
        """The whole candidate in one compiled loop over the segments (``cpu_kernel``); leftovers tensor by tensor."""
        t0 = time.perf_counter()
        st = self._candidate_tables(recipe)
        seg_k, active = st.seg_k, st.active
        mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = st.tables
        use_total, total = st.use_total, st.total
        before = self._before_norms() if rescale.any() else np.zeros((1, 1), dtype=np.float32)
        stats.plan = time.perf_counter() - t0
        t1 = time.perf_counter()
        args = (self.keep_rule, *self._buffers, self.blocks, self.seg_blocks, st.slot_model, mode,
                lo, hi, thr, dme, eps, seg_k, weight, rescale, before, self.variant.consensus, normalize, use_total,
                total, use_lambda, lam)
        if len(self.cuts) > 2:
            blocked = fk.merge_parallel(*args, self.cuts)
        else:
            blocked = fk.merge_segments(*args, 0, len(self.names))
        stats.extra["block_segments"] = int(blocked) & 0xFFFFFFFF  # merged by blocks, not in one fused pass
        stats.extra["rank_segments"] = int(blocked) >> 32  # fused, comparing stable ranks (ties at a bound)
        if st.rounding or not self.aliased or st.leftover:
            with torch.inference_mode():
                self._finish_flat(recipe, st)
        stats.tensors = int(active.sum()) + len(st.leftover)
        stats.merge = time.perf_counter() - t1

