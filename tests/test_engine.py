"""The merge engine against mergekit 0.1.5, tensor for tensor, through whole recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.engine import merge_in_memory, plan_merge, run_merge
from tests.conftest import read_weights

DETERMINISTIC_RECIPES = {
    "linear": """
models:
  - model: {ft0}
    parameters: {{weight: 0.7}}
  - model: {ft1}
    parameters: {{weight: [0.1, 0.9]}}
merge_method: linear
""",
    "linear_no_normalize_filters": """
models:
  - model: {ft0}
    parameters:
      weight:
        - filter: mlp
          value: 0.25
        - filter: self_attn
          value: [0.5, 1.0, 0.2]
        - value: 0.4
  - model: {ft1}
    parameters: {{weight: 0.6}}
merge_method: linear
parameters: {{normalize: false}}
""",
    "slerp_gradient": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft0}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "task_arithmetic_lambda": """
models:
  - model: {ft0}
    parameters: {{weight: 0.8}}
  - model: {ft1}
    parameters: {{weight: [0.2, 0.6]}}
base_model: {base}
merge_method: task_arithmetic
parameters: {{lambda: 0.7, normalize: true}}
""",
    "ties": """
models:
  - model: {ft0}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: [0.2, 0.9]}}
  - model: {ft2}
    parameters:
      weight: 0.3
      density:
        - filter: mlp
          value: 0.3
        - value: 0.7
base_model: {base}
merge_method: ties
""",
    "ties_int8_no_normalize": """
models:
  - model: {ft0}
    parameters: {{weight: 1.0, density: 0.4}}
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.6}}
base_model: {base}
merge_method: ties
parameters: {{normalize: false, int8_mask: true}}
""",
    "breadcrumbs": """
models:
  - model: {ft0}
    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.7}}
base_model: {base}
merge_method: breadcrumbs
""",
    "breadcrumbs_ties": """
models:
  - model: {ft0}
    parameters: {{weight: 0.6, density: 0.8, gamma: 0.02}}
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.5, gamma: 0.1}}
base_model: {base}
merge_method: breadcrumbs_ties
parameters: {{normalize: true}}
""",
    "model_stock": """
models:
  - model: {ft0}
  - model: {ft1}
  - model: {ft2}
base_model: {base}
merge_method: model_stock
""",
    "passthrough_frankenmerge": """
slices:
  - sources:
      - model: {ft0}
        layer_range: [0, 3]
  - sources:
      - model: {ft1}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
  - sources:
      - model: {base}
        layer_range: [3, 4]
merge_method: passthrough
""",
    "ties_multi_slice_precedence": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {ft0}
        layer_range: [0, 2]
        parameters: {{weight: 0.9}}
      - model: {ft1}
        layer_range: [0, 2]
    parameters: {{weight: 0.3, density: 0.5}}
  - sources:
      - model: {base}
        layer_range: [2, 4]
      - model: {ft0}
        layer_range: [2, 4]
      - model: {ft1}
        layer_range: [2, 4]
        parameters: {{density: [0.9, 0.1]}}
base_model: {base}
merge_method: ties
parameters: {{weight: 0.5, density: 0.7}}
""",
}


def _write(tmp_path: Path, name: str, text: str, fam: dict) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text.format(**{k: str(v) for k, v in fam.items()}))
    return p


def _mergekit(recipe_path: Path, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    cfg = MergeConfiguration.model_validate(yaml.safe_load(recipe_path.read_text()))
    mk_run(cfg, str(out), MergeOptions(copy_tokenizer=True, quiet=True, random_seed=0))
    return read_weights(out)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_RECIPES))
def test_parity_with_mergekit(name, llama_family, tmp_path):
    recipe = _write(tmp_path, name, DETERMINISTIC_RECIPES[name], llama_family)
    ours = read_weights(run_merge(recipe, tmp_path / "ours", device="cpu"))
    theirs = _mergekit(recipe, tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        # exact for every method except where op order differs inside a kernel (slerp/model_stock)
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
    exact = {k for k in theirs if torch.equal(ours[k], theirs[k])}
    if name not in ("slerp_gradient", "model_stock"):
        assert exact == set(theirs), f"{name}: not bit-identical: {sorted(set(theirs) - exact)[:5]}"


def test_frankenmerge_config_and_generation(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _write(tmp_path, "fm", DETERMINISTIC_RECIPES["passthrough_frankenmerge"], llama_family)
    out = run_merge(recipe, tmp_path / "fm-out", device="cpu", out_shard_size="200KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 7
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("1 + 2 =", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    card = (out / "README.md").read_text()
    assert "passthrough" in card and str(llama_family["ft1"]) in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "passthrough"


def test_tied_embeddings_qwen2(qwen_family, tmp_path):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(f"""
models:
  - model: {qwen_family['ft0']}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {qwen_family['ft1']}
    parameters: {{weight: 0.5, density: 0.4}}
base_model: {qwen_family['base']}
merge_method: ties
""")
    ours = read_weights(run_merge(recipe, tmp_path / "ours", device="cpu"))
    theirs = _mergekit(recipe, tmp_path / "theirs")
    assert "lm_head.weight" not in ours
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_stochastic_methods_reproducible_by_seed(method, llama_family, tmp_path):
    eps = ", epsilon: 0.1" if "della" in method else ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
models:
  - model: {llama_family['ft0']}
    parameters: {{weight: 0.6, density: 0.5{eps}}}
  - model: {llama_family['ft1']}
    parameters: {{weight: 0.4, density: 0.3{eps}}}
base_model: {llama_family['base']}
merge_method: {method}
""")
    a = read_weights(run_merge(recipe, tmp_path / "a", device="cpu", seed=7))
    b = read_weights(run_merge(recipe, tmp_path / "b", device="cpu", seed=7))
    c = read_weights(run_merge(recipe, tmp_path / "c", device="cpu", seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() == 2)
    # the kept fraction of each model's delta is close to its density: look at one big matrix
    base = read_weights(llama_family["base"])
    key = "model.layers.1.mlp.up_proj.weight"
    changed = (a[key] != base[key]).float().mean().item()
    # P(at least one of two models kept) = 1 - 0.5*0.7 = 0.65 (sign election drops a few more)
    assert 0.45 < changed < 0.70


def test_in_memory_matches_file_path(llama_family, tmp_path):
    """merge_in_memory on state dicts gives the same tensors as the file-to-file engine."""
    text = DETERMINISTIC_RECIPES["ties"].format(base="base", ft0="ft0", ft1="ft1", ft2="ft2")
    sds = {k: read_weights(v) for k, v in llama_family.items()}
    merged = merge_in_memory(yaml.safe_load(text), sds, device="cpu")
    recipe = _write(tmp_path, "ties", DETERMINISTIC_RECIPES["ties"], llama_family)
    on_disk = read_weights(run_merge(recipe, tmp_path / "o", device="cpu"))
    assert sorted(merged) == sorted(on_disk)
    assert all(torch.equal(merged[k], on_disk[k]) for k in on_disk)


def test_dtype_and_out_dtype(llama_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
models:
  - model: {llama_family['ft0']}
    parameters: {{weight: 0.5}}
  - model: {llama_family['ft1']}
    parameters: {{weight: 0.5}}
base_model: {llama_family['base']}
merge_method: task_arithmetic
dtype: float32
out_dtype: bfloat16
""")
    out = run_merge(recipe, tmp_path / "o", device="cpu")
    w = read_weights(out)
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    import json
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dry_run_plan_reads_no_weights(llama_family, tmp_path, monkeypatch):
    from evomerge.checkpoint import ModelReader

    def boom(*a, **k):
        raise AssertionError("weights were read during planning")

    monkeypatch.setattr(ModelReader, "get_tensor", boom)
    recipe = _write(tmp_path, "ties", DETERMINISTIC_RECIPES["ties"], llama_family)
    plan = plan_merge(recipe)
    lines = [t.describe() for t in plan.tasks]
    q = [l for l in lines if l.startswith("model.layers.3.mlp.up_proj.weight")][0]
    # density gradient [0.2, 0.9] at the last layer (t = 1) is 0.9; ft2's mlp filter gives 0.3
    assert "density=0.9" in q and "density=0.3" in q
    e = [l for l in lines if l.startswith("model.embed_tokens.weight")][0]
    assert "density=0.2" in e and "density=0.7" in e  # t = 0 for embeddings; ft2 catch-all


def test_cli_merge_and_methods(llama_family, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    recipe = _write(tmp_path, "ties", DETERMINISTIC_RECIPES["ties"], llama_family)
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "config.json").exists()
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "ref"), "--device", "cpu", "--backend", "reference"])
    assert res.exit_code == 0, res.output
    assert read_weights(tmp_path / "ref").keys() == read_weights(tmp_path / "out").keys()
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "bad"), "--device", "cpu", "--backend", "numba"])
    assert res.exit_code == 2 and "backend must be one of" in res.output and not (tmp_path / "bad").exists()
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "dry"), "--dry-run"])
    assert res.exit_code == 0 and "model.layers.0.mlp.up_proj.weight" in res.output
    assert not (tmp_path / "dry").exists()
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "della" in res.output and "epsilon" in res.output


@pytest.fixture(scope="module")
def one_layer_family(tmp_path_factory):
    """A tiny Llama of one layer, so that its embedding and output head are giants (``giant_tasks``)."""
    from evomerge.tiny import build_tiny_family

    base, fts = build_tiny_family(tmp_path_factory.mktemp("one-layer"), n_finetunes=3, seed=4, num_layers=1)
    return {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}


@pytest.mark.parametrize("method", ["della", "ties", "dare_linear"])
def test_threaded_merge_with_giants_equals_reference(one_layer_family, tmp_path, method):
    """On two threads, with the giants merged first on their own thread, ``evomerge merge`` writes the
    reference kernels' bits."""
    from evomerge.engine import giant_tasks
    from evomerge.testing.recipes import variant_recipe

    recipe = {**variant_recipe(method, one_layer_family, flip=False), "dtype": "bfloat16"}
    plan = plan_merge(recipe)
    assert len(giant_tasks(plan.tasks)) == 2 and torch.get_num_threads() >= 2
    reference = read_weights(run_merge(recipe, tmp_path / "ref", device="cpu", seed=3, backend="reference"))
    threaded = read_weights(run_merge(recipe, tmp_path / "cpu", device="cpu", seed=3, backend="cpu"))
    bad = [k for k, v in reference.items() if not torch.equal(v, threaded[k])]
    assert reference.keys() == threaded.keys() and not bad, bad[:3]


@pytest.mark.parametrize("where", ["giant", "layer"])
def test_nan_input_stops_the_threaded_merge(one_layer_family, tmp_path, where):
    """A NaN in one input, in a giant tensor (merged first on its own thread) or in a layer, stops
    ``evomerge merge`` on two threads with an error naming the tensor, and leaves no output."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.engine import MergeError, giant_tasks
    from evomerge.testing.recipes import variant_recipe

    broken = tmp_path / "ft1"
    shutil.copytree(one_layer_family["ft1"], broken)
    recipe = variant_recipe("della", {**one_layer_family, "ft1": broken}, flip=False)
    plan = plan_merge(recipe)
    giants = [plan.tasks[i].name for i in giant_tasks(plan.tasks)]
    name = giants[-1] if where == "giant" else "model.layers.0.self_attn.q_proj.weight"
    shard = next(p for p in broken.glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    assert torch.get_num_threads() >= 2
    with pytest.raises(MergeError, match=name.replace(".", r"\.")):
        run_merge(recipe, tmp_path / "out", device="cpu", seed=3)
    assert not (tmp_path / "out").exists()
