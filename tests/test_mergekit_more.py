"""mergekit 0.1.5's multislerp, karcher, sce, nearswap, arcee_fusion, ram and ramplus_tl: parity on tensors.

Each is compared with mergekit's registered method called on the same tensors (as tests/test_methods.py
does for the other 13). Differences, documented in docs/methods.md: arcee_fusion takes exact quantiles
where mergekit samples a million importances at random (tensors above 1M elements); sce breaks equal
variances by position where mergekit's topk order is unspecified.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import METHODS, get_method
from evomerge.methods.selective import upper_fence
from tests.test_methods import SHAPES, mergekit_merge, tie_free_inputs

MORE = ("multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")


def merge(name, base, others, params, model_params=None):
    return get_method(name).merge(base=base, tensors=others, model_params=model_params or [{}] * len(others),
                                  params=params)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_mergekit(shape, with_base, normalize_weights):
    base, others = tie_free_inputs(shape)
    weights = [0.3, 0.5, 0.2] if normalize_weights else [0.6, 1.0, 0.4]
    params = {"normalize_weights": normalize_weights}
    expected = mergekit_merge("multislerp", base if with_base else None, others, {"weight": weights, **params})
    got = merge("multislerp", base if with_base else None, others, params, [{"weight": w} for w in weights])
    assert torch.equal(got, expected)
    single = merge("multislerp", base, others[:1], {}, [{"weight": 1.0}])
    assert torch.equal(single, mergekit_merge("multislerp", base, others[:1], {"weight": [1.0]}))


def test_multislerp_antipodal_inputs():
    a = torch.tensor([1.0, 2.0, -1.0])
    expected = mergekit_merge("multislerp", None, [a, -a], {"weight": [0.5, 0.5]})
    assert torch.equal(merge("multislerp", None, [a, -a], {}, [{"weight": 0.5}] * 2), expected)
    with pytest.raises(ValueError, match="weighted sum of the inputs' directions is zero"):
        merge("multislerp", None, [a, -a, a, -a], {}, [{"weight": 0.25}] * 4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [{}, {"max_iter": 3}, {"max_iter": 0, "tol": 1e-3}])
def test_karcher_matches_mergekit(shape, params):
    base, others = tie_free_inputs(shape)
    far = tie_free_inputs(shape, seed=1)[0]  # an input far from the others: several gradient steps
    tensors = [base, *others, far]
    expected = mergekit_merge("karcher", None, tensors, params)
    assert torch.equal(merge("karcher", None, tensors, params), expected)
    zeros = [torch.zeros(shape), torch.zeros(shape)]
    assert torch.equal(merge("karcher", None, zeros, {}), mergekit_merge("karcher", None, zeros, {}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_mergekit(shape, select_topk):
    base, others = tie_free_inputs(shape)
    params = {"select_topk": select_topk}
    assert torch.equal(merge("sce", base, others, params), mergekit_merge("sce", base, others, params))
    assert torch.equal(merge("sce", base, others, {**params, "int8_mask": True}),
                       mergekit_merge("sce", base, others, {**params, "int8_mask": True}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 1e-4, 0.01, 1.0])
def test_nearswap_matches_mergekit(shape, t):
    base, (other, *_) = tie_free_inputs(shape)
    assert torch.equal(merge("nearswap", base, [other], {"t": t}), mergekit_merge("nearswap", base, [other], {"t": t}))


@pytest.mark.parametrize("shape", [*SHAPES, (7, 1)])
def test_arcee_fusion_matches_mergekit(shape):
    base, (other, *_) = tie_free_inputs(shape)
    got = merge("arcee_fusion", base, [other], {})
    assert torch.equal(got, mergekit_merge("arcee_fusion", base, [other], {}))
    spiky = other.clone()
    spiky.reshape(-1)[:5] += 10  # five outlying updates: exactly those are taken
    got = merge("arcee_fusion", base, [spiky], {})
    assert torch.equal(got, mergekit_merge("arcee_fusion", base, [spiky], {}))
    if len(shape) == 1:
        assert torch.equal((got != base).nonzero().reshape(-1), torch.arange(5))


def test_arcee_fusion_threshold_is_the_exact_upper_fence():
    values = torch.arange(101, dtype=torch.float32)  # quartiles 25, 50, 75
    assert float(upper_fence(values)) == 50 + 1.5 * 50


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", [("ram", {}), ("ram", {"epsilon": 0.05}), ("ramplus_tl", {}),
                                         ("ramplus_tl", {"r": 0.5, "alpha": 1.0, "epsilon": 0.05})])
def test_ram_matches_mergekit(shape, name, params):
    base, others = tie_free_inputs(shape)
    assert torch.equal(merge(name, base, others, params), mergekit_merge(name, base, others, params))


def test_contracts_and_strict_parameters():
    assert all(METHODS[name].in_mergekit for name in MORE)
    assert get_method("nearswap").check_inputs(3, True) == [
        "nearswap needs exactly 2 input models (base included), got 3",
        "nearswap needs exactly 1 model besides the base, got 2"]
    assert get_method("arcee_fusion").check_inputs(2, False)[0] == "arcee_fusion requires a base_model"
    assert get_method("karcher").check_params([{}], {"max_iter": 2.5}) == [
        "karcher: max_iter must be a whole number, got 2.5"]
    assert get_method("sce").check_params([{}], {"select_topk": 1.5}) == [
        "sce: select_topk must be in [0, 1], got 1.5"]
    assert get_method("nearswap").check_params([{}], {}) == ["nearswap: missing required parameter 't'"]
    assert get_method("multislerp").check_params([{}], {}) == ["multislerp: model 0: missing required parameter 'weight'"]
    assert get_method("ram").check_params([{}], {"epsilon": -1}) == ["ram: epsilon must be >= 0, got -1"]


PIPELINE_RECIPES = {
    "multislerp": ("base", [("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.7})], {}),
    "karcher": (None, [("ft0", {}), ("ft1", {}), ("ft2", {})], {"max_iter": 5}),
    "karcher_with_base": ("base", [("ft0", {}), ("ft1", {})], {}),
    "sce": ("base", [("ft0", {}), ("ft1", {}), ("ft2", {})], {"select_topk": 0.5}),
    "nearswap": ("base", [("ft0", {})], {"t": 0.001}),
    "arcee_fusion": ("base", [("ft0", {})], {}),
    "ram": ("base", [("ft0", {}), ("ft1", {}), ("ft2", {})], {"epsilon": 0.001}),
    "ramplus_tl": ("base", [("ft0", {}), ("ft1", {}), ("ft2", {})], {"r": 0.3, "epsilon": 0.001}),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_RECIPES))
def test_recipes_match_mergekit_end_to_end(case, llama_family, tmp_path):
    """The same recipe file through mergekit's run_merge and evomerge's: identical checkpoints."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    from evomerge.engine import run_merge
    from tests.conftest import read_weights

    base, models, params = PIPELINE_RECIPES[case]
    recipe = {"merge_method": case.removesuffix("_with_base"),
              "models": [{"model": str(llama_family[m]), **({"parameters": p} if p else {})} for m, p in models]}
    if base:
        recipe["base_model"] = str(llama_family[base])
    if params:
        recipe["parameters"] = params
    ours = read_weights(run_merge(recipe, tmp_path / "ours", device="cpu"))
    mk_run(MergeConfiguration.model_validate(recipe), str(tmp_path / "theirs"), MergeOptions(quiet=True))
    theirs = read_weights(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), (case, key)
    assert not (tmp_path / "ours" / "mergekit_config.yml").read_text().startswith("#")
    assert yaml.safe_load((tmp_path / "ours" / "mergekit_config.yml").read_text())["merge_method"] == recipe["merge_method"]
