"""The cpu backend (flat buffers, one compiled pass): every task-arithmetic variant, bit for bit against the engine.

Recipes here use what the search spaces emit and more: per-model gradients, attention/MLP
conditionals, global lambda gradients, negative weights, density 1 next to sparse inputs, and both
settings of normalize/rescale. The engine writes real safetensors files; the builder's live model
must hold exactly those tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import read_weights
from evomerge.engine import run_merge
from evomerge.methods.l1 import l1_norm
from evomerge.recipe import RecipeError, load_recipe
from evomerge.search.builder import CandidateBuilder
from evomerge.testing.recipes import VARIANT_NAMES, variant_recipe as _recipe
from tests.helpers import assert_live_equals as _assert_live_equals, source

@pytest.fixture(scope="module")
def builders(llama_family):
    """One builder per variant (setting one up is the slow part)."""
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    made = {m: CandidateBuilder(llama_family["base"], models, method=m, device="cpu", seed=3) for m in VARIANT_NAMES}
    yield made
    for b in made.values():
        b.close()


@pytest.mark.parametrize("method", VARIANT_NAMES)
@pytest.mark.parametrize("flip", [False, True], ids=["defaults", "flipped"])
def test_flat_candidate_equals_engine(builders, llama_family, tmp_path, method, flip):
    builder = builders[method]
    assert builder.backend.name == "cpu", "the cpu backend should take the task-arithmetic family"
    recipe = load_recipe(_recipe(method, llama_family, flip=flip))
    builder.build(recipe)
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    _assert_live_equals(builder, expected, f"{method} flip={flip}")


def test_new_values_and_new_structures_are_not_served_stale(builders, llama_family, tmp_path):
    """Same structure with other numbers, then another structure, then the first again: all exact."""
    builder = builders["dare_ties"]
    recipes = [
        _recipe("dare_ties", llama_family, flip=False),
        _recipe("dare_ties", llama_family, flip=False, scale=0.5, density0=0.2),
        {**_recipe("dare_ties", llama_family, flip=False), "parameters": {"lambda": 0.9}},
        _recipe("dare_ties", llama_family, flip=False, scale=1.5, density0=0.9),
    ]
    for i, data in enumerate(recipes):
        recipe = load_recipe(data)
        builder.build(recipe)
        expected = read_weights(run_merge(recipe, tmp_path / f"r{i}", device="cpu", seed=3))
        _assert_live_equals(builder, expected, f"recipe {i}")


def test_extreme_densities(builders, llama_family, tmp_path):
    """density 0 (TIES keeps none; DARE drops all) and density 1 mixed in one recipe."""
    for method in ("ties", "dare_ties", "breadcrumbs"):
        data = _recipe(method, llama_family, flip=False)
        data["models"][0]["parameters"]["density"] = 0.0
        data["models"][2]["parameters"]["density"] = [1.0, 0.0]
        recipe = load_recipe(data)
        builders[method].build(recipe)
        expected = read_weights(run_merge(recipe, tmp_path / method, device="cpu", seed=3))
        _assert_live_equals(builders[method], expected, method)


def test_invalid_values_raise_the_engines_error(builders, llama_family):
    """A DELLA window outside (0, 1) is the engine's RecipeError, not a silent merge."""
    builder = builders["della"]
    builder.build(load_recipe(_recipe("della", llama_family, flip=False)))  # the structure is now cached
    bad = _recipe("della", llama_family, flip=False)
    bad["models"][2]["parameters"]["epsilon"] = 0.5  # density 0.45 ± 0.5 leaves (0, 1)
    with pytest.raises(RecipeError, match="density ± epsilon must lie in"):
        builder.build(load_recipe(bad))


def test_flat_and_per_tensor_paths_agree_on_tied_embeddings(qwen_family, tmp_path):
    """Qwen2 with tied embeddings: the flat path, the per-tensor path and the engine agree."""
    models = {"a": str(qwen_family["ft0"]), "b": str(qwen_family["ft1"])}
    recipe = load_recipe({
        "merge_method": "ties", "base_model": str(qwen_family["base"]), "dtype": "float32",
        "models": [{"model": models["a"], "parameters": {"weight": [1.0, 0.4], "density": 0.5}},
                   {"model": models["b"], "parameters": {"weight": 0.8, "density": [0.3, 0.9]}}],
    })
    builder = CandidateBuilder(qwen_family["base"], models, method="ties", device="cpu", seed=0)
    builder.build(recipe)
    flat = {k: v.clone() for k, v in builder.model.state_dict().items()}
    reference = CandidateBuilder(qwen_family["base"], models, method="ties", device="cpu", seed=0, backend="reference")
    reference.build(recipe)
    per_tensor = reference.model.state_dict()
    reference.close()
    assert all(torch.equal(flat[k], per_tensor[k]) for k in flat)
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=0))
    _assert_live_equals(builder, expected, "qwen2 tied")
    builder.close()


def test_layer_shifted_slices_are_refused_clearly(builders, llama_family):
    ft0, ft1 = str(llama_family["ft0"]), str(llama_family["ft1"])
    recipe = load_recipe({
        "merge_method": "ties", "base_model": str(llama_family["base"]), "dtype": "float32",
        "slices": [{"sources": [{"model": ft0, "layer_range": [1, 4], "parameters": {"weight": 1.0, "density": 0.5}},
                                {"model": ft1, "layer_range": [1, 4], "parameters": {"weight": 1.0, "density": 0.5}},
                                {"model": str(llama_family["base"]), "layer_range": [0, 3]}]}],
    })
    with pytest.raises(ValueError, match="layer-shifted"):
        builders["ties"].build(recipe)


def test_l1_norm_is_accurate_and_independent_of_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3001, 7, generator=g) * torch.rand(3001, 7, generator=g) ** 4
    mask = torch.rand(3001, 7, generator=g) < 0.3
    exact = math.fsum(abs(v) for v, m in zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist()) if m)
    got = l1_norm(x, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(exact, rel=1e-7)
    # a strided view, a contiguous copy and a float64 copy agree (the same fixed order)
    wide = torch.zeros(3001, 14)
    wide[:, ::2] = x
    assert torch.equal(l1_norm(wide[:, ::2], mask), got)
    assert l1_norm(x.double(), mask).item() == pytest.approx(exact, rel=1e-12)
    assert torch.equal(l1_norm(x), l1_norm(x, torch.ones_like(mask)))


def test_slices_recipe_with_slice_and_source_parameters(builders, llama_family, tmp_path):
    """``slices:`` recipes (two slices, parameters at source, slice and global level) plan and merge exactly."""
    ft0, ft1, ft2, base = (str(llama_family[k]) for k in ("ft0", "ft1", "ft2", "base"))
    recipe = load_recipe({
        "merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"density": 0.5},
        "slices": [
            {"sources": [source(ft0, 0, 2, weight=[1.0, 0.2]), source(ft1, 0, 2, weight=0.6),
                         source(base, 0, 2)], "parameters": {"density": [0.3, 0.8]}},
            {"sources": [source(ft0, 2, 4, weight=0.4, density=0.9), source(ft2, 2, 4, weight=[0.7, 0.1]),
                         source(base, 2, 4)]},
        ],
    })
    builders["ties"].build(recipe)
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    _assert_live_equals(builders["ties"], expected, "slices")


def test_engine_and_kernel_sum_in_the_same_order():
    """``l1_norm`` (NumPy, engine) and ``flat_kernel.lane_sum`` (numba, builder) agree bit for bit,
    across several scratch chunks of the NumPy path and a ragged last block."""
    import numpy as np

    from evomerge.methods.l1 import L1_BLOCK
    from evomerge.backends.cpu_kernel import lane_sum

    g = torch.Generator().manual_seed(1)
    x = torch.randn(L1_BLOCK * 600 + 1237, generator=g) * torch.rand(L1_BLOCK * 600 + 1237, generator=g) ** 6
    mask = torch.rand(x.shape, generator=g) < 0.4
    values = (x * mask).numpy()
    total = 0.0
    for start in range(0, values.size, L1_BLOCK):
        block = values[start : start + L1_BLOCK]
        total += lane_sum(block, block.size)
    assert l1_norm(x, mask).item() == np.float32(total)
    assert torch.equal(l1_norm(x, mask), torch.tensor(total, dtype=torch.float64).to(torch.float32))


def test_bfloat16_search_matches_engine_on_float32_files(llama_family, tmp_path):
    """A bfloat16 search (resident model and recipes in bf16) reads float32 files as the engine
    does for `dtype: bfloat16` (cast first), so candidates still equal the engine's output."""
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(llama_family["base"], models, method="della", device="cpu", seed=3, dtype="bfloat16")
    recipe = load_recipe({**_recipe("della", llama_family, flip=False), "dtype": "bfloat16"})
    builder.build(recipe)
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3))
    assert all(v.dtype == torch.bfloat16 for v in expected.values())
    _assert_live_equals(builder, expected, "bfloat16")
    builder.close()


@pytest.mark.parametrize("k", [1, 4, 5])
def test_consensus_for_one_to_five_inputs(tmp_path_factory, tmp_path, k):
    """The sign election has a one-pass form for up to four inputs and a general loop beyond."""
    from evomerge.tiny import build_tiny_family

    root = tmp_path_factory.mktemp(f"five-{k}")
    base, fts = build_tiny_family(root, family="llama", n_finetunes=k, seed=7, num_layers=2)
    models = {f"m{i}": str(p) for i, p in enumerate(fts)}
    weights = [0.9, -0.4, 0.7, 0.5, 1.1]
    recipe = load_recipe({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "models": [{"model": p, "parameters": {"weight": [weights[i], 0.3], "density": [0.4, 0.8]}}
                   for i, p in enumerate(models.values())],
        "parameters": {"lambda": 1.2},
    })
    builder = CandidateBuilder(base, models, method="ties", device="cpu", seed=0)
    builder.build(recipe)
    expected = read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=0))
    _assert_live_equals(builder, expected, f"{k} inputs")
    builder.close()


def test_fused_pass_by_bounds_and_by_ranks_both_match_engine(llama_family, tmp_path):
    """float32 task vectors: every segment's window becomes magnitude bounds. bfloat16 ones have many
    equal magnitudes, so some TIES/breadcrumbs bounds fall inside a run of ties and those segments'
    fused pass compares the stable ranks instead: both equal the engine, and none needs the block path."""
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    for method in ("ties", "breadcrumbs_ties"):
        b32 = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3)
        recipe = load_recipe(_recipe(method, llama_family, flip=False))
        stats = b32.build(recipe)
        assert stats.extra["block_segments"] == 0 and stats.extra["rank_segments"] == 0
        _assert_live_equals(b32, read_weights(run_merge(recipe, tmp_path / f"{method}32", device="cpu", seed=3)),
                            f"{method} float32")
        b32.close()
        b16 = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3, dtype="bfloat16")
        recipe = load_recipe({**_recipe(method, llama_family, flip=False), "dtype": "bfloat16"})
        stats = b16.build(recipe)
        assert stats.extra["rank_segments"] > 0, "bf16 ties should make some segments compare ranks"
        assert stats.extra["block_segments"] == 0
        _assert_live_equals(b16, read_weights(run_merge(recipe, tmp_path / f"{method}16", device="cpu", seed=3)),
                            f"{method} bfloat16")
        b16.close()


def test_dare_norm_from_prefix_sums_is_the_engines_or_declined():
    """``_prefix_l1`` gives l1_norm's float32 bits when its error bound allows, and −1 otherwise."""
    import numpy as np

    from evomerge.backends import cpu_kernel as fk

    gen = torch.Generator().manual_seed(0)
    n = 10_000
    delta = torch.randn(n, generator=gen) * 1e-2
    field = torch.rand(n, generator=gen)
    order = torch.argsort(field, stable=True)
    sorted_field = field[order].numpy()
    prefix = np.cumsum(delta[order].abs().double().numpy())
    answered = 0
    for density in (0.0, 1e-4, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0):
        thr = np.float32(density)
        got = fk._prefix_l1(sorted_field, prefix, thr)
        expected = l1_norm(delta * (field < thr)).item()
        if got >= 0:
            answered += 1
            assert np.float32(got) == np.float32(expected), density
    assert answered >= 6
    # an exact sum on a float32 rounding midpoint (1 + 2^-24) cannot be pinned down: declined
    tie = fk._prefix_l1(np.array([0.1, 0.2], dtype=np.float32), np.array([1.0, 1.0 + 2.0 ** -24]),
                        np.float32(0.5))
    assert tie == -1


def test_inputs_with_nan_are_refused_at_load(llama_family, tmp_path):
    """Like ``evomerge merge``, the builder refuses a model holding NaN, naming the model and the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.engine import MergeError

    bad = tmp_path / "bad"
    shutil.copytree(llama_family["ft1"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.weight"][2, 3] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"bad.*model\.layers\.1\.self_attn\.q_proj\.weight.*NaN"):
        CandidateBuilder(llama_family["base"], {"a": str(llama_family["ft0"]), "b": str(bad)}, method="ties",
                         device="cpu")


def test_vectorized_della_window_check_is_the_scalar_rule():
    """``della_window_broken`` flags exactly the pairs ``della_window_error`` reports (edges included)."""
    import numpy as np

    from evomerge.methods.sparsify import della_window_broken, della_window_error

    rng = np.random.default_rng(0)
    d = np.concatenate([rng.uniform(-0.2, 1.2, 400), [0.0, 1.0, 0.5, 0.5, 0.25, 0.75, 0.9]])
    e = np.concatenate([rng.uniform(0.0, 0.6, 400), [0.1, 0.1, 0.5, 0.49, 0.25, 0.25, 0.1]])
    scalar = [della_window_error(float(a), float(b)) is not None for a, b in zip(d, e)]
    assert any(scalar) and not all(scalar)
    for i in range(len(d)):
        assert della_window_broken(d[i : i + 1], e[i : i + 1]) == scalar[i], (d[i], e[i])
    assert della_window_broken(d, e) == any(scalar)


def test_della_norm_from_the_band_is_the_engines_or_declined():
    """``_band_l1`` gives l1_norm's float32 bits of a DELLA-masked δ when its error bound allows, −1
    otherwise, with the segment in one stratum of q or in several (``della_band_tables``)."""
    import numpy as np

    from evomerge.methods.sparsify import della_ranks
    from evomerge.backends import cpu_kernel as fk

    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 96, generator=gen) * 1e-2
    field = torch.rand(64, 96, generator=gen)
    q = fk.della_q(della_ranks(delta).reshape(1, -1).numpy(), [(0, delta.numel())], np.array([96]))[0]
    u, mags = field.reshape(-1).numpy(), delta.reshape(-1).abs().numpy()
    scratch = np.empty(1000, dtype=np.float32)
    for strata in (1, 3, 8, 64):
        sorted_field, q_sorted, sorted_mags, prefix, bounds, q_range = fk.della_band_tables(u, q, mags, strata)
        assert sorted(zip(sorted_field, q_sorted)) == sorted(zip(u, q))  # a permutation of the elements
        assert bounds[0] == 0 and bounds[-1] == u.size and (np.diff(bounds) > 0).sum() == strata
        answered = 0
        for density, eps in ((0.5, 0.1), (0.3, 0.02), (0.7, 0.18), (0.05, 0.04), (0.9, 0.09), (0.5, 0.0)):
            a, b = np.float32(density - eps), np.float32(eps)
            keep = torch.from_numpy(u < a + q * b)  # keep_della, float32
            expected = l1_norm(delta.reshape(-1) * keep).item()
            got = fk._band_l1(sorted_field, q_sorted, sorted_mags, prefix, bounds, q_range, a, b, scratch)
            if got >= 0:
                answered += 1
                assert np.float32(got) == np.float32(expected), (strata, density, eps)
        assert answered >= 5, strata
        assert fk._band_l1(sorted_field, q_sorted, sorted_mags, prefix, bounds, q_range, np.float32(0.4),
                           np.float32(-0.1), scratch) == -1


def test_exponential_search_is_searchsorted():
    """``_search_from`` finds np.searchsorted's position from any start below it."""
    import numpy as np

    from evomerge.backends import cpu_kernel as fk

    values = np.sort(np.random.default_rng(0).random(5000).astype(np.float32))
    values[100:140] = values[100]  # a run of equal values
    for x in (-1.0, 0.0, float(values[100]), 0.3, 0.5, 0.9999, 2.0):
        x32 = np.float32(x)
        expected = int(np.searchsorted(values, x32))
        for start in {0, expected // 2, max(0, expected - 17), expected}:
            assert fk._search_from(values, start, x32) == expected, (x, start)


def test_search_recipes_carry_their_structure_and_share_one_plan(builders, llama_family):
    """Decoded recipes carry the real structure signature (names do not count); a copy with new
    models loses it; differently named trials of one space re-use one plan template."""
    from evomerge.recipe import Recipe
    from evomerge.backends.fast_plan import structure_signature
    from evomerge.search.space import load_space

    space = load_space({"method": "ties", "granularity": "layer",
                        "search": {"weight": {"low": 0.0, "high": 2.0, "default": 1.0},
                                   "density": {"low": 0.1, "high": 0.9, "default": 0.5}}})
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    b = builders["ties"]
    names = space.param_names(list(models), b.num_layers)
    decode = dict(base_model=str(llama_family["base"]), models=models, num_layers=b.num_layers, dtype="float32")
    r1 = space.to_recipe({n: 0.7 for n in names}, **decode, name="trial-1")
    r2 = space.to_recipe({n: 0.3 for n in names}, **decode, name="trial-2")
    assert r1.stamped_structure() == structure_signature(Recipe.model_validate(r1.to_dict()))
    assert r2.stamped_structure() == r1.stamped_structure()
    assert r2.model_copy(update={"models": list(r2.models)}).stamped_structure() is None
    b.build(r1)
    templates = dict(b.backend._templates)
    b.build(r2)
    assert b.backend._templates == templates


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_host_memory_check_refuses_or_drops_the_rescale_tables(llama_family, tmp_path, monkeypatch, method):
    """On the CPU the builder compares what it will hold with the available memory before loading: too
    little is refused with the numbers; room for all but the optional rescale-norm tables builds without
    them (each norm summed over its tensor), with a warning and the engine's bits."""
    import collections

    import psutil

    from evomerge.engine import MergeError
    from evomerge.backends.memory import host_path_bytes

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    probe = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3)
    sizes = [e - a for a, e in probe.backend.offsets_array]
    probe.close()
    need, optional = host_path_bytes(sum(sizes), max(sizes), 3, probe.backend.variant.sparsification, torch.float32)
    assert optional > 0
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(need // 2))
    with pytest.raises(MergeError, match=rf"needs about .* GiB of memory .* 3 fine-tune\(s\) \({method}\)"):
        CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(need + optional // 2))
    with pytest.warns(RuntimeWarning, match="rescale-norm tables"):
        builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3)
    assert not builder.backend.rescale_tables
    recipe = load_recipe(_recipe(method, llama_family, flip=False))
    builder.build(recipe)
    assert builder.backend.prefix_sum.size == 0
    _assert_live_equals(builder, read_weights(run_merge(recipe, tmp_path / "engine", device="cpu", seed=3)),
                        f"{method} without rescale tables")
    builder.close()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_host_path_bytes_covers_what_the_host_path_holds(llama_family, method):
    """``host_path_bytes`` (held + optional) is at least what a precomputed host-path builder holds, and
    over it by no more than the sort scratch."""
    import numpy as np

    from evomerge.backends.memory import host_path_bytes

    models = {k: str(llama_family[k]) for k in ("ft0", "ft1")}
    builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=0)
    builder.precompute()
    arrays = [builder.backend.flat_base, builder.backend.flat_inputs, builder.backend.flat_out, builder.backend.flat_ranks, builder.backend.flat_fields,
              builder.backend.flat_q, builder.backend.flat_sorted, builder.backend.prefix_field, builder.backend.prefix_sum]
    held = sum(a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
               for a in arrays if a is not None)
    sizes = [e - a for a, e in builder.backend.offsets_array]
    need, optional = host_path_bytes(sum(sizes), max(sizes), 2, builder.backend.variant.sparsification, torch.float32)
    assert held <= need + optional <= held + 24 * max(sizes), (held, need, optional)
    builder.close()
