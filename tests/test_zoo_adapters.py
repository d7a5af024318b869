"""The demo zoo's LoRA experts (evomerge.zoo_adapters): real PEFT adapters on the zoo base, each better than the
base on its own task, deterministic, cached; a run config's ``zoo: {adapters: true}`` searches them and PEFT's
``cat`` baseline equals the default merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def adapters(tiny_zoo_adapters):
    return tiny_zoo_adapters


def _base(zoo):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()


def test_each_adapter_loads_with_peft_and_beats_the_base_on_its_task(tiny_zoo, adapters):
    from peft import PeftModel

    from evomerge.evaluate import Evaluator

    assert set(adapters) == set(tiny_zoo.experts)
    tok = tiny_zoo.tokenizer()
    for name, path in adapters.items():
        test = Evaluator(tiny_zoo.task_yamls[name], tok, split="test", batch_size=64, bootstrap_iters=0)
        base_score = test.evaluate(_base(tiny_zoo)).aggregate
        model = PeftModel.from_pretrained(_base(tiny_zoo), path).eval()
        assert model.peft_config["default"].r == 8
        score = test.evaluate(model).aggregate
        assert score >= base_score + 0.1, (name, score, base_score)


def test_adapters_are_cached_and_retrain_bit_for_bit(tiny_zoo, adapters):
    from peft import get_peft_model_state_dict

    from evomerge.zoo import make_zoo_data, zoo_tokenizer
    from evomerge.zoo_adapters import build_adapters, train_adapter

    weights = adapters["map"] / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_adapters(tiny_zoo) == adapters and weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    model = train_adapter(_base(tiny_zoo), ["map"], tiny_zoo, zoo_tokenizer(), make_zoo_data("tiny", 0))
    saved = load_file(weights)
    again = get_peft_model_state_dict(model)
    assert set(saved) == set(again)
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_a_run_config_searches_the_zoo_adapters_and_peft_cat_is_the_default_merge(tiny_zoo, adapters, tmp_path):
    from evomerge.lora.scaling import ScalingBuilder
    from evomerge.recipe import load_recipe
    from evomerge.search.baselines import peft_merged_models
    from evomerge.search.config import RunConfig
    from evomerge.search.run import resolve_inputs

    cfg = RunConfig(zoo={"size": "tiny", "dir": str(tiny_zoo.root), "adapters": True}, search_space="x.yaml",
                    output_dir=str(tmp_path))
    inputs = resolve_inputs(cfg, progress=lambda _: None)
    assert inputs.models == {name: str(p) for name, p in adapters.items()}

    builder = ScalingBuilder(inputs.base_model, inputs.models, method="task_arithmetic", device="cpu")
    builder.build(load_recipe({"merge_method": "task_arithmetic", "base_model": inputs.base_model,
                               "models": [{"model": p, "parameters": {"weight": 1.0}} for p in inputs.models.values()]}))
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        default = builder.model(input_ids=ids).logits
        merges = {label.split()[2]: model(input_ids=ids).logits.clone()
                  for label, model in peft_merged_models(inputs.base_model, inputs.models, torch.float32, "cpu")}
    assert set(merges) == {"cat", "ties"}
    torch.testing.assert_close(merges["cat"], default, rtol=1e-5, atol=1e-5)
    assert (merges["ties"] - default).abs().max() > 1e-2  # PEFT's TIES on factors is another merge
