"""The candidate builder's device path (batched torch, what a GPU runs), here on the CPU: bit for bit against the engine.

The same recipes as the host path's tests (gradients, filters, a dense input, a negative weight,
normalize/rescale both ways), plus extreme densities, a recipe with fewer inputs in some tensors,
a bf16 recipe, and the building blocks: ``l1_norm``'s order from elementwise additions, and the
engine's sums in input order for five inputs (where ``torch.sum`` regroups on the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import read_weights
from tests.test_flat_builder import VARIANT_NAMES, _assert_live_equals, _recipe, source
from evomerge.engine import run_merge
from evomerge.methods.consensus import input_sum
from evomerge.methods.l1 import L1_BLOCK, _l1_norm_elementwise, l1_norm, lane_block_sums
from evomerge.recipe import load_recipe
from evomerge.search import device_path as dp
from evomerge.search.builder import CandidateBuilder


@pytest.fixture(scope="module")
def device_builders(llama_family):
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    made = {m: CandidateBuilder(llama_family["base"], models, method=m, device="cpu", seed=3, path="device")
            for m in VARIANT_NAMES}
    yield made
    for b in made.values():
        b.close()


@pytest.mark.parametrize("method", VARIANT_NAMES)
@pytest.mark.parametrize("flip", [False, True], ids=["defaults", "flipped"])
def test_device_candidate_equals_engine(device_builders, llama_family, tmp_path, method, flip):
    builder = device_builders[method]
    assert builder.path == "device" and not builder.flat
    recipe = load_recipe(_recipe(method, llama_family, flip=flip))
    stats = builder.build(recipe)
    assert "path" not in stats.extra, "fell back to tensor by tensor"
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    _assert_live_equals(builder, expected, f"{method} flip={flip}")


def test_device_path_extreme_densities_and_new_values(device_builders, llama_family, tmp_path):
    """density 0 and 1 mixed in one recipe, then the same structure with other values."""
    for method in ("ties", "dare_ties", "breadcrumbs", "della"):
        data = _recipe(method, llama_family, flip=False)
        data["models"][0]["parameters"]["density"] = 0.0
        data["models"][2]["parameters"]["density"] = [1.0, 0.0] if method != "della" else [1.0, 0.3]
        for i, d in enumerate((data, _recipe(method, llama_family, flip=True, scale=0.5, density0=0.2))):
            recipe = load_recipe(d)
            device_builders[method].build(recipe)
            expected = read_weights(run_merge(recipe, tmp_path / f"{method}{i}", device="cpu", seed=3))
            _assert_live_equals(device_builders[method], expected, f"{method} recipe {i}")


def test_device_path_bf16_recipe_and_tied_embeddings(qwen_family, tmp_path):
    """A bf16 recipe (outputs rounded to bf16) on Qwen2 with tied embeddings."""
    models = {"a": str(qwen_family["ft0"]), "b": str(qwen_family["ft1"])}
    for method in ("dare_ties", "ties"):
        recipe = load_recipe({
            "merge_method": method, "base_model": str(qwen_family["base"]), "dtype": "bfloat16",
            "models": [{"model": models["a"], "parameters": {"weight": [1.0, 0.4], "density": 0.5}},
                       {"model": models["b"], "parameters": {"weight": 0.8, "density": [0.3, 0.9]}}],
        })
        builder = CandidateBuilder(qwen_family["base"], models, method=method, device="cpu", seed=0,
                                   dtype="bfloat16", path="device")
        builder.build(recipe)
        expected = read_weights(run_merge(recipe, tmp_path / method, device="cpu", seed=0))
        live = builder.model.state_dict()
        bad = [k for k, v in expected.items() if not torch.equal(v, live[k].to(v.dtype))]
        assert not bad, f"{method}: {bad[:3]}"
        builder.close()


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
        totals = dp.segment_totals(sums, np.array([0]), np.array([blocks]))
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
    """Five fine-tunes (where torch.sum would regroup): host path, device path and engine agree."""
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
        for path in ("host", "device"):
            builder = CandidateBuilder(base, models, method=method, device="cpu", seed=0, path=path)
            builder.build(recipe)
            _assert_live_equals(builder, expected, f"{method} {path}")
            builder.close()


def test_device_path_falls_back_when_slices_swap_models(device_builders, llama_family, tmp_path):
    """Two slices whose second input is ft1 in layers 0-1 and ft2 in layers 2-3: tensor by tensor, still exact."""
    ft0, ft1, ft2, base = (str(llama_family[k]) for k in ("ft0", "ft1", "ft2", "base"))
    recipe = load_recipe({
        "merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"density": 0.5},
        "slices": [
            {"sources": [source(ft0, 0, 2, weight=[1.0, 0.2]), source(ft1, 0, 2, weight=0.6), source(base, 0, 2)]},
            {"sources": [source(ft0, 2, 4, weight=0.4), source(ft2, 2, 4, weight=0.7), source(base, 2, 4)]},
        ],
    })
    stats = device_builders["ties"].build(recipe)
    assert stats.extra.get("path") == "tensors"
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    _assert_live_equals(device_builders["ties"], expected, "slices")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_resident_bytes_covers_what_the_device_path_holds(llama_family, method):
    """The GPU memory check's estimate is at least what the builder keeps (float32 and bf16 models, with
    the fused kernels and without), and over it by no more than the allowance for setup's scratch."""
    from evomerge.search.memory import CHUNK_SCRATCH, SCRATCH_CHUNK, SORT_SCRATCH, resident_bytes

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    for dtype in ("float32", "bfloat16"):
        for fused in (False, True):  # the batched torch path stores fields and the element index; the kernels do not
            builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=0,
                                       path="device", dtype=dtype)
            builder.fused = fused
            builder.precompute()
            if not fused:
                builder.seg_of, builder.flat_out  # noqa: B018 (made on first use by the torch path)
            assert builder.inputs16 == (dtype == "bfloat16")
            held = sum(t.numel() * t.element_size() for t in (builder.flat_base, builder.flat_inputs,
                                                               builder._flat_out, builder.flat_out16, builder._seg_of,
                                                               builder.device_stat, builder.device_fields,
                                                               builder.field_keys)
                       if t is not None)
            largest = max(v.numel() for v in builder.base.values())
            estimate = resident_bytes(builder.flat_base.numel(), largest, 2, builder.variant.sparsification,
                                      builder.model_dtype, "device", fused, int(builder.row.max()))
            if method == "della":  # 16-bit row ranks on the fused path, q in float32 on the torch path
                assert builder.device_stat.dtype == (torch.int16 if fused else torch.float32)
            if method == "ties":  # ranks on the device for the torch path only (the kernels: bound elements)
                assert (builder.device_stat is None) == fused
            keys = 8 * 2 * len(builder.names)  # the field keys: a few bytes per tensor, not counted
            scratch = max(SORT_SCRATCH * largest, CHUNK_SCRATCH * SCRATCH_CHUNK)
            assert held <= estimate + keys and estimate <= held + scratch, (dtype, fused)
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


def test_builder_refuses_a_gpu_too_small(llama_family, monkeypatch):
    """On CUDA the builder compares that estimate with the free memory first: here the check itself, with the
    free memory faked, names the need, the model and what to do."""
    from evomerge.engine import MergeError

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    builder = CandidateBuilder(llama_family["base"], models, method="dare_ties", device="cpu", seed=0, path="device")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 10 ** 12))
    with pytest.raises(MergeError, match=r"needs about .* GiB .* 2 fine-tune\(s\) \(dare_ties\).*--device cpu"):
        builder._check_device_memory()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 ** 12, 10 ** 12))
    builder._check_device_memory()  # enough: no error
    builder.close()


def test_builder_refuses_too_little_host_memory_for_the_magnitude_order(llama_family, monkeypatch):
    """The fused kernels' TIES keeps each fine-tune's magnitude order in host memory: checked first too."""
    import collections

    import psutil

    from evomerge.engine import MergeError
    from evomerge.search import builder as builder_module

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    builder = CandidateBuilder(llama_family["base"], models, method="ties", device="cpu", seed=0, path="device")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 ** 12, 10 ** 12))
    monkeypatch.setattr(builder_module, "fused_kernels_available", lambda device: True)
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1000))
    with pytest.raises(MergeError, match=r"magnitude order in host memory: about .* GiB for ties"):
        builder._check_device_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(10 ** 12))
    builder._check_device_memory()  # enough: no error
    builder.close()
