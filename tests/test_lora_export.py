"""Merging LoRA adapters into one adapter: exact cat, QR + SVD re-factorisation, reload through PEFT."""

import json

import pytest
import torch

from evomerge.engine import run_merge
from evomerge.lora import AdapterError
from evomerge.lora.export import merge_to_adapter
from evomerge.lora.factor import concatenate, truncate
from evomerge.tiny import build_tiny_adapter

IDS = torch.tensor([[2, 10, 20, 30, 40, 50, 5]])


@pytest.fixture(scope="module")
def pair(llama_family, tmp_path_factory):
    """Two adapters of different ranks, modules and scalings (rsLoRA + rank_pattern on the first)."""
    root, base = tmp_path_factory.mktemp("lora_pair"), llama_family["base"]
    a = build_tiny_adapter(base, root / "a", seed=3, r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 3})
    b = build_tiny_adapter(base, root / "b", seed=4, r=2, lora_alpha=2, target_modules=["v_proj", "gate_proj"])
    dora = build_tiny_adapter(base, root / "dora", seed=5, r=2, lora_alpha=2, use_dora=True, target_modules=["k_proj"])
    return base, a, b, dora


def _recipe(base, models, method="task_arithmetic"):
    return {"merge_method": method, "base_model": str(base), "parameters": {"weight": 0.0},
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in models]}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _with_adapter(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@pytest.mark.parametrize("method, weights", [("task_arithmetic", (0.7, -0.3)), ("linear", (0.6, 0.4))])
def test_cat_adapter_reloads_to_the_full_merge(pair, tmp_path, method, weights):
    from transformers import AutoModelForCausalLM

    base, a, b, _ = pair
    recipe = _recipe(base, [(a, weights[0]), (b, weights[1])], method)
    report = merge_to_adapter(recipe, tmp_path / "adapter")
    full = run_merge(recipe, tmp_path / "full", device="cpu")
    expected = _logits(AutoModelForCausalLM.from_pretrained(full).eval())
    peft_model = _with_adapter(base, report.path)
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(peft_model.merge_and_unload()), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((report.path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"] and not config["use_dora"]
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 5  # 3 (rank_pattern) + 2
    assert max(report.discarded.values()) == 0.0
    assert set(config["rank_pattern"]) and config["alpha_pattern"] == config["rank_pattern"]


def test_truncated_adapter_equals_peft_svd(pair, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base, _, b, _ = pair
    c = build_tiny_adapter(base, tmp_path / "c", seed=6, r=4, lora_alpha=4, target_modules=["v_proj", "gate_proj"])
    weights = [1.0, 0.5]
    report = merge_to_adapter(_recipe(base, [(b, weights[0]), (c, weights[1])]), tmp_path / "ours", rank=3)
    ours = _with_adapter(base, report.path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), b, adapter_name="b")
    model.load_adapter(c, adapter_name="c")
    model.add_weighted_adapter(["b", "c"], weights, "svd", combination_type="svd", svd_rank=3)
    peft_layers = dict(model.base_model.model.named_modules())
    compared = 0
    for name, layer in ours.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            mine, theirs = layer.get_delta_weight("default"), peft_layers[name].get_delta_weight("svd")
            assert (mine - theirs).norm() / theirs.norm() < 1e-4, name
            assert report.ranks[name] == 3 and 0 < report.discarded[name] < 1
            compared += 1
    assert compared == 8


def test_truncate_reports_the_discarded_energy():
    gen = torch.Generator().manual_seed(0)
    terms = [(0.8, torch.randn(40, 6, generator=gen), torch.randn(6, 30, generator=gen)),
             (-1.5, torch.randn(40, 4, generator=gen), torch.randn(4, 30, generator=gen))]
    full = concatenate(terms)
    dense = sum(c * bi @ ai for c, bi, ai in terms)
    torch.testing.assert_close(full.b @ full.a, dense, rtol=1e-5, atol=1e-5)
    cut = truncate(full, 5)
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(cut.b @ cut.a, best, rtol=1e-4, atol=1e-4)
    assert cut.discarded == pytest.approx(float((dense - best).norm() ** 2 / dense.norm() ** 2), rel=1e-4)
    assert truncate(full, 10) is full


def test_weight_zero_drops_an_adapter(pair, tmp_path):
    base, a, b, _ = pair
    report = merge_to_adapter(_recipe(base, [(a, 1.0), (b, 0.0)]), tmp_path / "out")
    assert not any("gate_proj" in m for m in report.ranks)
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 3


@pytest.mark.parametrize("which, method, message", [
    ("dora", "task_arithmetic", "DoRA"),
    ("b", "ties", "not a linear combination"),
])
def test_unrepresentable_merges_are_refused(pair, tmp_path, which, method, message):
    base, a, b, dora = pair
    other = {"dora": dora, "b": b}[which]
    recipe = _recipe(base, [(a, 1.0), (other, 0.5)], method)
    if method == "ties":
        recipe["parameters"]["density"] = 0.5
    with pytest.raises(AdapterError, match=message):
        merge_to_adapter(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_full_models_are_refused(pair, llama_family, tmp_path):
    base, a, _, _ = pair
    with pytest.raises(AdapterError, match="is a full model"):
        merge_to_adapter(_recipe(base, [(a, 1.0), (llama_family["ft0"], 0.5)]), tmp_path / "out")


def test_merge_lora_cli(pair, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from evomerge.cli import app

    base, a, b, _ = pair
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(base, [(a, 1.0), (b, 1.0)])))
    result = CliRunner().invoke(app, ["merge-lora", str(recipe), str(tmp_path / "out"), "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "largest discarded energy fraction" in result.output
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    again = CliRunner().invoke(app, ["merge-lora", str(recipe), str(tmp_path / "out")])
    assert again.exit_code == 2 and "exists" in again.output


def test_sparse_merge_factorised_to_a_rank(pair, tmp_path):
    """TIES of adapters: the engine's merged update per module, by (randomised) SVD; exact at full rank."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from evomerge.engine import iter_merged, plan_merge
    from tests.conftest import read_weights

    base, a, b, dora = pair
    recipe = _recipe(base, [(a, 1.0), (b, 0.8), (dora, 0.5)], "ties")
    recipe["parameters"]["density"] = 0.4
    full = run_merge(recipe, tmp_path / "full", device="cpu")
    exact = merge_to_adapter(recipe, tmp_path / "exact", rank=64)  # >= every module's smaller dimension
    assert max(exact.discarded.values()) < 1e-5
    expected = _logits(AutoModelForCausalLM.from_pretrained(full).eval())
    torch.testing.assert_close(_logits(_with_adapter(base, exact.path)), expected, rtol=1e-4, atol=1e-4)

    cut = merge_to_adapter(recipe, tmp_path / "cut", rank=4)
    merged, base_w = dict(iter_merged(plan_merge(recipe), device="cpu")), read_weights(base)
    model = _with_adapter(base, cut.path)
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and name != "model.embed_tokens":
            delta = merged[f"{name}.weight"] - base_w[f"{name}.weight"]
            lost = float((delta - layer.get_delta_weight("default")).square().sum() / delta.square().sum())
            assert cut.discarded[name] == pytest.approx(lost, abs=1e-4), name
    assert max(cut.discarded.values()) > 0.05
    with pytest.raises(AdapterError, match="give a rank"):
        merge_to_adapter(recipe, tmp_path / "norank")


def test_nan_factors_and_duplicate_adapters(pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.engine import MergeError

    base, a, b, _ = pair
    bad = tmp_path / "nan"
    shutil.copytree(b, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN"):
        merge_to_adapter(_recipe(base, [(a, 1.0), (bad, 1.0)]), tmp_path / "out")
    with pytest.raises(MergeError, match="NaN"):
        run_merge(_recipe(base, [(a, 1.0), (bad, 1.0)]), tmp_path / "full", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]
