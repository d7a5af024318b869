"""The demo zoo's LoRA experts (evomerge.zoo_adapters): real PEFT adapters on the zoo base, each better than the
base on its own task, retrained bit for bit, cached; a run config's ``zoo: {adapters: true}`` searches them and PEFT's
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


def test_adapters_are_cached_with_their_scores(tiny_zoo, adapters):
    import json

    from evomerge.zoo_adapters import MARKER_NAME, build_adapters

    weights = adapters["map"] / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_adapters(tiny_zoo) == adapters and weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    scores = json.loads((tiny_zoo.root / "adapters" / MARKER_NAME).read_text())["test_scores"]
    assert all(scores[name][name] > scores["base"][name] for name in adapters)


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
    weights_1 = [{"model": p, "parameters": {"weight": 1.0}} for p in inputs.models.values()]
    builder.build(load_recipe({"merge_method": "task_arithmetic", "base_model": inputs.base_model,
                               "models": weights_1}))
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        default = builder.model(input_ids=ids).logits
        merges = {label.split()[2]: model(input_ids=ids).logits.clone()
                  for label, model in peft_merged_models(inputs.base_model, inputs.models, torch.float32, "cpu")}
    assert set(merges) == {"cat", "ties"}
    torch.testing.assert_close(merges["cat"], default, rtol=1e-5, atol=1e-5)
    assert (merges["ties"] - default).abs().max() > 1e-2  # PEFT's TIES on factors is another merge


def test_zoo_build_command_trains_the_adapters_into_an_existing_zoo(tiny_zoo, adapters, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from evomerge.cli import app
    from evomerge.zoo_adapters import adapters_complete

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo.root, root, ignore=shutil.ignore_patterns("adapters"))
    args = ["zoo", "build", "--out", str(root), "--size", "tiny"]
    res = CliRunner().invoke(app, [*args, "--no-adapters"])
    assert res.exit_code == 0, res.output
    assert not (root / "adapters").exists()  # the cached zoo reused as it is
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    from evomerge.zoo import load_zoo

    zoo = load_zoo(root)
    assert adapters_complete(zoo)
    for name in adapters:  # the same training, bit for bit
        a, b = (load_file(p / "adapter_model.safetensors") for p in (zoo.adapters[name], adapters[name]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_regmean_over_adapters_calibrates_base_plus_adapter(tiny_zoo, adapters, tmp_path):
    """A data-aware method calibrates an adapter source as the base with the adapter merged in: its Gram
    statistics equal those of the merged checkpoint, and a RegMean recipe over the adapters runs end to end."""
    from peft import PeftModel

    from evomerge.calibration import Calibration, compute_model_statistics
    from evomerge.engine import run_merge
    from evomerge.search.baselines import baseline_recipe

    full = tmp_path / "map-full"
    PeftModel.from_pretrained(_base(tiny_zoo), adapters["map"]).merge_and_unload().save_pretrained(full)
    tiny_zoo.tokenizer().save_pretrained(full)
    texts = ["map: abc -> ", "map: hello world -> ", "map: xyz -> q"]
    cal = Calibration(examples=3)
    from_adapter = compute_model_statistics(adapters["map"], texts, cal, kind="gram", base_dir=tiny_zoo.base)
    from_full = compute_model_statistics(full, texts, cal, kind="gram")
    base_only = compute_model_statistics(tiny_zoo.base, texts, cal, kind="gram")
    assert from_adapter.keys() == from_full.keys()
    for k in from_full:
        torch.testing.assert_close(from_adapter[k], from_full[k], rtol=1e-5, atol=1e-5)
    assert any((from_adapter[k] - base_only[k]).abs().max() > 1e-4 for k in base_only)  # the adapter counts

    models = {name: str(p) for name, p in adapters.items()}
    recipe = baseline_recipe("regmean", str(tiny_zoo.base), models, tiny_zoo.tasks_yaml, list(adapters))
    run_merge(recipe, tmp_path / "merged", device="cpu")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
