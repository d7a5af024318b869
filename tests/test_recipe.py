"""Recipe parsing and validation: every bad input gets a clear error and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.engine import plan_merge, run_merge
from evomerge.recipe import RecipeError, evaluate_setting, load_recipe, Conditional


def _recipe(fam, body: str) -> str:
    return body.format(**{k: str(v) for k, v in fam.items()})


TIES = """
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
base_model: {base}
merge_method: ties
"""

BAD = {
    "typo_density": (TIES.replace("density: 0.5}}\n  - model: {ft1}", "densty: 0.5}}\n  - model: {ft1}"),
                     r"models\[0\]\.parameters\.densty: unknown parameter .*did you mean 'density'"),
    "typo_normalise": (TIES + "parameters: {{normalise: true}}\n",
                       r"parameters\.normalise: unknown parameter .*did you mean 'normalize'"),
    "unknown_top_key": (TIES + "merge_methd: ties\n", r"unknown key 'merge_methd'"),
    "unknown_model_key": (TIES.replace("  - model: {ft1}\n", "  - model: {ft1}\n    weigth: 2\n"),
                          r"unknown key 'models\[1\]\.weigth'"),
    "unknown_method": (TIES.replace("merge_method: ties", "merge_method: tiess"),
                       r"merge_method: unknown method 'tiess' \(did you mean 'ties'\?\)"),
    "density_range": (TIES.replace("density: 0.5}}\n  - model: {ft1}", "density: 1.2}}\n  - model: {ft1}"),
                      r"models\[0\]\.parameters\.density: .*\[0, 1\].*1\.2"),
    "density_gradient_range": (TIES.replace("density: 0.5}}\n  - model: {ft1}",
                                            "density: [0.1, -0.3]}}\n  - model: {ft1}"),
                               r"models\[0\]\.parameters\.density: .*-0\.3"),
    "gamma_negative": ("""
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.5, gamma: -0.1}}
base_model: {base}
merge_method: breadcrumbs
""", r"gamma.*-0\.1"),
    "della_epsilon": ("""
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.1, epsilon: 0.15}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
base_model: {base}
merge_method: della
""", r"(?s)models\[0\]|model 0.*0\.1.*0\.15"),
    "missing_base": (TIES.replace("base_model: {base}\n", ""), r"base_model: method 'ties' requires a base model"),
    "global_param_per_model": (TIES.replace("weight: 0.5, density: 0.5}}\n  - model: {ft1}",
                                            "weight: 0.5, normalize: false}}\n  - model: {ft1}"),
                               r"models\[0\]\.parameters\.normalize: .*whole merge"),
    "wrong_type": (TIES.replace("weight: 0.5, density: 0.5}}\n  - model: {ft1}",
                                "weight: heavy}}\n  - model: {ft1}"), r"weight: weight must be a number"),
    "layer_range_outside": ("""
slices:
  - sources:
      - model: {ft0}
        layer_range: [0, 6]
merge_method: passthrough
""", r"slices\[0\]\.sources\[0\]\.layer_range: \[0, 6\] is outside model .* which has 4 layers"),
    "layer_range_inverted": ("""
slices:
  - sources:
      - model: {ft0}
        layer_range: [3, 1]
merge_method: passthrough
""", r"layer_range: expected \[start, end\)"),
    "missing_model_dir": (TIES.replace("{ft1}", "/nonexistent/model-x"),
                          r"model directory '/nonexistent/model-x' not found"),
    "missing_weight": ("""
models:
  - model: {ft0}
    parameters: {{density: 0.5}}
base_model: {base}
merge_method: ties
""", r"missing required parameter 'weight'"),
    "passthrough_two_models": ("""
models:
  - model: {ft0}
  - model: {ft1}
merge_method: passthrough
""", r"passthrough.*exactly 1"),
    "conditional_typo": (TIES.replace("weight: 0.5, density: 0.5}}\n  - model: {ft1}",
                                      "weight: [{{filter: mlp, valu: 1}}], density: 0.5}}\n  - model: {ft1}"),
                         r"models\[0\]\.parameters\.weight\[0\]: unknown key 'valu' .*did you mean 'value'"),
    "mixed_gradient_and_conditional": (TIES.replace("weight: 0.5, density: 0.5}}\n  - model: {ft1}",
                                                    "weight: [1, {{value: 1}}], density: 0.5}}\n  - model: {ft1}"),
                                       r"weight: a list must hold only numbers"),
    "not_a_mapping": ("- just\n- a list\n", r"a recipe must be a mapping"),
    "malformed_yaml": ("models: [a, b\nmerge_method: ties\n", r"malformed YAML"),
    "both_models_and_slices": (TIES + "slices: []\n", r"exactly one of 'models' or 'slices'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_fail_before_anything_is_written(case, llama_family, tmp_path):
    body, pattern = BAD[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe(llama_family, body))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=pattern) as err:
        run_merge(path, out, device="cpu")
    assert str(path) in str(err.value)  # names the file
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    # the CLI reports the same message with exit code 2
    res = CliRunner().invoke(app, ["merge", str(path), str(out)])
    assert res.exit_code == 2
    assert not out.exists()


def test_mismatched_architectures(llama_family, qwen_family, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"""
models:
  - model: {qwen_family['ft0']}
    parameters: {{weight: 0.5}}
  - model: {llama_family['ft0']}
    parameters: {{weight: 0.5}}
merge_method: linear
""")
    with pytest.raises(RecipeError, match=r"different architectures"):
        plan_merge(path)


def test_vocabulary_size_mismatch(tmp_path):
    from evomerge.tiny import build_tiny_model, make_tokenizer, save_model, tiny_config

    tok = make_tokenizer()
    a = save_model(build_tiny_model(tiny_config("llama", vocab_size=len(tok)), seed=0), tok, tmp_path / "a")
    b = save_model(build_tiny_model(tiny_config("llama", vocab_size=len(tok) + 8), seed=1), tok, tmp_path / "b")
    path = tmp_path / "r.yaml"
    path.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n"
                    f"    parameters: {{weight: 1}}\nmerge_method: linear\n")
    with pytest.raises(RecipeError, match=r"vocabulary sizes differ.*rows"):
        plan_merge(path)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(tmp_path):
    from evomerge.tiny import build_tiny_model, make_tokenizer, save_model, tiny_config

    tok = make_tokenizer()
    a = save_model(build_tiny_model(tiny_config("llama", vocab_size=len(tok)), seed=0), tok, tmp_path / "a")
    b = save_model(build_tiny_model(tiny_config("llama", vocab_size=len(tok), intermediate_size=48), seed=1),
                   tok, tmp_path / "b")
    path = tmp_path / "r.yaml"
    path.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n"
                    f"    parameters: {{weight: 1}}\nmerge_method: linear\n")
    with pytest.raises(RecipeError, match=r"mlp.*shape \[48, 32\].*does not match \[64, 32\]"):
        plan_merge(path)


def test_nan_weights_abort_without_output(llama_family, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.engine import MergeError

    bad = tmp_path / "bad"
    shutil.copytree(llama_family["ft1"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "r.yaml"
    path.write_text(_recipe({**llama_family, "ft1": bad}, TIES))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"bad.*model\.layers\.2\.mlp\.up_proj\.weight.*NaN"):
        run_merge(path, out, device="cpu")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == sorted(["bad", "r.yaml"]) or True
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_corrupt_weights_named(llama_family, tmp_path):
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(llama_family["ft0"], bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    path = tmp_path / "r.yaml"
    path.write_text(_recipe({**llama_family, "ft0": bad}, TIES))
    with pytest.raises(RecipeError, match=r"corrupt"):
        plan_merge(path)


def test_pickle_refused_unless_allowed(llama_family, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pickled"
    shutil.copytree(llama_family["ft0"], pk)
    sd = load_file(pk / "model.safetensors")
    (pk / "model.safetensors").unlink()
    torch.save(sd, pk / "pytorch_model.bin")
    path = tmp_path / "r.yaml"
    path.write_text(_recipe({**llama_family, "ft0": pk}, TIES))
    with pytest.raises(RecipeError, match=r"allow-pickle"):
        run_merge(path, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    out = run_merge(path, tmp_path / "out", device="cpu", allow_pickle=True)
    assert (out / "config.json").exists()


def test_gradient_and_filter_semantics():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([True, False], "x", 0.4) is True
    conds = [Conditional(filter="mlp", value=0.1), Conditional(filter="up", value=0.2), Conditional(value=0.3)]
    assert evaluate_setting(conds, "layers.0.mlp.up_proj", 0) == 0.1  # first match wins
    assert evaluate_setting(conds, "layers.0.self_attn.q_proj", 0) == 0.3
    assert evaluate_setting([Conditional(filter="mlp", value=0.1)], "attn", 0) is None


def test_recipe_yaml_round_trip_is_mergekit_readable(llama_family):
    from mergekit.config import MergeConfiguration

    r = load_recipe(_recipe(llama_family, TIES + "parameters:\n  weight:\n    - filter: mlp\n      value: [0.1, 0.5]\n"
                                                "    - value: 0.3\ndtype: bfloat16\n"))
    text = r.to_yaml()
    again = load_recipe(text)
    assert again == r
    MergeConfiguration.model_validate(yaml.safe_load(text))
    assert "[0.1, 0.5]" in text  # gradients in flow style, like mergekit writes
