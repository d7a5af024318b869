"""Fisher merging: the weighted average and its normalization, per-example Fisher, recipes.

FusionBench 0.2.33 cannot be imported (hydra, lightning, omegaconf), so the merge is checked against
the formula written out here; during development its ``merging_with_fisher_weights`` gave the same
float64 result within 5e-16. The Fisher itself is checked against gradients of a log-likelihood
computed here from the logits (not the model's own loss). FusionBench computes classifier Fishers by
its sqrt(p)·log p expectation over labels; for causal LMs evomerge uses the gold next tokens
(the empirical Fisher).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.calibration import fisher_statistics
from evomerge.engine import plan_merge, prepare_statistics, run_merge
from evomerge.methods import get_method, normalized_fisher
from evomerge.recipe import RecipeError, load_recipe
from tests.conftest import read_weights
from tests.test_regmean import write_tasks


def test_fisher_average_is_the_normalized_weighted_mean():
    g = torch.Generator().manual_seed(0)
    xs = {n: [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)] for n in ("w", "b")}
    fishers = [{n: torch.rand(4, 3, generator=g, dtype=torch.float64) for n in ("w", "b")} for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    norms = [torch.cat([f[n].reshape(-1) for n in ("w", "b")]).norm() for f in fishers]
    for n in ("w", "b"):
        scaled = [w * (f[n] + 1e-6) / (norm + 1e-6) for w, f, norm in zip(weights, fishers, norms)]
        expected = sum(s * x for s, x in zip(scaled, xs[n])) / sum(scaled)
        got = get_method("fisher").merge(base=None, tensors=xs[n], model_params=[{"weight": w} for w in weights],
                                         params={}, statistics=[normalized_fisher(f)[n] for f in fishers])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # a model with all the information on an element takes it
    a, b = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 7.0])
    got = get_method("fisher").merge(base=None, tensors=[a, b], model_params=[{}, {}], params={},
                                     statistics=[torch.tensor([1e6, 0.0]), torch.tensor([0.0, 1e6])])
    torch.testing.assert_close(got, torch.tensor([1.0, 7.0]), rtol=1e-5, atol=1e-5)
    assert get_method("fisher").check_params([{"weight": 0.0}, {"weight": 0.0}], {}) == [
        "fisher: weights [0.0, 0.0] sum to 0: nothing to average"]
    assert get_method("fisher").check_params([{"weight": -1.0}], {}) == ["fisher: model 0: weight must be >= 0, got -1"]


def test_fisher_statistics_are_mean_squared_per_example_gradients(llama_family):
    model = AutoModelForCausalLM.from_pretrained(llama_family["ft0"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama_family["ft0"])
    texts = ["Q : 1 + 2 = A : 3", "4 is 4 and 5"]
    got = fisher_statistics(model, tokenizer, texts, max_length=64)
    name = "model.layers.1.mlp.down_proj.weight"
    squares = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        nll = -logp.gather(1, ids[0, 1:, None]).sum()
        (grad,) = torch.autograd.grad(nll, dict(model.named_parameters())[name])
        squares.append(grad.square())
    torch.testing.assert_close(got[name], (squares[0] + squares[1]) / 2, rtol=1e-4, atol=1e-10)
    assert set(got) == {n for n, _ in model.named_parameters()}


def test_fisher_recipe_merges_with_cached_statistics(llama_family, tmp_path):
    tasks = write_tasks(tmp_path)
    recipe = load_recipe({"merge_method": "fisher", "base_model": str(llama_family["base"]),
                          "models": [{"model": str(llama_family["ft0"])},
                                     {"model": str(llama_family["ft1"]), "parameters": {"weight": 0.5}}],
                          "calibration": {"tasks": str(tasks), "examples": 4}})
    plan = prepare_statistics(plan_merge(recipe), cache_dir=tmp_path / "cache", device="cpu")
    assert len(list((tmp_path / "cache").glob("fisher-*.safetensors"))) == 2  # not the base: it is not merged
    out = read_weights(run_merge(recipe, tmp_path / "out", device="cpu", statistics_cache=tmp_path / "cache"))
    ft0, ft1 = read_weights(llama_family["ft0"]), read_weights(llama_family["ft1"])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        f0, f1 = (plan.statistics[str(llama_family[m])][name] for m in ("ft0", "ft1"))
        torch.testing.assert_close(out[name], (f0 * ft0[name] + 0.5 * f1 * ft1[name]) / (f0 + 0.5 * f1))
    assert (tmp_path / "out" / "mergekit_config.yml").read_text().startswith("# merge_method fisher (Fisher merging)")
    with pytest.raises(RecipeError, match="calibration: method 'fisher' needs calibration data"):
        load_recipe({**recipe.to_dict(), "calibration": None})
