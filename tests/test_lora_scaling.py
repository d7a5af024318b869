"""Weight-only searches over LoRA adapters: candidates as per-module scalings of one live PEFT model."""

import optuna
import pytest
import torch
import yaml

from evomerge.checkpoint import ModelReader
from evomerge.engine import plan_merge, run_merge
from evomerge.lora.extract import extract_lora
from evomerge.lora.scaling import ScalingBuilder
from evomerge.recipe import load_recipe
from evomerge.tiny import build_tiny_adapter

IDS = torch.tensor([[2, 10, 20, 30, 40, 50, 5]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def builder(llama_family, tmp_path_factory):
    root, base = tmp_path_factory.mktemp("scaling"), llama_family["base"]
    a = build_tiny_adapter(base, root / "a", seed=11, r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "embed_tokens"])
    b = build_tiny_adapter(base, root / "b", seed=12, r=2, lora_alpha=2, target_modules=["v_proj", "down_proj"])
    return ScalingBuilder(base, {"a": a, "b": b}, method="task_arithmetic", device="cpu")


@pytest.mark.parametrize("recipe", [
    {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8},
     "models": [{"parameters": {"weight": [1.2, -0.4, 0.3, 0.9]}},
                {"parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": -1.0}]}}]},
    {"merge_method": "linear", "parameters": {"weight": 0.2},
     "models": [{"parameters": {"weight": 0.5}}, {"parameters": {"weight": 0.3}}]},
])
def test_scalings_equal_the_engines_merge(builder, recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = dict(recipe, base_model=builder.base_dir)
    recipe["models"] = [dict(m, model=p) for m, p in zip(recipe["models"], builder.model_paths.values())]
    recipe = load_recipe(recipe)
    builder.build(recipe)
    expected = _logits(AutoModelForCausalLM.from_pretrained(run_merge(recipe, tmp_path / "m", device="cpu")).eval())
    torch.testing.assert_close(_logits(builder.model), expected, rtol=1e-5, atol=1e-5)
    builder.load_model_weights(None)
    base = _logits(AutoModelForCausalLM.from_pretrained(builder.base_dir).eval())
    torch.testing.assert_close(_logits(builder.model), base, rtol=1e-6, atol=1e-6)


def test_dense_writes_switch_adapters_off_until_the_next_build(builder, llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.search.baselines import build_into

    recipe = load_recipe({"merge_method": "task_arithmetic", "base_model": builder.base_dir, "models": [
        {"model": p, "parameters": {"weight": 0.7}} for p in builder.model_paths.values()]})
    builder.build(recipe)
    candidate = _logits(builder.model)
    full = load_recipe({"merge_method": "linear", "models": [{"model": str(llama_family["ft0"]),
                                                              "parameters": {"weight": 1.0}}]})
    builder.readers[str(llama_family["ft0"])] = ModelReader(llama_family["ft0"])  # as the export adds a reference
    build_into(builder, full, None)  # a full model's weights written through ``params``
    ft0 = _logits(AutoModelForCausalLM.from_pretrained(llama_family["ft0"]).eval())
    torch.testing.assert_close(_logits(builder.model), ft0, rtol=1e-6, atol=1e-6)
    builder.build(recipe)
    torch.testing.assert_close(_logits(builder.model), candidate, rtol=0, atol=0)


def test_sparse_recipes_and_dora_are_refused(builder, llama_family, tmp_path):
    from evomerge.lora import AdapterError

    recipe = load_recipe({"merge_method": "task_arithmetic", "base_model": builder.base_dir, "models": [
        {"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in builder.model_paths.values()]})
    with pytest.raises(ValueError, match="not a linear combination"):
        builder.build(recipe)
    dora = build_tiny_adapter(llama_family["base"], tmp_path / "dora", r=2, lora_alpha=2, use_dora=True,
                              target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="DoRA"):
        ScalingBuilder(llama_family["base"], {"d": dora}, method="task_arithmetic", device="cpu")
    with pytest.raises(ValueError, match="not a linear combination"):
        ScalingBuilder(llama_family["base"], {"d": dora}, method="ties", device="cpu")
    with pytest.raises(AdapterError, match="'ft0'.*not a LoRA adapter"):
        ScalingBuilder(llama_family["base"], {"ft0": llama_family["ft0"]}, method="linear", device="cpu")


def test_lora_hub_search_beats_its_first_trial(tiny_zoo, tmp_path):
    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun
    from tests.test_search import SPACES

    adapters = {name: str(extract_lora(path, tiny_zoo.base, tmp_path / "adapters" / name, rank=8,
                                                 lora_only=True).path)
                for name, path in tiny_zoo.experts.items()}
    cfg = {"name": "hub", "base_model": str(tiny_zoo.base), "models": adapters, "tasks": str(tiny_zoo.tasks_yaml),
           "search_space": str(SPACES / "lora_hub_per_model.yaml"), "budget": {"trials": 10}, "lora_scalings": True,
           "sampler": {"name": "cmaes", "popsize": 4}, "start": "default", "pruner": {"name": "none"},
           "output_dir": str(tmp_path / "run"), "device": "cpu", "top_k": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = SearchRun(load_config(tmp_path / "run.yaml"))
    assert isinstance(run.builder, ScalingBuilder)
    run.run()
    trials = [t for t in run.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 10 and max(t.value for t in trials) > trials[0].value
    finalize(run)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| base |" in summary and "| adapter: " in summary and "| PEFT add_weighted_adapter cat" in summary
    winner = load_recipe(tmp_path / "run" / "best_recipe.yaml")
    run.builder.build(winner)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    torch.testing.assert_close(_logits(run.builder.model), _logits(exported), rtol=1e-4, atol=1e-4)
    assert plan_merge(winner).method.name == "task_arithmetic"
