"""Merge-method kernels: parity with mergekit 0.1.5, randomness, validation, precomputed order statistics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import numpy as np
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup

from evomerge.methods import (
    METHODS,
    VARIANTS,
    apply_mask,
    breadcrumbs_mask,
    breadcrumbs_window,
    combine_task_vectors,
    dare_mask,
    della_keep_probability,
    della_mask,
    della_ranks,
    get_method,
    magnitude_keep_count,
    magnitude_mask,
    merge_task_vectors,
    random_field,
    rank_window_mask,
    sorted_magnitudes,
    flat_ranks,
    sparsify,
)

SHAPES = [(64, 48), (300,)]


# --------------------------------------------------------------------------- helpers


def tie_free_inputs(shape, n_models=3, seed=0, dtype=torch.float32, check=True):
    """Base and fine-tunes whose deltas have pairwise-distinct magnitudes, so no sort tie-breaking matters.

    Magnitudes are a permutation of 1..n times a power of two, and the base has 8
    fractional bits, so x = base + δ and x − base are exact in float32.
    """
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    base = torch.round(torch.randn(shape, generator=g, dtype=torch.float64) * 256) / 256
    step = 2.0 ** -(n.bit_length() + 2)
    others = []
    for _ in range(n_models):
        mags = (torch.randperm(n, generator=g).to(torch.float64) + 1) * step
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        others.append((base + (mags * signs).reshape(shape)).to(dtype))
    base = base.to(dtype)
    for x in others if check else ():
        mags = (x - base).abs().reshape(-1)
        assert torch.unique(mags).numel() == mags.numel(), "fixture must be tie-free"
    return base, others


def mergekit_merge(name, base, others, parameters):
    """Call mergekit's registered merge method directly on tensors (no files)."""
    tensors = ([base] if base is not None else []) + list(others)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    return mk_registry.get(name)([group], parameters=parameters)[0]


def split_params(parameters, n_models, per_model_names):
    """mergekit-style lists of per-model values -> evomerge (model_params, params)."""
    model_params = [{k: parameters[k][i] for k in per_model_names if k in parameters} for i in range(n_models)]
    params = {k: v for k, v in parameters.items() if k not in per_model_names}
    return model_params, params


def fields_for(tensors, seed=0, name="w"):
    return [random_field(t.shape, seed=seed, tensor_name=name, model_index=i) for i, t in enumerate(tensors)]


class FieldBernoulli:
    """Stand-in for torch.bernoulli inside mergekit: draws `field < p` from our fields, in call order.

    mergekit's DARE/DELLA call torch.bernoulli once per model; answering with our
    fields makes mergekit's pipeline use exactly our random draws, so the whole
    merge can be compared bit for bit.
    """

    def __init__(self, fields):
        self.fields = list(fields)
        self.calls = 0

    def __call__(self, p, *args, **kwargs):
        field = self.fields[self.calls].to(p.device).reshape(p.shape)
        self.calls += 1
        return (field < p).to(p.dtype)


# --------------------------------------------------------------------------- parity with mergekit


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(shape, normalize):
    base, others = tie_free_inputs(shape)
    tensors = [base, *others]
    weights = [0.1, 0.5, 0.3, -0.2]
    expected = mergekit_merge("linear", None, tensors, {"weight": weights, "normalize": normalize})
    got = get_method("linear").merge(
        base=None, tensors=tensors, model_params=[{"weight": w} for w in weights], params={"normalize": normalize}
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("far", [False, True], ids=["fine-tune", "unrelated"])  # cos θ ≈ 0.995 or ≈ 0
def test_slerp_matches_mergekit(shape, t, far):
    base, (other, *_) = tie_free_inputs(shape)
    if far:
        other = tie_free_inputs(shape, seed=1)[0]
    expected = mergekit_merge("slerp", base, [other], {"t": t})
    got = get_method("slerp").merge(base=base, tensors=[other], model_params=[{}], params={"t": t})
    assert torch.equal(got, expected)
    if t == 0.0:
        assert torch.equal(got, base)


def test_slerp_collinear_branch_is_lerp():
    base, _ = tie_free_inputs((64, 48))
    other = 2 * base  # cos θ = 1 > 0.9995: linear interpolation
    expected = mergekit_merge("slerp", base, [other], {"t": 0.3})
    got = get_method("slerp").merge(base=base, tensors=[other], model_params=[{}], params={"t": 0.3})
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, 0.7 * base + 0.3 * other, rtol=1e-6, atol=1e-6)
    antipodal = -2 * base  # cos θ = -1: also linear
    expected = mergekit_merge("slerp", base, [antipodal], {"t": 0.3})
    got = get_method("slerp").merge(base=base, tensors=[antipodal], model_params=[{}], params={"t": 0.3})
    assert torch.equal(got, expected)


def test_slerp_large_tensor_within_rounding():
    # mergekit computes norms and the dot in chunks of 2**20 elements; we reduce the whole
    # tensor at once, so above 2**20 elements the float32 sums round differently (~1 ulp).
    base, (other, *_) = tie_free_inputs((1100, 1000), n_models=1, check=False)
    expected = mergekit_merge("slerp", base, [other], {"t": 0.4})
    got = get_method("slerp").merge(base=base, tensors=[other], model_params=[{}], params={"t": 0.4})
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_mergekit(shape, row_wise, flatten, with_base):
    base, (a, b, _) = tie_free_inputs(shape)
    options = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    expected = mergekit_merge("nuslerp", base if with_base else None, [a, b], {"weight": [0.3, 0.6], **options})
    got = get_method("nuslerp").merge(
        base=base if with_base else None, tensors=[a, b], model_params=[{"weight": 0.3}, {"weight": 0.6}],
        params=options,
    )
    assert torch.equal(got, expected)


def assert_matches_mergekit(got, expected, name, parameters):
    """Bit for bit, except where the L1 rescale ran: our norm is a float64 sum in a fixed order
    (``evomerge.methods.l1``), mergekit's a float32 one, so the factor may differ by a rounding."""
    from evomerge.methods.registry import METHODS

    rescale = parameters.get("rescale", METHODS[name].param("rescale").default if METHODS[name].has_param("rescale") else False)
    if rescale:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # ~1 ulp of O(1) values
    else:
        assert torch.equal(got, expected)


VARIATIONS = [
    {},
    {"normalize": True},
    {"normalize": False, "rescale": True},
    {"normalize": True, "rescale": True, "lambda": 0.7},
    {"lambda": 1.3, "int8_mask": True},
]


def variation_id(variation):
    return ",".join(f"{k}={x}" for k, x in variation.items()) or "defaults"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("variation", VARIATIONS, ids=variation_id)
def test_task_arithmetic_family_matches_mergekit(shape, name, variation):
    base, others = tie_free_inputs(shape)
    parameters = {"weight": [0.6, 0.4, -0.3], "density": [0.3, 0.55, 0.9], **variation}
    if name.startswith("breadcrumbs"):
        parameters["gamma"] = [0.01, 0.05, 0.1]
    expected = mergekit_merge(name, base, others, parameters)
    model_params, params = split_params(parameters, 3, ("weight", "density", "gamma"))
    got = get_method(name).merge(base=base, tensors=others, model_params=model_params, params=params)
    assert_matches_mergekit(got, expected, name, parameters)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_multi_chunk_tensor_matches_mergekit(monkeypatch, name):
    """300k elements: the consensus runs on several 262k-element slices."""
    base, others = tie_free_inputs((600, 500))
    parameters = {"weight": [0.6, 0.4, -0.3], "density": [0.3, 0.55, 0.9], "lambda": 0.8}
    per_model = ("weight", "density", "gamma", "epsilon")
    if name == "della":
        parameters["epsilon"] = [0.1, 0.15, 0.05]
    fields = fields_for(others, seed=3)
    monkeypatch.setattr(torch, "bernoulli", FieldBernoulli(fields))
    expected = mergekit_merge(name, base, others, parameters)
    monkeypatch.undo()
    model_params, params = split_params(parameters, 3, per_model)
    got = get_method(name).merge(base=base, tensors=others, model_params=model_params, params=params, fields=fields)
    assert_matches_mergekit(got, expected, name, parameters)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("variation", VARIATIONS[:4], ids=variation_id)
def test_random_methods_match_mergekit_given_the_same_draws(monkeypatch, name, variation):
    base, others = tie_free_inputs((64, 48))
    parameters = {"weight": [0.6, 0.4, 0.3], "density": [0.3, 0.55, 0.7], **variation}
    if name.startswith("della"):
        parameters["epsilon"] = [0.1, 0.15, 0.2]
    fields = fields_for(others, seed=7)
    stand_in = FieldBernoulli(fields)
    monkeypatch.setattr(torch, "bernoulli", stand_in)
    expected = mergekit_merge(name, base, others, parameters)
    monkeypatch.undo()
    assert stand_in.calls == 3
    model_params, params = split_params(parameters, 3, ("weight", "density", "epsilon"))
    got = get_method(name).merge(base=base, tensors=others, model_params=model_params, params=params, fields=fields)
    assert_matches_mergekit(got, expected, name, parameters)


def test_della_keep_probability_matches_mergekit_formula(monkeypatch):
    base, (x, *_) = tie_free_inputs((40, 70))
    delta = x - base
    seen = []
    monkeypatch.setattr(torch, "bernoulli", lambda p: seen.append(p.clone()) or torch.ones_like(p))
    from mergekit.sparsify import della_magprune

    della_magprune(delta, density=0.4, epsilon=0.2)
    monkeypatch.undo()
    assert torch.equal(della_keep_probability(delta, 0.4, 0.2), seen[0])


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [2, 3])
def test_model_stock_matches_mergekit(filter_wise, shape, n_models):
    base, others = tie_free_inputs(shape, n_models=n_models)
    expected = mergekit_merge("model_stock", base, others, {"filter_wise": filter_wise})
    got = get_method("model_stock").merge(
        base=base, tensors=others, model_params=[{}] * n_models, params={"filter_wise": filter_wise}
    )
    assert torch.equal(got, expected)


def test_passthrough_matches_mergekit():
    _, (x, *_) = tie_free_inputs((64, 48))
    for scale in (None, 0.5):
        expected = mergekit_merge("passthrough", None, [x], {"scale": [scale]})
        got = get_method("passthrough").merge(base=None, tensors=[x], model_params=[{"scale": scale}], params={})
        assert torch.equal(got, expected)
    assert torch.equal(get_method("passthrough").merge(base=None, tensors=[x], model_params=[{}], params={}), x)


def test_float64_inputs_compute_in_float64_and_match_mergekit():
    base, others = tie_free_inputs((64, 48), dtype=torch.float64)
    parameters = {"weight": [0.6, 0.4, -0.3], "density": [0.3, 0.55, 0.9]}
    expected = mergekit_merge("ties", base, others, parameters)
    model_params, params = split_params(parameters, 3, ("weight", "density"))
    got = get_method("ties").merge(base=base, tensors=others, model_params=model_params, params=params)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)


def test_bfloat16_inputs_return_bfloat16_computed_in_float32():
    base, others = tie_free_inputs((64, 48))
    mp = [{"weight": 0.5, "density": 0.5}] * 3
    reference = get_method("ties").merge(base=base.bfloat16().float(), tensors=[x.bfloat16().float() for x in others],
                                         model_params=mp, params={})
    got = get_method("ties").merge(base=base.bfloat16(), tensors=[x.bfloat16() for x in others],
                                   model_params=mp, params={})
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, reference.bfloat16())


# --------------------------------------------------------------------------- DARE / DELLA statistics


def test_dare_keeps_density_fraction_and_rescale_preserves_l1():
    delta = torch.randn(400, 250, generator=torch.Generator().manual_seed(1))  # 100k elements
    field = random_field(delta.shape, seed=3, tensor_name="dare", model_index=0)
    n = delta.numel()
    for density in (0.1, 0.5, 0.9):
        kept = int(dare_mask(field, density).sum())
        sigma = math.sqrt(n * density * (1 - density))
        assert abs(kept - density * n) < 3 * sigma, (density, kept)
        out = sparsify(delta, "random", density=density, rescale=True, field=field)
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
        assert int((out != 0).sum()) == kept
        plain = sparsify(delta, "random", density=density, rescale=False, field=field)
        assert torch.equal(plain, delta * (field < density))


def test_della_keep_rate_follows_rank_formula():
    rows, n = 200, 500  # 100k elements
    delta = torch.randn(rows, n, generator=torch.Generator().manual_seed(2))
    field = random_field(delta.shape, seed=4, tensor_name="della", model_index=0)
    density, epsilon = 0.5, 0.2
    mask = della_mask(delta, density, epsilon, field)
    ranks = della_ranks(delta)
    p = della_keep_probability(delta, density, epsilon, ranks)
    # p follows the formula per rank, from density-ε (smallest |δ|) to density+ε (largest)
    assert torch.allclose(p, (density - epsilon) + 2 * epsilon * ranks.float() / (n - 1))
    assert torch.equal(ranks[0].sort().values, torch.arange(n, dtype=ranks.dtype))
    assert (delta[0].abs()[ranks[0].argsort()].diff() > 0).all()  # rank order is |δ| order
    bins = torch.div(ranks.long() * 10, n, rounding_mode="floor")
    rates = []
    for b in range(10):
        sel = bins == b
        count = int(sel.sum())
        rate = float(mask[sel].float().mean())
        expected = float(p[sel].mean())
        assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / count), (b, rate, expected)
        rates.append(rate)
    assert rates[-1] - rates[0] > 0.3  # large magnitudes survive far more often than small ones
    kept = int(mask.sum())
    assert abs(kept - density * delta.numel()) < 3 * math.sqrt(delta.numel() * 0.25)
    out = sparsify(delta, "della_magprune", density=density, epsilon=epsilon, rescale=True, field=field)
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


def test_della_one_dimensional_is_one_row_and_edge_densities():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    field = random_field(delta.shape, seed=0, tensor_name="b", model_index=0)
    ranks = della_ranks(delta)
    assert torch.equal(ranks.long(), delta.abs().argsort().argsort())
    assert della_mask(delta, 1.0, 0.15, field).all()
    assert not della_mask(delta, 0.0, 0.15, field).any()
    cube = torch.randn(4, 30, 6, generator=torch.Generator().manual_seed(6))  # ranks along dim 1, as mergekit
    assert torch.equal(della_ranks(cube).long(), cube.abs().argsort(dim=1).argsort(dim=1))
    single = torch.tensor([[0.5], [-2.0]])  # rows of one element: p = density (mergekit fails: 0/0)
    assert torch.equal(della_keep_probability(single, 0.3, 0.1), torch.full((2, 1), 0.3))


def test_same_seed_same_masks_different_seed_different():
    delta = torch.randn(128, 96, generator=torch.Generator().manual_seed(6))
    a = random_field(delta.shape, seed=11, tensor_name="model.layers.0.mlp.up_proj.weight", model_index=1)
    b = random_field(delta.shape, seed=11, tensor_name="model.layers.0.mlp.up_proj.weight", model_index=1)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and float(a.min()) >= 0 and float(a.max()) < 1
    for other in (
        random_field(delta.shape, seed=12, tensor_name="model.layers.0.mlp.up_proj.weight", model_index=1),
        random_field(delta.shape, seed=11, tensor_name="model.layers.1.mlp.up_proj.weight", model_index=1),
        random_field(delta.shape, seed=11, tensor_name="model.layers.0.mlp.up_proj.weight", model_index=2),
    ):
        assert not torch.equal(a, other)
    for method in ("dare_ties", "della"):
        base = torch.zeros_like(delta)
        mp = [{"weight": 1.0, "density": 0.4}]
        merge = get_method(method).merge
        first = merge(base=base, tensors=[delta], model_params=mp, params={}, fields=[a])
        again = merge(base=base, tensors=[delta], model_params=mp, params={}, fields=[b])
        assert torch.equal(first, again)
        c = random_field(delta.shape, seed=12, tensor_name="model.layers.0.mlp.up_proj.weight", model_index=1)
        assert not torch.equal(first, merge(base=base, tensors=[delta], model_params=mp, params={}, fields=[c]))


# Computed once with evomerge.methods.random_field (field v2); they must never change (recipes + seed reproduce merges).
FIELD_ARGS = dict(seed=1234, tensor_name="model.layers.3.self_attn.q_proj.weight", model_index=2)
EXPECTED_FIELD_HEAD = [0.07948082685470581, 0.2495090365409851, 0.30267274379730225, 0.8950547575950623,
                       0.48646080493927, 0.8948679566383362]


def test_random_field_is_stable_across_calls_and_processes():
    head = random_field((6,), **FIELD_ARGS).tolist()
    assert head == EXPECTED_FIELD_HEAD
    code = (
        "from evomerge.methods import random_field;"
        f"print(random_field((6,), **{FIELD_ARGS!r}).tolist())"
    )
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == EXPECTED_FIELD_HEAD


def _splitmix_reference(key: int, j: int) -> float:
    """SplitMix64's j-th output (0-based) from seed ``key`` in Python integers, top 24 bits as [0, 1)."""
    mask = (1 << 64) - 1
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 40) / 2.0 ** 24


def test_random_field_is_splitmix64_of_the_flat_index():
    """The field (chunked and compiled), the NumPy definition and SplitMix64 in Python integers agree
    element by element (keys above 2⁶³ included), anywhere in a tensor: a kernel can compute any
    element alone."""
    from evomerge.methods.fields import field_seed, splitmix_uniform

    keys_seen_high = False
    for name in ("a", "b", "c", "model.layers.3.self_attn.q_proj.weight"):
        key = field_seed(1234, name, 2)
        keys_seen_high |= key >= 1 << 63
        field = random_field((70_000,), seed=1234, tensor_name=name, model_index=2).numpy()
        compiled = random_field((70_000,), seed=1234, tensor_name=name, model_index=2, compiled=True).numpy()
        assert np.array_equal(field, splitmix_uniform(key, 0, 70_000)) and np.array_equal(field, compiled)
        assert np.array_equal(field[65_530:65_540], splitmix_uniform(key, 65_530, 10))
        for j in (0, 1, 2, 65_535, 65_536, 69_999):
            assert float(field[j]) == _splitmix_reference(key, j), (name, j)
    assert keys_seen_high


def test_random_field_is_uniform_and_independent_across_models():
    """Mean, keep rate and correlation of two models' fields are those of independent uniforms."""
    n = 1 << 20
    a = random_field((n,), seed=7, tensor_name="w", model_index=0)
    b = random_field((n,), seed=7, tensor_name="w", model_index=1)
    for f in (a, b):
        assert 0.0 <= float(f.min()) and float(f.max()) < 1.0
        assert abs(float(f.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
        assert abs(float((f < 0.3).float().mean()) - 0.3) < 5 * (0.21 / n) ** 0.5
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / n ** 0.5
    assert abs(float(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1])) < 5 / n ** 0.5  # neighbours


# --------------------------------------------------------------------------- precomputed order statistics


def tie_heavy(shape, seed):
    """Deltas with many equal magnitudes (as from bf16 checkpoints), to exercise tie-breaking."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 7, shape, generator=g) * 0.25).float()


def stable_rank_window_reference(delta, low, high):
    """Reference by full stable sort: keep elements whose stable ascending |δ| rank is in [low, high)."""
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order[max(0, low):max(0, high)]] = True
    return keep.reshape(delta.shape)


@pytest.mark.parametrize("make", [lambda: tie_free_inputs((64, 48))[1][0] - tie_free_inputs((64, 48))[0],
                                  lambda: tie_heavy((50, 40), 0), lambda: tie_heavy((999,), 1),
                                  lambda: tie_heavy((400, 500), 2)])  # ties spanning several 65k-element scan chunks
def test_precomputed_sorted_magnitudes_give_identical_masks(make):
    delta = make()
    n = delta.numel()
    sorted_mags = sorted_magnitudes(delta)
    ranks = flat_ranks(delta)
    assert sorted(ranks.reshape(-1).tolist()) == list(range(n))
    for density in (0.0, 1e-6, 0.1, 0.33, 0.5, 0.77, 0.999, 1.0):
        by_selection = magnitude_mask(delta, density)
        assert torch.equal(by_selection, magnitude_mask(delta, density, sorted_magnitudes=sorted_mags))
        assert torch.equal(by_selection, magnitude_mask(delta, density, ranks=ranks))
        if 0 < density < 1:
            k = magnitude_keep_count(n, density)
            assert int(by_selection.sum()) == k
            assert torch.equal(by_selection, stable_rank_window_reference(delta, n - k, n))
        for gamma in (0.0, 0.01, 0.2):
            crumbs = breadcrumbs_mask(delta, density, gamma)
            assert torch.equal(crumbs, breadcrumbs_mask(delta, density, gamma, sorted_magnitudes=sorted_mags))
            assert torch.equal(crumbs, breadcrumbs_mask(delta, density, gamma, ranks=ranks))
            if density < 1:
                low, high = breadcrumbs_window(n, density, gamma)
                assert torch.equal(crumbs, stable_rank_window_reference(delta, low, high))


def test_rank_window_mask_against_stable_sort():
    delta = tie_heavy((30, 31), 3)
    mags = delta.abs().reshape(-1)
    sorted_mags = sorted_magnitudes(delta)
    n = mags.numel()
    for low, high in [(0, n), (0, 1), (5, 400), (300, 301), (n - 1, n), (10, 10), (500, 20)]:
        expected = stable_rank_window_reference(delta, low, high).reshape(-1)
        assert torch.equal(rank_window_mask(mags, low, high), expected)
        assert torch.equal(rank_window_mask(mags, low, high, sorted_mags), expected)


def test_della_precomputed_ranks_give_identical_masks_and_stable_ties():
    delta = tie_heavy((40, 64), 4)
    field = random_field(delta.shape, seed=0, tensor_name="t", model_index=0)
    ranks = della_ranks(delta)
    reference = torch.sort(delta.abs(), dim=1, stable=True).indices.argsort(dim=1)
    assert torch.equal(ranks.long(), reference)
    for density in (0.2, 0.5, 0.8):
        assert torch.equal(della_mask(delta, density, 0.15, field), della_mask(delta, density, 0.15, field, ranks))
    assert torch.equal(della_ranks(delta.double()).long(), reference)


def test_numpy_and_torch_backends_agree():
    """On the host the sorts and selections run in NumPy; other devices use torch. Same results."""
    from evomerge.methods.sparsify import _row_order, select_values, sort_values

    for delta in (tie_heavy((40, 64), 8), torch.randn(33, 70, generator=torch.Generator().manual_seed(9))):
        rows = delta.abs()
        assert torch.equal(_row_order(rows, numpy=True), _row_order(rows, numpy=False))
        assert torch.equal(_row_order(rows, numpy=True), torch.sort(rows, dim=1, stable=True).indices)
        flat = rows.reshape(-1)
        assert torch.equal(sort_values(flat, numpy=True), sort_values(flat, numpy=False))
    big = torch.randn(1100, 1000, generator=torch.Generator().manual_seed(11)).abs()  # sorted in row blocks
    assert torch.equal(_row_order(big, numpy=True), _row_order(big, numpy=False))
    g = torch.Generator().manual_seed(10)
    bf16_like = (torch.randn(200_000, generator=g).bfloat16().float() - torch.randn(200_000, generator=g)
                 .bfloat16().float()).abs()  # many repeated values
    for values in (bf16_like, torch.rand(5000, generator=g), torch.tensor([0.0, 0.0, 3.0]), torch.tensor([2.5]),
                   torch.tensor([0.0, float("inf"), 1e-40, 7.0])):  # zeros, inf, a subnormal
        picks = sorted({0, 1, values.numel() // 3, values.numel() // 2, values.numel() - 1} - {values.numel()})
        expected = [torch.kthvalue(values, r + 1).values for r in picks]
        assert select_values(values, picks) == expected
        assert select_values(values.double(), picks) == [v.double() for v in expected]


def test_search_path_is_bit_identical_to_engine_path():
    """Resident deltas + precomputed statistics (merge_task_vectors, or sparsify + combine_task_vectors)
    give exactly MergeMethod.merge's tensor."""
    base, others = tie_free_inputs((600, 500))  # several consensus chunks
    fields = fields_for(others, seed=5)
    deltas = [x - base for x in others]
    sorted_mags = [sorted_magnitudes(d) for d in deltas]
    ranks = [della_ranks(d) for d in deltas]
    weights, densities = [0.5, 0.3, 0.4], [0.3, 0.6, 0.8]
    for name, extra in [("ties", {}), ("breadcrumbs_ties", {"gamma": 0.05}), ("dare_ties", {}),
                        ("della", {"epsilon": 0.1}), ("della_linear", {"epsilon": 0.1}), ("task_arithmetic", {})]:
        spec, variant = get_method(name), VARIANTS[name]
        normalize, rescale = spec.param("normalize").default, spec.param("rescale").default
        engine = spec.merge(base=base, tensors=others, fields=fields, params={},
                            model_params=[{"weight": w, "density": d, **extra} for w, d in zip(weights, densities)])
        per_model = {key + "s": [value] * 3 for key, value in extra.items()}
        search = merge_task_vectors(variant, base, deltas, weights=weights, densities=densities, normalize=normalize,
                                    rescale=rescale, fields=fields, sorted_magnitudes=sorted_mags, ranks=ranks,
                                    **per_model)
        assert torch.equal(search, engine), name
        sparsified = [
            sparsify(d, variant.sparsification, density=densities[i], rescale=rescale, field=fields[i],
                     sorted_magnitudes=sorted_mags[i], ranks=ranks[i], **extra)
            for i, d in enumerate(deltas)
        ]
        combined = combine_task_vectors(base, sparsified, weights, consensus=variant.consensus, normalize=normalize)
        assert torch.equal(combined, engine), name


def test_apply_mask_skips_rescale_for_tiny_norms():
    mask = torch.tensor([False, True])
    tiny_after = torch.tensor([1.0, 1e-9])  # kept part has L1 < 1e-7: left unscaled
    assert torch.equal(apply_mask(tiny_after, mask, rescale=True), tiny_after * mask)
    tiny_before = torch.tensor([1e-9, 1e-9])
    assert torch.equal(apply_mask(tiny_before, mask, rescale=True), tiny_before * mask)
    normal = torch.tensor([3.0, 1.0])
    assert torch.equal(apply_mask(normal, mask, rescale=True), torch.tensor([0.0, 4.0]))


def test_sign_election_tie_goes_positive():
    base = torch.zeros(3)
    x0 = torch.tensor([1.0, 2.0, 1.0])  # element 0: +1 and -1 sum to 0 -> elected +1
    x1 = torch.tensor([-1.0, 3.0, -4.0])
    for normalize in (True, False):
        parameters = {"weight": [1.0, 1.0], "density": [1.0, 1.0], "normalize": normalize}
        expected = mergekit_merge("ties", base, [x0, x1], parameters)
        got = get_method("ties").merge(base=base, tensors=[x0, x1], params={"normalize": normalize},
                                       model_params=[{"weight": 1.0}] * 2)
        assert torch.equal(got, expected)
        assert got[0] == 1.0 and got[2] == -4.0


def test_zero_divisors_become_one():
    base = torch.zeros(3)
    # ties, element 0: both weighted deltas are +0.5 but the weights cancel (0.5 + -0.5) -> divide by 1
    # element 1: nothing survives -> 0 / 1; element 2: ordinary agreement of model 0 alone
    x0 = torch.tensor([1.0, 0.0, 2.0])
    x1 = torch.tensor([-1.0, 0.0, 2.0])
    weights = [0.5, -0.5]
    for name in ("ties", "task_arithmetic"):  # task_arithmetic: Σw = 0 with normalize -> divide by 1
        parameters = {"weight": weights, "density": [1.0, 1.0], "normalize": True}
        expected = mergekit_merge(name, base, [x0, x1], parameters)
        got = get_method(name).merge(base=base, tensors=[x0, x1], params={"normalize": True},
                                     model_params=[{"weight": w} for w in weights])
        assert torch.equal(got, expected), name
    assert torch.equal(got, torch.tensor([1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------- registry and validation


def test_registry_names_defaults_and_contracts():
    mergekit_methods = {
        "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
        "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
    }
    assert {m.spec.name for m in mk_registry.registered_methods()} == mergekit_methods  # all 20 of mergekit 0.1.5
    assert {name for name, method in METHODS.items() if method.in_mergekit} == mergekit_methods
    assert set(METHODS) - mergekit_methods >= {"tsv_m", "iso_c", "iso_cts"}
    defaults = {name: (METHODS[name].param("normalize").default, METHODS[name].param("rescale").default)
                for name in ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
                             "breadcrumbs_ties", "task_arithmetic")}
    assert defaults == {"ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True),
                        "della": (True, True), "della_linear": (False, True), "breadcrumbs": (False, False),
                        "breadcrumbs_ties": (False, False), "task_arithmetic": (False, False)}
    # scopes and defaults agree with mergekit's own specs
    for name in mergekit_methods:
        method = METHODS[name]
        mk_spec = mk_registry.get(name).spec
        mk_params = {p.name: p for p in mk_spec.parameters}
        assert set(mk_params) == {p.name for p in method.params}, name
        for p in method.params:
            assert p.per_model == (mk_params[p.name].scope.value != "shared"), (name, p.name)
            if not mk_params[p.name].required and mk_params[p.name].default is not None:
                assert p.default == mk_params[p.name].default, (name, p.name)
            else:
                assert p.required == mk_params[p.name].required or p.name == "scale", (name, p.name)
    assert METHODS["ties"].param("weight").required
    assert METHODS["breadcrumbs"].param("gamma").default == 0.01
    assert METHODS["della"].param("epsilon").default == 0.15
    assert METHODS["slerp"].requires_base and (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (2, 2)
    assert METHODS["linear"].uses_base_as_input and not METHODS["linear"].requires_base
    assert (METHODS["passthrough"].min_models, METHODS["passthrough"].max_models) == (1, 1)
    assert METHODS["model_stock"].min_models == 3


def test_get_method_unknown_lists_known_names():
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*known: arcee_fusion, breadcrumbs.*ties"):
        get_method("tie")
    with pytest.raises(ValueError, match="ties has no parameter 'gamma'"):
        get_method("ties").param("gamma")


def test_param_spec_validate_value_messages():
    ties = get_method("ties")
    assert ties.param("density").validate_value(1.2) == "density must be in [0, 1], got 1.2"
    assert ties.param("density").validate_value(0.5) is None
    assert ties.param("density").validate_value(1) is None
    assert get_method("breadcrumbs").param("gamma").validate_value(-1) == "gamma must be in [0, 1], got -1"
    assert get_method("della").param("epsilon").validate_value(-0.1) == "epsilon must be >= 0, got -0.1"
    assert get_method("slerp").param("t").validate_value(1.5) == "t must be in [0, 1], got 1.5"
    assert ties.param("normalize").validate_value("yes") == "normalize must be true or false, got 'yes'"
    assert ties.param("weight").validate_value(True) == "weight must be a number, got True"
    assert ties.param("weight").validate_value(float("nan")) == "weight must be finite, got nan"
    assert ties.param("weight").validate_value(-2.5) is None


def test_check_params_messages():
    della = get_method("della")
    errors = della.check_params([{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.1, "epsilon": 0.15}], {})
    assert errors == ["della: model 1: density ± epsilon must lie in (0, 1) for DELLA, got density=0.1, "
                      "epsilon=0.15 (window [-0.05, 0.25])"]
    # density 0 prunes everything and 1 keeps everything: mergekit accepts any epsilon there
    edges = [{"weight": 1.0, "density": 0.0}, {"weight": 1.0, "density": 1.0, "epsilon": 0.9}]
    assert della.check_params(edges, {}) == []
    # a global epsilon applies to every model
    assert len(della.check_params([{"weight": 1.0, "density": 0.9}], {"epsilon": 0.15})) == 1
    ties = get_method("ties")
    errors = ties.check_params([{"weight": 1.0, "density": 1.2}, {"density": 0.5, "gamma": 0.1}],
                               {"normalize": "no", "foo": 1, "density": 0.5})
    assert "ties: model 0: density must be in [0, 1], got 1.2" in errors
    known = "int8_mask, normalize, rescale, lambda, weight, density"
    assert f"ties: model 1: unknown parameter 'gamma' (known: {known})" in errors
    assert "ties: model 1: missing required parameter 'weight'" in errors
    assert "ties: normalize must be true or false, got 'no'" in errors
    assert any(e.startswith("ties: unknown parameter 'foo'") for e in errors)
    assert get_method("breadcrumbs").check_params([{"weight": 1, "gamma": -1}], {}) == [
        "breadcrumbs: model 0: gamma must be in [0, 1], got -1"]
    assert ties.check_params([{"weight": 1.0, "normalize": False}], {}) == [
        "ties: model 0: 'normalize' is a global parameter, set it once for the merge, not per model"]
    assert get_method("slerp").check_params([{}], {}) == ["slerp: missing required parameter 't'"]
    assert get_method("linear").check_params([{"weight": 1.0}, {"weight": -1.0}], {}) == [
        "linear: weights [1.0, -1.0] sum to 0, cannot normalize"]


def test_check_inputs_and_merge_errors():
    assert get_method("slerp").check_inputs(3, True) == ["slerp needs exactly 2 input models (base included), got 3",
                                                          "slerp needs exactly 1 model besides the base, got 2"]
    assert get_method("ties").check_inputs(3, False) == ["ties requires a base_model"]
    assert get_method("model_stock").check_inputs(2, True) != []
    assert get_method("nuslerp").check_inputs(3, True) == [] and get_method("nuslerp").check_inputs(2, False) == []
    assert get_method("nuslerp").check_inputs(3, False) != []
    base, others = tie_free_inputs((8, 6))
    with pytest.raises(ValueError, match="needs one random field per input model"):
        get_method("dare_ties").merge(base=base, tensors=others, model_params=[{"weight": 1.0}] * 3, params={})
    with pytest.raises(ValueError, match=r"model 0: density ± epsilon must lie in \(0, 1\)"):
        get_method("della").merge(base=base, tensors=others[:1], params={}, fields=fields_for(others[:1]),
                                  model_params=[{"weight": 1.0, "density": 0.1, "epsilon": 0.15}])
    with pytest.raises(ValueError, match=r"input 1 has shape \(6, 8\), expected \(8, 6\)"):
        get_method("ties").merge(base=base, tensors=[others[0], others[1].T], params={},
                                 model_params=[{"weight": 1.0}] * 2)
    # merging with the base alone returns the base
    assert torch.equal(get_method("ties").merge(base=base, tensors=[], model_params=[], params={}), base)
