"""LoRA adapters as merge sources: exact against PEFT, through every method, refused when unusable."""

import json
import shutil
import warnings

import pytest
import torch

from evomerge.checkpoint import ModelReader
from evomerge.engine import iter_merged, plan_merge, run_merge
from evomerge.lora import AdapterReader, read_adapter
from evomerge.recipe import RecipeError
from evomerge.tiny import build_tiny_adapter
from tests.conftest import read_weights

ATTN = ["q_proj", "v_proj"]
ADAPTERS = {  # name -> (family, LoraConfig keywords)
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=ATTN)),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=ATTN + ["down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16})),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "up_proj"])),
    "embed_save": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                 modules_to_save=["lm_head"])),
    "lora_bias": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["k_proj", "q_proj"], lora_bias=True)),
}


@pytest.fixture(scope="module")
def adapters(llama_family, qwen_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    bases = {"llama": llama_family["base"], "qwen2": qwen_family["base"]}
    out = {}
    for i, (name, (family, cfg)) in enumerate(ADAPTERS.items()):
        out[name] = (bases[family], build_tiny_adapter(bases[family], root / name, seed=i + 1, **cfg))
    out["second"] = (bases["llama"], build_tiny_adapter(bases["llama"], root / "second", seed=9, r=2, lora_alpha=2,
                                                        target_modules=["v_proj", "gate_proj"]))
    return out


def _logits(model):
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 5]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_merged(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_identity_merge_equals_peft_merge_and_unload(adapters, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = adapters[kind]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    out = run_merge(recipe, tmp_path / "merged", device="cpu")
    ours = _logits(AutoModelForCausalLM.from_pretrained(out).eval())
    reference = _logits(_peft_merged(base, adapter))
    untouched = _logits(AutoModelForCausalLM.from_pretrained(base).eval())
    assert (reference - untouched).abs().max() > 1e-2  # the adapter does change the model
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def _peft_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """Σ-ready ΔW of every adapted weight, from PEFT's own get_delta_weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out[f"{name}.weight"] = module.get_delta_weight("default").detach()
    return out


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_two_adapters_sum_their_deltas(adapters, llama_family, method):
    base = llama_family["base"]
    (_, a), (_, b) = adapters["rslora"], adapters["second"]
    weights = (0.7, -0.3) if method == "task_arithmetic" else (0.75, 0.25)
    recipe = {"merge_method": method, "base_model": str(base), "parameters": {"weight": 0.0},  # linear: base's
              "models": [{"model": str(a), "parameters": {"weight": weights[0]}},
                         {"model": f"{base}+{b}", "parameters": {"weight": weights[1]}}]}
    merged = dict(iter_merged(plan_merge(recipe), device="cpu"))
    base_w = read_weights(base)
    deltas = [_peft_deltas(base, a), _peft_deltas(base, b)]
    changed = set(deltas[0]) | set(deltas[1])
    for name, tensor in merged.items():
        expected = base_w[name].clone()
        for w, d in zip(weights, deltas):
            if name in d:
                expected += w * d[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert changed and changed <= set(merged)


def test_weight_zero_excludes_an_adapter(adapters, llama_family):
    base = str(llama_family["base"])
    (_, a), (_, b) = adapters["plain"], adapters["second"]

    def ties(models):
        recipe = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5},
                  "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in models]}
        return dict(iter_merged(plan_merge(recipe), device="cpu"))

    alone, with_zero = ties([(a, 1.0)]), ties([(a, 1.0), (b, 0.0)])
    for name in alone:
        assert torch.equal(alone[name], with_zero[name]), name


def test_builder_reads_adapters_like_the_engine(adapters, llama_family):
    from evomerge.recipe import load_recipe
    from evomerge.search.builder import CandidateBuilder

    base = str(llama_family["base"])
    a, b = str(adapters["plain"][1]), str(adapters["second"][1])
    builder = CandidateBuilder(base, {"a": a, "b": b}, method="dare_ties", device="cpu")
    recipe = load_recipe({"merge_method": "dare_ties", "base_model": base, "parameters": {"density": 0.6},
                          "models": [{"model": a, "parameters": {"weight": 0.8}},
                                     {"model": b, "parameters": {"weight": 0.5}}]})
    builder.build(recipe)
    engine = dict(iter_merged(plan_merge(recipe), device="cpu"))
    for name, tensor in engine.items():
        torch.testing.assert_close(builder.params[name].detach(), tensor, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input
def _copy(adapter, tmp_path, **config_changes):
    target = tmp_path / "changed"
    shutil.copytree(adapter, target)
    cfg = json.loads((target / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (target / "adapter_config.json").write_text(json.dumps(cfg))
    return target


@pytest.mark.parametrize("changes, message", [
    ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"r": 8}, "configuration gives r=8"),
    ({"use_dora": True}, "magnitude vector is missing"),
])
def test_unusable_adapter_configs_are_refused(adapters, llama_family, tmp_path, changes, message):
    bad = _copy(adapters["plain"][1], tmp_path, **changes)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]),
              "models": [{"model": str(bad)}]}
    with pytest.raises(RecipeError, match=message) as err:
        plan_merge(recipe)
    assert str(bad) in str(err.value)


def test_adapter_of_another_base_is_refused_before_reading(adapters, qwen_family, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(qwen_family["base"]),
              "models": [{"model": str(adapters["plain"][1])}]}
    with pytest.raises(RecipeError, match=r"q_proj.*another base|no tensor"):
        plan_merge(recipe)


def test_adapter_needs_a_declared_base(adapters, llama_family):
    recipe = {"merge_method": "linear", "models": [{"model": str(adapters["plain"][1]), "parameters": {"weight": 1}},
                                                   {"model": str(llama_family["ft0"]), "parameters": {"weight": 1}}]}
    with pytest.raises(RecipeError, match="declare the model it was trained on"):
        plan_merge(recipe)


def test_base_name_mismatch_warns(adapters, llama_family, tmp_path):
    other = _copy(adapters["plain"][1], tmp_path, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with pytest.warns(UserWarning, match="Llama-3.1-8B"):
        AdapterReader(ModelReader(llama_family["base"]), other)


def test_conflicting_modules_to_save_and_truncated_file(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    from evomerge.lora import AdapterError

    source = adapters["plain"][1]
    both = tmp_path / "both"
    shutil.copytree(source, both)
    tensors = load_file(both / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, both / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="both replaced whole"):
        read_adapter(both)
    cut = tmp_path / "cut"
    shutil.copytree(source, cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        read_adapter(cut)


def test_an_adapter_listed_twice_is_refused(adapters, llama_family):
    a = str(adapters["plain"][1])
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]),
              "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": a, "parameters": {"weight": 0.5}}]}
    with pytest.raises(RecipeError, match=r"models\[1\].*already models\[0\]"):
        plan_merge(recipe)


def test_mergekit_runs_the_base_plus_adapter_form_we_write(adapters, llama_family, tmp_path):
    """An adapter directory is written base+adapter into mergekit_config.yml; mergekit 0.1.5 merges that
    recipe (applying the adapter with PEFT first) to evomerge's tensors."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    base = str(llama_family["base"])
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": str(adapters["plain"][1]), "parameters": {"weight": 0.6}},
                         {"model": str(llama_family["ft0"]), "parameters": {"weight": 0.3}}]}
    out = run_merge(recipe, tmp_path / "ours", device="cpu")
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert written["models"][0]["model"] == f"{base}+{adapters['plain'][1]}"
    mk_run(MergeConfiguration.model_validate(written), str(tmp_path / "mk"),
           MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "cache")))
    theirs, ours = read_weights(tmp_path / "mk"), read_weights(out)
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
