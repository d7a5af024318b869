"""The device path's fused Triton kernels, run by Triton's interpreter on the CPU: bit for bit against the engine.

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
from tests.test_flat_builder import VARIANT_NAMES, _assert_live_equals, _recipe  # noqa: E402
from evomerge.engine import run_merge  # noqa: E402
from evomerge.recipe import load_recipe  # noqa: E402
from evomerge.search.builder import CandidateBuilder  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter must be on before Triton is first imported")


@pytest.mark.parametrize("method", VARIANT_NAMES)
def test_fused_kernels_equal_engine(llama_family, tmp_path, method):
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3, path="device")
    builder.fused = True
    for flip in (False, True):
        recipe = load_recipe(_recipe(method, llama_family, flip=flip))
        builder.build(recipe)
        expected = read_weights(run_merge(recipe, tmp_path / f"engine{flip}", device="cpu", seed=3))
        _assert_live_equals(builder, expected, f"{method} flip={flip} (fused)")
    builder.close()


def test_fused_lane_sums_equal_batched_torch(llama_family):
    """The lane-sum kernel's block sums equal ``device_path.lane_block_sums``' for a DARE candidate."""
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(llama_family["base"], models, method="dare_ties", device="cpu", seed=3, path="device")
    recipe = load_recipe(_recipe("dare_ties", llama_family, flip=False))
    builder.build(recipe)  # sets up the structure and fields
    st = builder._candidate_tables(recipe)
    from evomerge.search import device_path as dp

    ints, floats = (torch.from_numpy(t) for t in dp.rule_tables(builder.keep_rule, *st["tables"][:6]))
    builder.fused = False
    batched = builder._device_after_norms(st, ints, floats)
    builder.fused = True
    fused = builder._device_after_norms(st, ints, floats)
    assert (batched == fused).all() and (batched > 0).all()
    builder.close()
