"""The cuda backend's setup on the CPU (no kernel launched): its memory estimates and checks, the
fallback to tensor by tensor, and the building blocks of its sums (``l1_norm``'s order from
elementwise additions, the engine's sums in input order for five inputs). Its kernels are
checked against the engine in Triton's interpreter (``test_device_kernels.py``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # the cuda backend runs on the CPU only in Triton's interpreter

from tests.conftest import read_weights  # noqa: E402
from tests.helpers import assert_live_equals as _assert_live_equals, source  # noqa: E402
from evomerge.backends.cuda import segment_totals  # noqa: E402
from evomerge.engine import run_merge  # noqa: E402
from evomerge.methods.consensus import input_sum  # noqa: E402
from evomerge.methods.l1 import L1_BLOCK, _l1_norm_elementwise, l1_norm, lane_block_sums  # noqa: E402
from evomerge.recipe import load_recipe  # noqa: E402
from evomerge.search.builder import CandidateBuilder  # noqa: E402

needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not __import__("importlib").util.find_spec("triton"),
    reason="the cuda backend on the CPU needs Triton, its interpreter on before Triton is imported")


def test_lane_block_sums_follow_l1_norm_order(monkeypatch):
    """Block sums added in order reproduce ``l1_norm`` to the bit, masked or not, with a partial last block
    (and across the GPU implementation's chunks)."""
    import evomerge.methods.l1 as l1

    monkeypatch.setattr(l1, "DEVICE_CHUNK", 2 * L1_BLOCK)
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 4096, 4097, 3 * 4096 + 1000):
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
        keep = torch.rand(n, generator=g) < 0.4
        blocks = -(-n // L1_BLOCK)
        mags = torch.zeros(2, blocks * L1_BLOCK, dtype=torch.float64)
        mags[0, :n] = x.abs()
        mags[1, :n] = x.abs().masked_fill(~keep, 0)
        sums = lane_block_sums(mags).numpy()
        totals = segment_totals(sums, np.array([0]), np.array([blocks]))
        assert totals[0, 0] == l1_norm(x).item()
        assert totals[1, 0] == l1_norm(x, keep).item()
        # the engine's implementation for GPUs (elementwise lanes, blocks on the host), here on the CPU
        assert torch.equal(_l1_norm_elementwise(x), l1_norm(x))
        assert torch.equal(_l1_norm_elementwise(x.reshape(1, -1), keep.reshape(1, -1)), l1_norm(x, keep))


def test_sums_run_in_input_order_for_five_inputs():
    """((D₀ + D₁) + D₂) + …: for five inputs torch.sum(dim=0) on the CPU groups differently."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 1000, generator=g) * torch.rand(5, 1, generator=g) * 10
    expected = w[0].clone()
    for row in w[1:]:
        expected = expected + row
    assert torch.equal(input_sum(w), expected)
    assert not torch.equal(w.sum(dim=0), expected), "torch.sum now adds in order: simplify input_sum's docstring"


def test_host_and_device_paths_agree_with_five_models(tmp_path):
    """Five fine-tunes (where torch.sum would regroup): the cpu and reference backends and the engine agree."""
    from evomerge.tiny import build_tiny_family

    base, fts = build_tiny_family(tmp_path / "five", family="llama", n_finetunes=5, seed=4, num_layers=2)
    models = {f"m{i}": str(p) for i, p in enumerate(fts)}
    for method in ("task_arithmetic", "ties"):
        recipe = load_recipe({
            "merge_method": method, "base_model": str(base), "dtype": "float32",
            "models": [{"model": p, "parameters": {"weight": 0.3 + 0.2 * i, "density": 0.6}}
                       for i, p in enumerate(models.values())],
            "parameters": {"normalize": True}})
        expected = read_weights(run_merge(recipe, tmp_path / method, device="cpu", seed=0))
        for backend in ("cpu", "reference"):
            builder = CandidateBuilder(base, models, method=method, device="cpu", seed=0, backend=backend)
            builder.build(recipe)
            _assert_live_equals(builder, expected, f"{method} {backend}")
            builder.close()


@needs_triton
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_resident_bytes_covers_what_the_cuda_backend_holds(llama_family, method):
    """The GPU memory check's estimate is at least what the cuda backend keeps (float32 and bf16 models),
    and over it by no more than the allowance for setup's scratch."""
    from evomerge.backends.memory import CHUNK_SCRATCH, SCRATCH_CHUNK, SORT_SCRATCH

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    for dtype in ("float32", "bfloat16"):
        builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=0,
                                   backend="cuda", dtype=dtype)
        builder.precompute()
        b = builder.backend
        assert b.inputs16 == (dtype == "bfloat16")
        held = sum(t.numel() * t.element_size() for t in (b.flat_base, b.flat_inputs, b._flat_out, b.flat_out16,
                                                          b.device_stat, b.field_keys) if t is not None)
        largest = max(v.numel() for v in b.base.values())
        estimate = b.resident_bytes(*b.tensor_sizes())
        if method == "della":  # 16-bit row ranks
            assert b.device_stat.dtype == torch.int16
        if method == "ties":  # nothing per element on the device (the kernels compare with bound elements)
            assert b.device_stat is None
        keys = 8 * 2 * len(b.names)  # the field keys: a few bytes per tensor, not counted
        scratch = max(SORT_SCRATCH * largest, CHUNK_SCRATCH * SCRATCH_CHUNK)
        assert held <= estimate + keys and estimate <= held + scratch, dtype
        builder.close()


def test_della_q_from_16_bit_ranks_is_float32_division():
    """float32(r · (1/(n−1) in float64)) is float32(r/(n−1)) correctly rounded for every 0 ≤ r < n ≤ 2¹⁶:
    how the fused kernels turn a 16-bit DELLA row rank into q (``device_kernels._della_q``)."""
    import numpy as np

    ranks = np.arange(1 << 16, dtype=np.float64)
    ranks32 = ranks.astype(np.float32)
    for d in range(1, 1 << 16):  # d = n − 1
        via_inverse = (ranks[: d + 1] * (1.0 / d)).astype(np.float32)
        divided = ranks32[: d + 1] / np.float32(d)
        assert np.array_equal(via_inverse, divided), d


@needs_triton
def test_builder_refuses_a_gpu_too_small(llama_family, monkeypatch):
    """On CUDA the builder compares that estimate with the free memory first: here the check itself, with the
    free memory faked, names the need, the model and what to do."""
    from evomerge.engine import MergeError

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    builder = CandidateBuilder(llama_family["base"], models, method="dare_ties", device="cpu", seed=0, backend="cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 10 ** 12))
    with pytest.raises(MergeError, match=r"needs about .* GiB .* 2 fine-tune\(s\) \(dare_ties\).*--device cpu"):
        builder.backend.check_device_memory()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 ** 12, 10 ** 12))
    builder.backend.check_device_memory()  # enough: no error
    builder.close()


@needs_triton
def test_builder_refuses_too_little_host_memory_for_the_magnitude_order(llama_family, monkeypatch):
    """The fused kernels' TIES keeps each fine-tune's magnitude order in host memory: checked first too."""
    import collections

    import psutil

    from evomerge.engine import MergeError

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    builder = CandidateBuilder(llama_family["base"], models, method="ties", device="cpu", seed=0, backend="cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 ** 12, 10 ** 12))
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1000))
    with pytest.raises(MergeError, match=r"magnitude order in host memory: about .* GiB for ties"):
        builder.backend.check_device_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(10 ** 12))
    builder.backend.check_device_memory()  # enough: no error
    builder.close()


@needs_triton
def test_cuda_backend_falls_back_when_slices_swap_models(llama_family, tmp_path):
    """Two slices whose second input is ft1 in layers 0-1 and ft2 in layers 2-3: tensor by tensor, still exact."""
    ft0, ft1, ft2, base = (str(llama_family[k]) for k in ("ft0", "ft1", "ft2", "base"))
    recipe = load_recipe({
        "merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"density": 0.5},
        "slices": [
            {"sources": [source(ft0, 0, 2, weight=[1.0, 0.2]), source(ft1, 0, 2, weight=0.6), source(base, 0, 2)]},
            {"sources": [source(ft0, 2, 4, weight=0.4), source(ft2, 2, 4, weight=0.7), source(base, 2, 4)]},
        ],
    })
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(base, models, method="ties", device="cpu", seed=3, backend="cuda")
    stats = builder.build(recipe)
    assert stats.extra.get("path") == "tensors"
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    _assert_live_equals(builder, expected, "slices")
    builder.close()
