"""The cuda backend's fused Triton kernels, run by Triton's interpreter on the CPU: bit for bit against the engine.

On a GPU the same kernels are compiled (``benchmarks/gpu_check.py`` checks them there). Skipped
where Triton is not installed.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the interpreter runs on the CPU
triton = pytest.importorskip("triton")

import torch  # noqa: E402

from tests.conftest import read_weights  # noqa: E402
from tests.helpers import assert_live_equals as _assert_live_equals  # noqa: E402
from evomerge.testing.recipes import VARIANT_NAMES, variant_recipe as _recipe  # noqa: E402
from evomerge.engine import run_merge  # noqa: E402
from evomerge.recipe import load_recipe  # noqa: E402
from evomerge.search.builder import CandidateBuilder  # noqa: E402
from evomerge.backends.cuda_kernels import bf16_bits  # noqa: E402
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter must be on before Triton is first imported")

from evomerge.backends import cuda_kernels as dk  # noqa: E402

DEFAULT_LANE_GROUP = dk.LANE_GROUP


@pytest.fixture(autouse=True)
def _interpreter_lane_group(monkeypatch):
    """16 blocks per lane-sum program instead of the default's 4: Triton's interpreter runs programs
    one after another, and fewer, larger ones take half the time here. The group does not change
    the sums (``test_lane_sums_kernel_keeps_the_order_of_each_lane`` runs both); the compile test
    compiles the defaults."""
    monkeypatch.setattr(dk, "LANE_GROUP", 16)


@pytest.mark.parametrize("method", VARIANT_NAMES)
def test_fused_kernels_equal_engine(llama_family, tmp_path, method):
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3, backend="cuda")
    for flip in (False, True):
        recipe = load_recipe(_recipe(method, llama_family, flip=flip))
        builder.build(recipe)
        expected = read_weights(run_merge(recipe, tmp_path / f"engine{flip}", device="cpu", seed=3))
        _assert_live_equals(builder, expected, f"{method} flip={flip} (fused)")
    builder.close()


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_rescale_factors_fall_back_to_in_order_sums(llama_family, tmp_path, method):
    """The device's tree-summed norms decide the factor or say they cannot; then the in-order sums are used.

    With the usual interval no factor is ambiguous on these tensors; with a huge one (and no sum
    taken as exact) every factor is, the builder redoes the candidate with the in-order block sums,
    and the bits are the engine's.
    """
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3, backend="cuda")
    recipe = load_recipe(_recipe(method, llama_family, flip=False))
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    assert "in_order_norms" not in builder.build(recipe).extra
    _assert_live_equals(builder, expected, f"{method} (tree-summed factors)")
    builder.backend.rescale_slack = 1e12
    builder.backend._exact_t = torch.zeros_like(builder.backend._exact_t)  # and no sum counts as exact
    assert builder.build(recipe).extra.get("in_order_norms") is True
    _assert_live_equals(builder, expected, f"{method} (in-order fallback)")
    builder.close()


@pytest.mark.parametrize("group", [16, 4])
def test_lane_sums_kernel_keeps_the_order_of_each_lane(monkeypatch, group):
    """On magnitudes spread over 2⁻⁴⁰…2⁴⁰ float64 sums round, so any change of order shows: the kernel's
    block sums equal ``l1.lane_block_sums`` bit for bit (a last program half full, or full)."""
    from evomerge.methods.l1 import lane_block_sums
    from evomerge.backends import cuda_kernels as dk

    monkeypatch.setattr(dk, "LANE_GROUP", group)
    g = torch.Generator().manual_seed(0)
    n = 4096 * 8
    x = torch.randn((2, n), generator=g) * torch.exp2(torch.randint(-40, 41, (2, n), generator=g).float())
    slot_models = torch.tensor([1, 0], dtype=torch.int32)
    block_seg = torch.zeros(n // 4096, dtype=torch.int32)
    ints, floats = torch.zeros((2, 2, 1), dtype=torch.int32), torch.zeros((2, 2, 1), dtype=torch.float32)
    got = dk.lane_sums(dk.NO_RULE, x, None, None, torch.zeros(1, dtype=torch.int64), slot_models, block_seg, ints,
                       floats)
    expected = lane_block_sums(x[[1, 0]].abs().double())
    assert torch.equal(got, expected)
    shuffled = lane_block_sums(x[[1, 0]].abs().double().view(2, -1, 512, 8).flip(2).reshape(2, -1))
    assert not torch.equal(shuffled, expected)  # the data does tell orders apart


def test_rescale_kernel_decides_or_says_it_cannot():
    """Tree-summed norms give ``segment_totals``' in-order float32 factor wherever they claim to; a total
    on a float32 rounding midpoint is reported ambiguous."""
    import numpy as np

    from evomerge.backends import cuda_kernels as dk
    from evomerge.backends import cuda as dp

    g = torch.Generator().manual_seed(1)
    k, n_seg = 2, 40
    n_blocks = torch.randint(1, 300, (n_seg,), generator=g)
    first = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), n_blocks[:-1]]), 0)
    total_blocks = int(n_blocks.sum())
    sums = torch.rand((k, total_blocks), generator=g, dtype=torch.float64) * \
        torch.exp2(torch.randint(-30, 31, (k, total_blocks), generator=g).double())
    sums[0, first[0]] = 1.0 + 2.0 ** -24  # segment 0 of slot 0: 1 + 2⁻²⁴ (a float32 midpoint) and nothing else
    sums[0, first[0] + 1: first[0] + n_blocks[0]] = 0.0
    before = torch.rand((n_seg, 3), generator=g) + 0.5
    slot_models = torch.tensor([2, 0], dtype=torch.int32)
    use = torch.ones((k, n_seg), dtype=torch.int32)
    rows = torch.full((4 * k, n_seg), -7.0)  # rows[k:2k] receive the factors
    no_exact_sums = torch.zeros((n_seg, 3), dtype=torch.float64)  # (only a total of 0 counts as exact)
    ambiguous = dk.rescale_factors(sums, first, n_blocks, before, no_exact_sums, slot_models, use, rows)
    after = dp.segment_totals(sums.numpy(), first.numpy(), n_blocks.numpy())
    from evomerge.backends.cpu_kernel import L1_EPS32

    b = before.numpy()[:, [2, 0]].T
    expected = np.where((b < L1_EPS32) | (after < L1_EPS32), np.float32(1), b / after)
    decided = ambiguous.numpy() == 0
    assert ambiguous[0, 0] == 1 and decided.sum() >= k * n_seg - 3
    np.testing.assert_array_equal(rows[k: 2 * k].numpy()[decided], expected[decided])
    assert (rows[:k] == -7.0).all() and (rows[2 * k:] == -7.0).all()  # nothing else written


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties"])
def test_fused_bf16_recipe(qwen_family, tmp_path, method):
    """A bf16 recipe through the fused kernels: the engine's bits, and the device-side rescale factors
    decide without the in-order fallback (bf16 task vectors sum exactly in float64, often to a float32
    midpoint: the exactness test, not the error interval, settles those). The fine-tunes stay bf16
    (the kernels form δ) and no float32 output is made: the kernel writes the bf16 parameters."""
    models = {"a": str(qwen_family["ft0"]), "b": str(qwen_family["ft1"])}
    params = {"weight": [1.0, 0.4], "density": 0.5, **({"epsilon": 0.1} if method == "della" else {})}
    recipe = load_recipe({
        "merge_method": method, "base_model": str(qwen_family["base"]), "dtype": "bfloat16",
        "models": [{"model": models["a"], "parameters": params},
                   {"model": models["b"], "parameters": {**params, "density": [0.3, 0.8]}}],
    })
    builder = CandidateBuilder(qwen_family["base"], models, method=method, device="cpu", seed=0, dtype="bfloat16",
                               backend="cuda")
    extra = builder.build(recipe).extra
    expected = read_weights(run_merge(recipe, tmp_path / method, device="cpu", seed=0))
    live = builder.model.state_dict()
    bad = [k for k, v in expected.items() if not torch.equal(v, live[k].to(v.dtype))]
    assert not bad, f"{method}: {bad[:3]}"
    assert "in_order_norms" not in extra
    assert builder.backend.flat_out16 is not None  # the kernel stored bf16 into the parameters themselves
    assert builder.backend.inputs16 and builder.backend.flat_inputs.dtype == torch.bfloat16 and builder.backend._flat_out is None
    if method == "della":  # the kernels compute q from 16-bit row ranks
        assert builder.backend.device_stat.dtype == torch.int16
    if method == "ties":  # no ranks on the device: the kernels compare with the bound elements
        assert builder.backend.device_stat is None and builder.backend.magnitude_order is not None
    builder.close()


def test_exact_sum_limits():
    """Below the limit, float64 sums of a segment's |x| are exact in any order; the limit follows the least
    lowest set bit (2⁵²·g), ignores zeros, and is +∞ for an all-zero segment."""
    from evomerge.backends import cuda_kernels as dk

    x = torch.tensor([0.75, -3.0, 0.0, 0.0, 2.0 ** -20 * 3, 5.0, 0.0, 0.0, 1.5, 0.0], dtype=torch.float32)
    block_seg = torch.tensor([0, 0, 1, 2, 3], dtype=torch.int32)  # two-element blocks
    for chunk in (2, 3, 4, 100):
        limits = dk.exact_sum_limits(x, block_seg, 4, block=2, chunk=chunk)
        assert limits.tolist() == [2.0 ** 52 * 0.25, 2.0 ** 52 * 2.0 ** -20, float("inf"), 2.0 ** 52 * 0.5]
    g = torch.Generator().manual_seed(0)  # bf16 differences, as a bf16 recipe's task vectors
    a = torch.randn(50_000, generator=g).bfloat16().float()
    b = (a + torch.randn(50_000, generator=g) * 1e-2).bfloat16().float()
    d = (b - a).abs().double()
    limit = dk.exact_sum_limits((b - a), torch.zeros(1, dtype=torch.int64), 1, block=50_000)[0]
    forward, backward = d.cumsum(0)[-1], d.flip(0).cumsum(0)[-1]
    assert forward <= limit and forward == backward == d.sum()


@triton.jit
def _round_to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, bf16_bits(tl.load(x_ptr + offs, mask=offs < n, other=0.0)), mask=offs < n)


def test_bf16_bits_round_as_torch():
    """The merge kernel's float32 → bf16 rounding equals torch's, ties to even and overflow included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-120, 120, (4000,), generator=g).float())
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 0.0, -0.0,
                         3.3895e38, float("inf"), -float("inf"), 1e-40])
    x = torch.cat([x, ties])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _round_to_bf16[(1,)](x, y.view(torch.int16), x.numel(), BLOCK=8192)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_launched_kernels_compile_for_hopper_and_ampere(llama_family, qwen_family):
    """Every kernel specialization a builder launches (each method, float32 and bf16 models) compiles
    for sm_90 and sm_80 with Triton's compiler, not only its interpreter (``tests/kernel_compile.py``)."""
    import json
    import subprocess
    import sys

    from tests.kernel_compile import TARGETS, record_launches

    seen: set[str] = set()
    with record_launches(seen):
        models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
        for method in VARIANT_NAMES:
            builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3,
                                       backend="cuda")
            builder.build(load_recipe(_recipe(method, llama_family, flip=False)))
            builder.close()
        models = {"a": str(qwen_family["ft0"]), "b": str(qwen_family["ft1"])}
        for method in ("ties", "dare_ties", "della"):
            params = {"weight": [1.0, 0.4], "density": 0.5, **({"epsilon": 0.1} if method == "della" else {})}
            recipe = load_recipe({"merge_method": method, "base_model": str(qwen_family["base"]), "dtype": "bfloat16",
                                  "models": [{"model": m, "parameters": params} for m in models.values()]})
            builder = CandidateBuilder(qwen_family["base"], models, method=method, device="cpu", seed=0,
                                       dtype="bfloat16", backend="cuda")
            builder.build(recipe)
            assert builder.backend.inputs16 and builder.backend.flat_out16 is not None
            builder.close()
    specs = [json.loads(s) for s in sorted(seen)]
    for spec in specs:  # recorded with the interpreter's lane group (the fixture's); compiled with the default
        if "GROUP" in spec["constexprs"]:
            spec["constexprs"]["GROUP"] = DEFAULT_LANE_GROUP
    kernels = {s["kernel"] for s in specs}
    assert kernels == {"_lane_sums_kernel", "_rescale_kernel", "_merge_kernel"}, kernels
    merges = [s["constexprs"] for s in specs if s["kernel"] == "_merge_kernel"]
    assert {m["RULE"] for m in merges} == {-1, 0, 1, 2, 3}
    assert any(m["X16"] and m["OUT16"] for m in merges) and any(m["RANK16"] for m in merges)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernel_compile"], input=json.dumps(specs), env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK ") == len(specs) * len(TARGETS)
