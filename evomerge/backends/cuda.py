"""The cuda backend: a candidate of the task-arithmetic family in at most three fused Triton kernels.

The flat buffers (``flat``) with every tensor starting at a multiple of ``L1_BLOCK``, so each
4096-element block of the rescale norms lies in one tensor. A candidate is: the masked |δ| summed
per block in ``l1_norm``'s order (``cuda_kernels.lane_sums``), the rescale factors on the device
(``rescale_factors``; in the rare case the tree sum cannot decide a factor's float32, the blocks
are added in order on the host), and one merge kernel (``merge``) with the engine's float32
operations. The GPU stays lean: a bf16 model's fine-tunes stay bf16 (the kernels form δ), the
random fields are computed where used, TIES/breadcrumbs windows are compared with their bound
elements (the stable order lives on the host) and DELLA's rank term is a 16-bit row rank.

Runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is
imported; the tests do). Everything stays resident, so it refuses to start on a GPU whose free
memory cannot hold it (``resident_bytes``), before loading anything.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from numba import njit

from evomerge.backends import cpu_kernel as fk
from evomerge.backends.base import BuildStats
from evomerge.backends.flat import FlatBackend, Structure
from evomerge.backends.memory import RANK16_MAX_ROW, SCRATCH_CHUNK, resident_bytes
from evomerge.engine import MergeError
from evomerge.methods import della_ranks, field_seed, stable_order
from evomerge.methods.l1 import L1_BLOCK
from evomerge.recipe import Recipe


class CudaBackend(FlatBackend):
    """Fused Triton kernels over flat, block-aligned buffers (see the module docstring)."""

    name = "cuda"
    ALIGNED = True

    def holds_bf16_inputs(self) -> bool:
        return self.model_dtype == torch.bfloat16 and self.variant is not None

    def resident_bytes(self, sizes: list[int], rows: list[int]) -> int:
        laid_out = sum(-(-n // L1_BLOCK) * L1_BLOCK for n in sizes)
        return resident_bytes(laid_out, max(sizes, default=0), len(self.model_paths),
                              self.variant.sparsification if self.variant else None, self.model_dtype, "device",
                              True, max(rows, default=0))

    def check_device_memory(self) -> None:
        """Refuse a model whose resident buffers exceed the GPU's free memory, or whose magnitude order
        (TIES, breadcrumbs: held on the host) exceeds the host's."""
        super().check_device_memory()
        if self.variant.sparsification not in ("magnitude", "magnitude_outliers"):
            return
        import psutil

        sizes, _ = self.tensor_sizes()
        laid_out = sum(-(-n // L1_BLOCK) * L1_BLOCK for n in sizes)
        host = 4 * len(self.model_paths) * laid_out  # the fused magnitude rules' order per tensor, in host memory
        available = psutil.virtual_memory().available
        if host > available:
            gib = 2 ** 30
            raise MergeError(f"the candidate builder keeps each fine-tune's magnitude order in host memory: "
                             f"about {host / gib:.1f} GiB for {self.method}, but {available / gib:.1f} GiB "
                             f"are available: use fewer fine-tunes or a smaller model")

    def prepare(self) -> None:
        if self.variant is None:
            return
        self.ensure_statistics(len(self.model_paths))
        if self.variant.sparsification is not None:  # masked inputs are rescaled by default
            self._ensure_norm_tables()

    def build(self, recipe: Recipe, stats: BuildStats) -> None:
        with torch.inference_mode():
            self._build_device(recipe, stats)

    def setup(self, total: int) -> None:
        """Block → segment index, each segment's L1 blocks, and the per-candidate staging."""
        super().setup(total)
        block_seg = np.empty(total // L1_BLOCK, dtype=np.int32)  # the segment of each L1 block
        self.first_block = np.empty(len(self.names), dtype=np.int64)
        self.n_blocks = np.empty(len(self.names), dtype=np.int64)
        for si, (a, e) in enumerate(self.offsets_array):
            end = (self.offsets_array[si + 1][0] if si + 1 < len(self.names) else total)
            block_seg[a // L1_BLOCK: end // L1_BLOCK] = si  # the gap after a segment belongs to it (δ = 0 there)
            self.first_block[si], self.n_blocks[si] = a // L1_BLOCK, -(-(e - a) // L1_BLOCK)
        self.block_seg = torch.from_numpy(block_seg).to(self.device)
        self.first_block_t = torch.from_numpy(self.first_block).to(self.device)
        self.n_blocks_t = torch.from_numpy(self.n_blocks).to(self.device)
        self._before_t: torch.Tensor | None = None  # ‖δ‖₁ per segment and model on the device
        self._staging: dict[tuple, tuple] = {}  # per table layout: host buffer, its device twin, views (``_upload``)
        self.rescale_slack = 1.0  # widens the device rescale factors' error interval (tests force the fallback)
        self.device_stat: torch.Tensor | None = None  # DELLA's row ranks (or q) per model
        self.row_inverse: torch.Tensor | None = None  # DELLA: float64 1/(n − 1) per segment
        self.magnitude_order: np.ndarray | None = None  # magnitude rules: stable order per tensor (host)
        # the random fields are computed where used, from each slot's key per tensor and the tensor's start
        self.field_keys: torch.Tensor | None = None  # int64 [slots, segments]
        self.seg_starts = torch.tensor([a for a, _ in self.offsets_array], dtype=torch.int64, device=self.device)

    def ensure_statistics(self, slots: int) -> None:
        """The magnitude order (TIES, breadcrumbs; on the host), DELLA's row ranks (16-bit; q itself for rows
        longer than 2¹⁶) and the random-field keys of input slots < ``slots``, once."""
        sp = self.variant.sparsification
        if sp in ("magnitude", "magnitude_outliers"):
            self._ensure_magnitude_order()
        elif sp == "della_magprune" and self.device_stat is None:
            # the 16-bit row rank r, from which the kernels compute q (``cuda_kernels._della_q``)
            rank16 = int(self.row.max(initial=0)) <= RANK16_MAX_ROW
            dtype = torch.int16 if rank16 else torch.float32
            stat = torch.zeros_like(self.flat_inputs, dtype=dtype)
            for si, n in enumerate(self.names):
                a, e = self.offsets[n]
                for i, p in enumerate(self.model_paths.values()):
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
        (``rule_tables``' [lo, hi)), −1 for an open end, −2 at ``lo`` for an empty window (``cuda_kernels._keep``)."""
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

    def _delta_chunk(self, m: int, c0: int, c1: int) -> torch.Tensor:
        """Model m's task vector δ on flat elements [c0, c1) (float32; formed from bf16 values when ``inputs16``)."""
        if self.inputs16:
            return torch.sub(self.flat_inputs[m, c0:c1], self.flat_base[c0:c1])
        return self.flat_inputs[m, c0:c1]

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

    def _build_device(self, recipe: Recipe, stats: BuildStats) -> None:
        """The whole candidate over the flat buffers in the fused kernels; tensor by tensor when an
        input slot is fed by different models in different tensors."""
        t0 = time.perf_counter()
        st = self._candidate_tables(recipe)
        if not st.uniform:  # an input slot fed by different models in different tensors
            stats.extra["path"] = "tensors"
            self.build_tensors(recipe, stats)
            return
        mode, lo, hi, thr, dme, eps, weight, normalize, rescale, use_lambda, lam = st.tables
        k, slot_models, active = st.slots, st.slot_models, st.active
        ints_np, floats_np = rule_tables(self.keep_rule, mode, lo, hi, thr, dme, eps)
        if self.keep_rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE):  # rank windows as bound elements
            ints_np = self._bound_positions(ints_np, slot_models)
        n_seg = len(self.names)
        # the engine rescales each input it masks by ‖δ‖₁/‖m⊙δ‖₁ (factors computed below, 1 elsewhere)
        rescales = (active & rescale)[None, :] & (mode.T != fk.MODE_ALL)  # [slots, segments]
        lanes = bool(rescales.any())
        total = np.where(st.use_total & normalize, st.total, np.float32(1))
        rows = np.concatenate([weight.T, np.ones((k, n_seg), dtype=np.float32), lam[None, :], total[None, :]])
        ints, floats, per_seg, flags, uses = self._upload(ints_np, floats_np, rows.astype(np.float32),
                                                          np.stack([normalize, active]), rescales)
        ambiguous = block_sums = None
        if lanes:  # lane sums, then the factors on the device; no round trip
            ambiguous, block_sums = self._device_scales(st, ints, floats, per_seg, uses)
        stats.plan = time.perf_counter() - t0
        t1 = time.perf_counter()
        # a bf16 model whose merged tensors are all rounded to bf16 (or float32 recipes, which the copy
        # into the model would round): the kernel stores bf16 into the parameters themselves (tensors it
        # does not take are merged one by one afterwards, as always)
        direct16 = (self.flat_out16 is not None
                    and all(dtype == torch.bfloat16 for _, dtype in st.rounding))
        settings = dict(normalize=bool(normalize.any()), lambda_=bool(use_lambda[active].any()),
                        divide=not self.variant.consensus and bool((total != 1).any()), direct16=direct16)
        self._device_merge(st, ints, floats, per_seg, flags, scale=lanes, **settings)
        if ambiguous is not None and ambiguous.cpu().numpy().any():  # rare: a factor the tree sum cannot decide
            stats.extra["in_order_norms"] = True
            self._host_scales(st, ints, floats, per_seg, rescales, block_sums)
            self._device_merge(st, ints, floats, per_seg, flags, scale=True, **settings)
        if direct16:
            self._merge_leftovers(recipe, st)
        elif st.rounding or not self.aliased or st.leftover:
            self._finish_flat(recipe, st)
        self.sync()
        stats.tensors = int(active.sum()) + len(st.leftover)
        stats.merge = time.perf_counter() - t1

    def _device_scales(self, st: Structure, ints: torch.Tensor, floats: torch.Tensor, per_seg: torch.Tensor,
                       uses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused: the rescale factors into ``per_seg[k:2k]`` on the device; returns where they are ambiguous,
        and the block sums."""
        from evomerge.backends import cuda_kernels as dk

        self._ensure_norm_tables()
        block_sums = dk.lane_sums(self.keep_rule, self.flat_inputs, self.device_stat, self.field_keys,
                                  self.seg_starts, st.slot_models_t, self.block_seg, ints, floats,
                                  base=self.flat_base, row_inverse=self.row_inverse)
        return dk.rescale_factors(block_sums, self.first_block_t, self.n_blocks_t, self._before_t, self._exact_t,
                                  st.slot_models_t, uses, per_seg, slack=self.rescale_slack), block_sums

    def _ensure_norm_tables(self) -> None:
        """Once, for the fused rescale factors: ‖δ‖₁ of every segment and model, and the totals below which
        their sums are exact (``cuda_kernels.exact_sum_limits``), on the device."""
        if self._before_t is not None:
            return
        from evomerge.backends import cuda_kernels as dk

        self._before_t = torch.from_numpy(self._before_norms()).to(self.device)
        limits = []
        total, step = self.flat_base.numel(), SCRATCH_CHUNK  # small steps: ~60 bytes of scratch per element
        for m in range(self.flat_inputs.shape[0]):  # over chunks of δ, each a whole number of blocks
            per_chunk = [dk.exact_sum_limits(self._delta_chunk(m, c0, min(total, c0 + step)),
                                             self.block_seg[c0 // L1_BLOCK: min(total, c0 + step) // L1_BLOCK],
                                             len(self.names)) for c0 in range(0, total, step)]
            limits.append(torch.stack(per_chunk).amin(0))
        self._exact_t = torch.stack(limits, dim=1).contiguous()

    def _host_scales(self, st: Structure, ints: torch.Tensor, floats: torch.Tensor, per_seg: torch.Tensor,
                     rescales: np.ndarray, block_sums: torch.Tensor) -> None:
        """The rescale factors from ``l1_norm``'s in-order sums (the device's block sums added in order on
        the host), into ``per_seg[k:2k]``."""
        k = st.slots
        after = segment_totals(block_sums.cpu().numpy(), self.first_block, self.n_blocks)
        before = self._before_norms()[:, st.slot_models].T
        use = rescales & ~(before < fk.L1_EPS32) & ~(after < fk.L1_EPS32)
        scale = np.ones((k, len(self.names)), dtype=np.float32)
        scale[use] = before[use] / after[use]
        per_seg[k: 2 * k].copy_(torch.from_numpy(scale))

    def _device_merge(self, st: Structure, ints: torch.Tensor, floats: torch.Tensor, per_seg: torch.Tensor,
                      flags: torch.Tensor, *, normalize: bool, scale: bool, lambda_: bool, divide: bool,
                      direct16: bool) -> None:
        """out = base + λ·mix(((δᵢ·keepᵢ)·scaleᵢ)·wᵢ) on the active segments of the flat output (``direct16``:
        rounded to bf16 into the bf16 parameters instead)."""
        from evomerge.backends import cuda_kernels as dk

        dk.merge(dk.rule_code(self.keep_rule, self.variant.sparsification), self.flat_inputs, self.device_stat,
                 self.field_keys, self.seg_starts, st.slot_models_t, self.block_seg, ints, floats, per_seg,
                 flags[0], flags[1], self.flat_base, None if direct16 else self.flat_out,
                 consensus=self.variant.consensus, normalize=normalize, scale=scale,
                 lambda_=lambda_, divide=divide, out16=self.flat_out16 if direct16 else None,
                 row_inverse=self.row_inverse)


@njit(cache=True)
def segment_totals(block_sums: np.ndarray, first_block: np.ndarray, n_blocks: np.ndarray) -> np.ndarray:
    """float32 L1 norm per input and segment: its blocks' sums added in order from +0.0, then rounded."""
    k, n_seg = block_sums.shape[0], first_block.shape[0]
    out = np.empty((k, n_seg), dtype=np.float32)
    for i in range(k):
        for s in range(n_seg):
            total = 0.0
            for b in range(first_block[s], first_block[s] + n_blocks[s]):
                total += block_sums[i, b]
            out[i, s] = np.float32(total)
    return out


def rule_tables(rule: int, mode: np.ndarray, lo: np.ndarray, hi: np.ndarray, thr: np.ndarray, dme: np.ndarray,
                eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per input slot and segment ([slots, segments]), the constants of the method's one keep rule.

    Keep-all and keep-none inputs are folded into the rule: a rank window [0, 2³¹−1) or [0, 0);
    a field threshold 2 or −1 (the field lies in [0, 1)); DELLA's p = q·0 + 2 or −1. Returns
    (int32 [2, slots, segments]: lo, hi; float32 [2, slots, segments]: thr or dme, eps).
    """
    ints = np.zeros((2, *mode.T.shape), dtype=np.int32)
    floats = np.zeros((2, *mode.T.shape), dtype=np.float32)
    keep_all, keep_none = mode.T == fk.MODE_ALL, mode.T == fk.MODE_NONE
    if rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE):
        ints[0], ints[1] = lo.T, hi.T
        ints[0][keep_all | keep_none] = 0
        ints[1][keep_all] = np.iinfo(np.int32).max
        ints[1][keep_none] = 0
    elif rule == fk.RULE_FIELD:
        floats[0] = thr.T
    else:  # DELLA: p = q·ε + (density − ε); one-element rows (MODE_FIELD) keep with p = density
        field_rows = mode.T == fk.MODE_FIELD
        floats[0] = np.where(field_rows, thr.T, dme.T)
        floats[1] = np.where(field_rows, 0, eps.T)
        floats[1][keep_all | keep_none] = 0
    if rule in (fk.RULE_FIELD, fk.RULE_DELLA):
        floats[0][keep_all] = 2.0
        floats[0][keep_none] = -1.0
    return ints, floats
