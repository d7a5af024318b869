"""Data-free subspace methods (TSV-M, Iso-C, Iso-CTS): independent derivations, validation, recipes.

FusionBench 0.2.33 (the reference implementations) cannot be imported without hydra, lightning,
omegaconf and tensorboard, so these tests check each kernel against a derivation written with
different primitives (the orthogonalization as U(UᵀU)^(-1/2) from an eigendecomposition instead of
an SVD's polar factor; the isotropic spectrum checked through the singular values and subspaces of
the result). During development the kernels were also compared with FusionBench's ``iso_c``,
``iso_cts`` and ``compute_and_sum_svd_mem_reduction`` in float64: max abs difference 1e-13.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from evomerge.engine import StateDictReader, merge_in_memory, plan_merge, run_merge
from evomerge.methods import METHODS, get_method, iso_cts_dims, tsv_rank
from evomerge.recipe import RecipeError, load_recipe
from tests.conftest import read_weights

SUBSPACE = ("tsv_m", "iso_c", "iso_cts", "wudi")


def inputs(shape, n_models=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(n_models)]


def inverse_sqrt_orthonormalize(m: torch.Tensor) -> torch.Tensor:
    """M (MᵀM)^(-1/2) by an eigendecomposition: the orthonormal matrix nearest to M (full column rank M)."""
    evals, evecs = torch.linalg.eigh(m.T @ m)
    return m @ (evecs * evals.rsqrt()) @ evecs.T


def derived_tsv(deltas, k):
    """TSV-M: Σ-weighted recombination of each task's top-k singular vectors after symmetric orthonormalization."""
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    u, v = inverse_sqrt_orthonormalize(torch.cat(us, 1)), inverse_sqrt_orthonormalize(torch.cat(vs, 1))
    return u @ torch.diag(torch.cat(ss)) @ v.T


def merge(name, base, others, weights=None, **params):
    weights = weights or [1.0] * len(others)
    return get_method(name).merge(base=base, tensors=others, model_params=[{"weight": w} for w in weights],
                                  params=params)


@pytest.mark.parametrize("shape", [(48, 30), (20, 61)])
@pytest.mark.parametrize("rank_fraction", [0.0, 0.1, 0.25])
def test_tsv_m_matches_derivation(shape, rank_fraction):
    base, others = inputs(shape)
    weights = [1.0, 0.5, -0.8]
    deltas = [w * (x - base) for w, x in zip(weights, others)]
    k = tsv_rank(shape, 3, rank_fraction)
    assert k == int(min(shape) * (rank_fraction or 1 / 3))
    got = merge("tsv_m", base, others, weights, rank_fraction=rank_fraction, **{"lambda": 0.7})
    torch.testing.assert_close(got, base + 0.7 * derived_tsv(deltas, k), rtol=1e-9, atol=1e-10)


def test_tsv_m_of_orthogonal_task_vectors_is_their_sum():
    """Task vectors in mutually orthogonal row and column spaces need no decorrelation: TSV-M is their sum."""
    q_left, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    q_right, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    deltas = [q_left[:, 3 * i:3 * i + 3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * (i + 1))
              @ q_right[:, 3 * i:3 * i + 3].T for i in range(3)]
    base = torch.zeros(40, 30, dtype=torch.float64)
    got = merge("tsv_m", base, [base + d for d in deltas], rank_fraction=0.1)  # k = 3 = each task's rank
    torch.testing.assert_close(got, sum(deltas), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(48, 30), (20, 61)])
def test_iso_c_flattens_the_spectrum_of_the_sum(shape):
    base, others = inputs(shape)
    total = sum(x - base for x in others)
    got = (merge("iso_c", base, others, **{"lambda": 1.5}) - base) / 1.5
    s_total = torch.linalg.svdvals(total)
    torch.testing.assert_close(torch.linalg.svdvals(got), s_total.mean().expand_as(s_total), rtol=1e-9, atol=1e-9)
    # same left and right singular subspaces: got = P_U total P_V scaled per direction, so the projectors agree
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(got, u @ u.T @ got @ vh.T @ vh, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u.T @ got @ vh.T, s_total.mean() * torch.eye(len(s_total), dtype=got.dtype),
                               rtol=1e-9, atol=1e-9)


def derived_iso_cts(deltas, fraction):
    """Iso-CTS by projections: the sum's top-c subspace, each task's top-d residual directions, orthonormalized."""
    common, per_task = iso_cts_dims(deltas[0].shape, len(deltas), fraction)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    projector = torch.eye(deltas[0].shape[0], dtype=deltas[0].dtype) - u[:, :common] @ u[:, :common].T
    for d in deltas:
        ut, st, vht = torch.linalg.svd(projector @ d, full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vs.append(vht[:per_task].T)
    spectrum = torch.cat(ss)
    left, right = inverse_sqrt_orthonormalize(torch.cat(us, 1)), inverse_sqrt_orthonormalize(torch.cat(vs, 1))
    return spectrum.mean() * left @ right.T


@pytest.mark.parametrize("shape", [(48, 30), (20, 61)])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2])
def test_iso_cts_matches_derivation(shape, fraction):
    base, others = inputs(shape, seed=3)
    common, per_task = iso_cts_dims(shape, 3, fraction)
    assert common + 3 * per_task == min(shape) and common >= int(min(shape) * fraction) - 2
    got = merge("iso_cts", base, others, common_space_fraction=fraction)
    torch.testing.assert_close(got, base + derived_iso_cts([x - base for x in others], fraction),
                               rtol=1e-8, atol=1e-9)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, others = inputs((24, 36), seed=4)
    torch.testing.assert_close(merge("iso_cts", base, others, common_space_fraction=1.0),
                               merge("iso_c", base, others), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SUBSPACE)
def test_non_matrices_take_the_mean_task_vector(name):
    base, others = inputs((33,))
    got = merge(name, base, others, [1.0, 2.0, 0.5], **{"lambda": 0.9})
    mean = sum(w * (x - base) for w, x in zip([1.0, 2.0, 0.5], others)) / 3
    torch.testing.assert_close(got, base + 0.9 * mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SUBSPACE)
def test_float32_and_bfloat16_inputs_keep_their_dtype(name):
    base, others = inputs((16, 12), dtype=torch.float64)
    reference = merge(name, base, others)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = merge(name, base.to(dtype), [x.to(dtype) for x in others])
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), reference, rtol=tol, atol=tol)


def test_parameters_are_strict():
    tsv = get_method("tsv_m")
    assert not tsv.in_mergekit and tsv.requires_base
    assert tsv.check_params([{"weight": 1.0}] * 3, {"rank_fraction": 0.5}) == [
        "tsv_m: rank_fraction 0.5 x 3 models exceeds 1: the task subspaces together cannot hold more singular "
        "components than a matrix has (use at most 0.3333, or 0 for 1/3)"]
    assert tsv.check_params([{}] * 3, {"rank_fraction": 1 / 3}) == []
    assert tsv.check_params([{}], {"rank_fraction": 1.5}) == ["tsv_m: rank_fraction must be in [0, 1], got 1.5"]
    assert get_method("iso_cts").check_params([{}], {"common_space_fraction": -0.1}) == [
        "iso_cts: common_space_fraction must be in [0, 1], got -0.1"]
    assert get_method("iso_c").check_params([{}], {"rank_fraction": 0.1})[0].startswith(
        "iso_c: unknown parameter 'rank_fraction'")
    assert get_method("iso_c").check_inputs(1, True) == ["iso_c needs at least 2 input models (base included), got 1",
                                                         "iso_c needs at least 1 model besides the base, got 0"]
    assert get_method("iso_c").check_inputs(3, False)[0] == "iso_c requires a base_model"


def test_recipes_run_in_memory_and_errors_come_before_merging(llama_family):
    models = {name: read_weights(path) for name, path in llama_family.items()}
    recipe = {"merge_method": "iso_cts", "base_model": "base",
              "models": [{"model": "ft0"}, {"model": "ft1", "parameters": {"weight": 0.5}}],
              "parameters": {"lambda": 1.2, "common_space_fraction": 0.6}}
    merged = merge_in_memory(recipe, models, device="cpu")
    name = "model.layers.1.mlp.down_proj.weight"
    expected = get_method("iso_cts").merge(base=models["base"][name], tensors=[models["ft0"][name], models["ft1"][name]],
                                           model_params=[{"weight": 1.0}, {"weight": 0.5}],
                                           params={"lambda": 1.2, "common_space_fraction": 0.6})
    assert torch.equal(merged[name], expected)
    norm = "model.norm.weight"
    mean = (models["ft0"][norm] - models["base"][norm] + 0.5 * (models["ft1"][norm] - models["base"][norm])) / 2
    torch.testing.assert_close(merged[norm], models["base"][norm] + 1.2 * mean)

    too_small = {**recipe, "merge_method": "tsv_m", "parameters": {"rank_fraction": 0.01}}
    with pytest.raises(RecipeError, match=r"tsv_m: shape \[\d+, \d+\]: rank_fraction 0.01 keeps no singular "
                                          r"component .*raise rank_fraction \(every tensor|tensors"):
        plan_merge(too_small, readers={n: StateDictReader(sd) for n, sd in models.items()})
    with pytest.raises(RecipeError, match="rank_fraction must be in"):
        load_recipe({**recipe, "merge_method": "tsv_m", "parameters": {"rank_fraction": 2}})
    with pytest.raises(RecipeError, match="models.*common_space_fraction.*applies to the whole merge"):
        load_recipe({**recipe, "models": [{"model": "ft0", "parameters": {"common_space_fraction": 0.5}}]})


def test_exported_recipe_and_model_card_say_mergekit_cannot_run_it(llama_family, tmp_path):
    recipe = load_recipe({"merge_method": "tsv_m", "base_model": str(llama_family["base"]),
                          "models": [{"model": str(llama_family["ft0"])}, {"model": str(llama_family["ft1"])}]})
    text = recipe.to_yaml()
    assert text.startswith("# merge_method tsv_m (TSV-Merge) is an evomerge method: mergekit cannot run this recipe")
    assert load_recipe(text).to_dict() == recipe.to_dict()
    assert not load_recipe({**recipe.to_dict(), "merge_method": "ties",
                            "parameters": {"weight": 1.0}}).to_yaml().startswith("#")
    out = run_merge(recipe, tmp_path / "out", device="cpu")
    assert (out / "mergekit_config.yml").read_text().startswith("# merge_method tsv_m")
    assert "Note: merge_method tsv_m (TSV-Merge) is an evomerge method" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "tsv_m"
    assert set(SUBSPACE) <= set(METHODS)


@pytest.mark.parametrize("space_file", ["tsv_m_per_model.yaml", "iso_cts_per_model.yaml", "iso_c_per_block.yaml"])
def test_shipped_spaces_build_the_engines_merge(llama_family, tmp_path, space_file):
    """A random point of each shipped subspace space: the search's candidate equals ``run_merge`` of its recipe."""
    from pathlib import Path

    from evomerge.search.builder import CandidateBuilder
    from evomerge.search.space import load_space

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / space_file)
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    builder = CandidateBuilder(llama_family["base"], models, method=space.method, device="cpu", seed=0)
    rng = torch.Generator().manual_seed(3)
    point = {k: d.low + (d.high - d.low) * torch.rand(1, generator=rng).item()
             for k, d in space.distributions(list(models), builder.num_layers).items()}
    recipe = space.to_recipe(point, base_model=str(llama_family["base"]), models=models,
                             num_layers=builder.num_layers, dtype="float32")
    builder.build(recipe)
    out = read_weights(run_merge(recipe, tmp_path / "out", device="cpu"))
    live = builder.model.state_dict()
    assert out and all(torch.equal(v, live[k]) for k, v in out.items())


def test_wudi_descends_to_the_least_squares_minimizer():
    """WUDI's loss is quadratic: Σᵢ (τ − δᵢ)Mᵢ = 0 with Mᵢ = δᵢᵀδᵢ/‖δᵢ‖² gives τ* = (Σ δᵢMᵢ)(Σ Mᵢ)⁻¹.
    Adam from Σ δᵢ reaches it; 0 iterations is task arithmetic's sum. (FusionBench's ``wudi_merging``
    gave bit-identical tensors during development.)"""
    from evomerge.methods import wudi_loss

    base, others = inputs((12, 6), dtype=torch.float32)
    deltas = [x - base for x in others]
    ms = [d.T @ d / d.square().sum() for d in deltas]
    optimum = sum(d @ m for d, m in zip(deltas, ms)) @ torch.linalg.inv(sum(ms))
    got = merge("wudi", base, others, iterations=3000, learning_rate=1e-3) - base
    torch.testing.assert_close(got, optimum, rtol=0, atol=2e-3)
    start = merge("wudi", base, others, iterations=0) - base
    torch.testing.assert_close(start, sum(deltas))
    stacked = torch.stack(deltas)
    norms = stacked.reshape(3, -1).norm(dim=-1).square()
    few = merge("wudi", base, others, iterations=20) - base
    assert wudi_loss(few, stacked, norms) < wudi_loss(start, stacked, norms)
    with torch.inference_mode():  # as the search's candidate builder runs kernels
        assert torch.equal(merge("wudi", base, others, iterations=20) - base, few)
    assert get_method("wudi").check_params([{}], {"iterations": 1.5}) == [
        "wudi: iterations must be a whole number, got 1.5"]
