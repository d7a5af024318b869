"""PEFT compatibility mode (evomerge.lora.peft_compat, ``merge_method: peft``): the written adapter is bit for bit
PEFT's ``add_weighted_adapter`` for every combination type; bad recipes are refused before any weight is read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.lora import AdapterError
from evomerge.lora.peft_compat import COMBINATION_TYPES, NEEDS_DENSITY, load_peft_recipe, peft_merge

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
WEIGHTS = [1.0, 0.7]


def _recipe(zoo, adapters, kind, **options) -> dict:
    params = {"combination_type": kind, **({"density": 0.5} if kind in NEEDS_DENSITY else {}), **options}
    return {"merge_method": "peft", "base_model": str(zoo.base), "parameters": params, "seed": 3,
            "models": [{"model": str(adapters[n]), "parameters": {"weight": w}}
                       for n, w in zip(("rev", "map"), WEIGHTS)]}


def _peft_reference(zoo, adapters, kind, options) -> dict[str, torch.Tensor]:
    """PEFT's own add_weighted_adapter on a fresh PeftModel, the torch generator seeded as the recipe says."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32),
                                      adapters["rev"], adapter_name="a")
    model.load_adapter(adapters["map"], adapter_name="b")
    torch.manual_seed(3)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "ref", combination_type=kind, **options)
    return get_peft_model_state_dict(model, adapter_name="ref")


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
def test_every_combination_type_is_peft_bit_for_bit(tiny_zoo, tiny_zoo_adapters, tmp_path, kind):
    data = _recipe(tiny_zoo, tiny_zoo_adapters, kind)
    out = peft_merge(load_peft_recipe(data, "recipe.yaml"), tmp_path / "merged")
    written = load_file(out / "adapter_model.safetensors")
    reference = _peft_reference(tiny_zoo, tiny_zoo_adapters, kind, {k: v for k, v in data["parameters"].items()
                                                                    if k != "combination_type"})
    assert set(written) == set(reference) and written
    assert all(torch.equal(written[k], reference[k]) for k in written), kind


def test_bad_peft_recipes_are_refused_naming_the_problem(tiny_zoo, tiny_zoo_adapters, tmp_path):
    good = _recipe(tiny_zoo, tiny_zoo_adapters, "ties")
    cases = [
        ({**good, "parameters": {"combination_type": "ties"}}, "needs parameters.density"),
        ({**good, "parameters": {"combination_type": "ties", "density": 0}}, "density"),
        ({**good, "parameters": {"combination_type": "mean"}}, "combination_type"),
        ({**good, "models": [good["models"][0], good["models"][0]]}, "listed twice"),
        ({**good, "models": [{"model": str(tiny_zoo.experts["rev"])}]}, "not a LoRA adapter directory"),
        ({**good, "models": [{"model": str(tiny_zoo_adapters["rev"]), "parameters": {"weight": float("nan")}}]},
         "finite"),
        ({**good, "extra": 1}, "unknown key 'extra'"),
    ]
    for data, message in cases:
        with pytest.raises(AdapterError, match=message):
            load_peft_recipe(data, "bad.yaml")
    assert not (tmp_path / "merged").exists()


def test_merge_lora_command_runs_the_compatibility_mode(tiny_zoo, tiny_zoo_adapters, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from evomerge.cli import app

    recipe = tmp_path / "peft.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_zoo, tiny_zoo_adapters, "dare_linear")))
    res = CliRunner().invoke(app, ["merge-lora", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    reference = _peft_reference(tiny_zoo, tiny_zoo_adapters, "dare_linear", {"density": 0.5})
    assert all(torch.equal(written[k], reference[k]) for k in reference)
    res = CliRunner().invoke(app, ["merge-lora", str(recipe), str(tmp_path / "out2"), "--rank", "4"])
    assert res.exit_code == 2 and "svd_rank" in res.output and not (tmp_path / "out2").exists()
