"""Data-flow search (evolutionary frankenmerges): the space, the in-memory builder and the search."""

from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import read_weights
from evomerge.engine import run_merge
from evomerge.search.dataflow_builder import DataflowBuilder
from evomerge.search.dataflow_space import InfeasibleFlow, Step, flow_recipe
from evomerge.search.space import SpaceError, load_space

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])  # longer than the sliding window below


def _space(base, models, **extra):
    data = {"kind": "dataflow", "layers": {"min": 2, "max": 8}, "slice_length": {"min": 1, "max": 2}, **extra}
    return load_space(data, where="space.yaml").bind(str(base), {k: str(v) for k, v in models.items()}, "space.yaml")


@pytest.fixture(scope="module")
def sliding_qwen(tmp_path_factory):
    """A tiny Qwen2 base and one fine-tune whose layers 1 and 2 use sliding-window attention (window 4)."""
    from transformers import Qwen2Config

    from evomerge.tiny import build_tiny_model, make_tokenizer, perturbed_copy, save_model, tiny_config

    root = tmp_path_factory.mktemp("qwen_sliding")
    tok = make_tokenizer()
    data = tiny_config("qwen2", vocab_size=len(tok), num_layers=3).to_dict()
    data.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    data.pop("layer_types", None)
    base = build_tiny_model(Qwen2Config.from_dict(data), seed=3)
    assert base.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    return {"base": save_model(base, tok, root / "base"), "ft0": save_model(perturbed_copy(base, 7), tok, root / "ft0")}


def _flows(n_layers: int):
    """Flows over sources base/ft0 of ``n_layers`` layers: unscaled, scaled, with a repeated layer."""
    return {
        "reorder": [Step("ft0", 1, n_layers), Step("base", 0, 2)],
        "scaled": [Step("ft0", 0, 2, 0.75), Step("base", 1, n_layers, 1.25)],
        "repeat": [Step("base", 0, 2), Step("base", 1, 2, 0.5), Step("ft0", 1, n_layers)],  # layer 1 twice
    }


@pytest.mark.parametrize("family", ["llama_family", "qwen_family", "sliding_qwen"])
def test_candidate_equals_the_exported_recipes_merge_bit_for_bit(family, request, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = request.getfixturevalue(family)
    paths = {"base": str(fam["base"]), "ft0": str(fam["ft0"])}
    builder = DataflowBuilder(paths["base"], paths, device="cpu")
    n = builder.num_layers
    for label, steps in _flows(n).items():
        recipe = flow_recipe(steps, paths, base_model=paths["base"], dtype="float32")
        builder.build(recipe)
        live = builder.model
        with torch.no_grad():
            live_logits = live(IDS).logits
        out = run_merge(recipe, tmp_path / label, device="cpu")
        disk = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        total = sum(s.length for s in steps)
        assert disk.config.num_hidden_layers == total == len(live.model.layers), label
        with torch.no_grad():
            assert torch.equal(live_logits, disk(IDS).logits), f"{family} {label}"
        assert disk.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
        # per-layer attributes rebuilt for the new positions: KV-cache index and attention kind by origin
        assert [layer.self_attn.layer_idx for layer in live.model.layers] == list(range(total))
        src_types = getattr(builder.base.config, "layer_types", None)
        if src_types is not None:
            want = [src_types[i] for s in steps for i in range(s.start, s.end)]
            assert live.config.layer_types == want == disk.config.layer_types
        # unscaled layers are the resident tensors themselves; scaled ones have their own
        first = steps[0]
        o_proj = live.model.layers[0].self_attn.o_proj.weight
        resident = builder.resident[paths[first.source]].model.layers[first.start].self_attn.o_proj.weight
        assert (o_proj is resident) == (first.scale == 1.0)
        assert live.model.layers[0].self_attn.q_proj.weight is \
            builder.resident[paths[first.source]].model.layers[first.start].self_attn.q_proj.weight


def test_sliding_layers_keep_their_window_where_they_land(sliding_qwen):
    paths = {"base": str(sliding_qwen["base"]), "ft0": str(sliding_qwen["ft0"])}
    builder = DataflowBuilder(paths["base"], paths, device="cpu")
    builder.build(flow_recipe([Step("ft0", 2, 3), Step("base", 0, 1), Step("base", 0, 1)], paths,
                              base_model=paths["base"], dtype="float32"))
    assert [layer.self_attn.sliding_window for layer in builder.model.model.layers] == [4, None, None]


@pytest.mark.parametrize("family", ["llama_family", "qwen_family"])
def test_identity_flow_reproduces_the_base_models_logits(family, request):
    fam = request.getfixturevalue(family)
    space = _space(fam["base"], {"ft0": fam["ft0"]})
    point = space.default_point()
    builder = DataflowBuilder(str(fam["base"]), space.source_paths(), device="cpu")
    builder.build(space.to_recipe(point, dtype="float32"))
    assert sum(s.length for s in space.decode(point)) == builder.num_layers
    with torch.no_grad():
        assert torch.equal(builder.model(IDS).logits, builder.base(IDS).logits)


def test_mergekit_runs_the_exported_scaled_recipe_to_the_same_tensors(llama_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    paths = {"base": str(llama_family["base"]), "ft0": str(llama_family["ft0"])}
    recipe = flow_recipe(_flows(4)["repeat"], paths, base_model=paths["base"], dtype="float32")
    ours = read_weights(run_merge(recipe, tmp_path / "ours", device="cpu"))
    mk_run(MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml())), str(tmp_path / "mk"),
           MergeOptions(quiet=True))
    theirs = read_weights(tmp_path / "mk")
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("repeat", [True, False])
def test_every_point_decodes_within_the_constraints(llama_family, repeat):
    space = _space(llama_family["base"], {"ft0": llama_family["ft0"], "ft1": llama_family["ft1"]},
                   layers={"min": 3, "max": 7}, slice_length={"min": 2, "max": 3}, repeat=repeat,
                   scale={"low": 0.5, "high": 1.5, "default": 1.0}, sources={"base": None, "ft0": [1, 4], "ft1": None})
    dists = space.distributions()
    gen = torch.Generator().manual_seed(0)
    decoded = infeasible = 0
    for _ in range(300):
        point = {k: d.low + (d.high - d.low) * torch.rand(1, generator=gen).item() for k, d in dists.items()}
        try:
            steps = space.decode(point)
        except InfeasibleFlow:
            infeasible += 1
            continue
        decoded += 1
        assert 3 <= sum(s.length for s in steps) <= 7
        assert all(2 <= s.length <= 3 and 0.5 <= s.scale <= 1.5 for s in steps)
        assert all(s.start >= 1 for s in steps if s.source == "ft0")
        cells = [(s.source, i) for s in steps for i in range(s.start, s.end)]
        if not repeat:
            assert len(cells) == len(set(cells))
    assert decoded > 250 and (repeat or infeasible < 50)


def test_default_and_anchor_points_are_each_sources_identity_flow(llama_family):
    space = _space(llama_family["base"], {"ft0": llama_family["ft0"]})
    anchors = [space.decode(p) for p in space.anchor_points()]
    assert anchors == [[Step("base", 0, 2), Step("base", 2, 4)], [Step("ft0", 0, 2), Step("ft0", 2, 4)]]
    assert set(space.distributions()) == {f"{p}[s{k}]" for k in range(8) for p in ("use", "source", "length",
                                                                                   "start")}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny Llama with hidden size 48 (its layers cannot follow the 32-wide family's)."""
    from evomerge.tiny import build_tiny_family

    base, _ = build_tiny_family(tmp_path_factory.mktemp("wide"), n_finetunes=0, hidden_size=48, num_layers=2)
    return base


@pytest.mark.parametrize("extra, pattern", [
    ({"sources": {"base": None, "ft0": [2, 6]}}, r"sources\.ft0: layer range \[2, 6\] is outside model 'ft0', "
                                                r"which has 4 layers"),
    ({"sources": ["base", "math"]}, r"sources: unknown model 'math'"),
    ({"layers": {"min": 20, "max": 30}, "slots": 3}, r"layers\.min \(20\) cannot be reached"),
    ({"layers": {"min": 5, "max": 3}}, r"min \(5\) must not exceed max \(3\)"),
    ({"slice_length": {"min": 6}}, r"slice_length\.min \(6\) exceeds the longest allowed source range"),
    ({"layrs": {"min": 1}}, r"unknown key 'layrs'"),
    ({"sources": ["base", "wide"]}, r"models 'base' and 'wide' cannot share a data flow: hidden_size is 32 in "
                                    r"'base' and 48 in 'wide'"),
])
def test_bad_spaces_fail_before_any_weight_is_read(llama_family, wide_model, extra, pattern, monkeypatch):
    import evomerge.checkpoint as ck

    monkeypatch.setattr(ck.ModelReader, "get_tensor", lambda *a, **k: pytest.fail("a weight was read"))
    extra = {"sources": ["base", "ft0"], **extra}
    with pytest.raises(SpaceError, match=pattern) as err:
        _space(llama_family["base"], {"ft0": llama_family["ft0"], "wide": wide_model}, **extra)
    assert "space.yaml" in str(err.value)


# --------------------------------------------------------------------------------------- the search
@pytest.fixture(scope="module")
def dataflow_run(tiny_zoo, tmp_path_factory):
    """A short CMA-ES data-flow search on the tiny zoo, finalized with its checkpoint."""
    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    tmp = tmp_path_factory.mktemp("dataflow_search")
    cfg = {"name": "df", "base_model": str(tiny_zoo.base), "models": {k: str(v) for k, v in tiny_zoo.experts.items()},
           "tasks": str(tiny_zoo.tasks_yaml), "search_space": str(SPACES / "dataflow_tiny.yaml"),
           "budget": {"trials": 10}, "sampler": {"name": "cmaes"}, "pruner": {"name": "none"},
           "output_dir": str(tmp / "run"), "device": "cpu", "top_k": 2}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = SearchRun(load_config(tmp / "run.yaml"))
    run.run()
    return run, finalize(run, log=lambda m: None)


def test_dataflow_search_beats_its_first_trial(dataflow_run):
    import optuna

    run, summary = dataflow_run
    trials = run.study.get_trials(deepcopy=False)
    assert trials[0].user_attrs.get("default") is True  # the base's identity flow
    assert "layer_range: [0, 2]" in trials[0].user_attrs["recipe"]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 10
    assert max(t.value for t in complete) > trials[0].value


def test_dataflow_search_exports_a_slices_recipe_and_a_checkpoint_that_loads(dataflow_run):
    from transformers import AutoModelForCausalLM

    from evomerge.recipe import load_recipe

    run, summary = dataflow_run
    recipe = load_recipe((run.out / "best_recipe.yaml").read_text())
    assert recipe.merge_method == "passthrough" and recipe.slices
    layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
    model = AutoModelForCausalLM.from_pretrained(run.out / "merged", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == layers
    run.builder.build(recipe)
    with torch.no_grad():
        assert torch.equal(run.builder.model(IDS).logits, model(IDS).logits)
    assert model.generate(IDS, max_new_tokens=2, do_sample=False).shape[1] == IDS.shape[1] + 2
    labels = [r.label for r in summary.rows]
    assert labels[0].startswith("winner") and "identity flow of the base (first trial)" in labels and "base" in labels



def test_a_recipe_scored_before_is_told_its_scores_again_and_is_no_second_finalist(dataflow_run):
    """Data-flow points often decode to the same flow: the loop tells a repeat the first one's scores."""
    from evomerge.search.run import best_trials, recipe_key

    run, _ = dataflow_run
    first = run.study.get_trials(deepcopy=False)[0]
    run.study.enqueue_trial(run.default_point)  # the base's identity flow again (this runs after the tests above)
    record = run.run_trial(run.study.ask(run.distributions))
    assert record.state == "COMPLETE" and record.value == first.value and record.reason == "same as #0"
    assert record.build_s == record.eval_s == 0.0
    keys = [recipe_key(t.user_attrs["recipe"]) for t in best_trials(run.study, 100)]
    assert len(keys) == len(set(keys)) and len(keys) < len(run.study.get_trials(deepcopy=False))

def test_combined_run_from_one_config_writes_both_stages_into_one_report(tiny_zoo, tmp_path):
    """`evomerge search` with a `dataflow:` section: a parameter-space search, then a data-flow search whose
    sources include its winner; the first stage's summary.md holds both test tables."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    cfg = {"name": "cb", "base_model": str(tiny_zoo.base), "models": {k: str(v) for k, v in tiny_zoo.experts.items()},
           "tasks": str(tiny_zoo.tasks_yaml), "search_space": str(SPACES / "ties_per_model.yaml"),
           "budget": {"trials": 3}, "sampler": {"name": "random"}, "pruner": {"name": "none"}, "start": "default",
           "output_dir": str(tmp_path / "run"), "device": "cpu", "top_k": 1,
           "dataflow": {"search_space": str(SPACES / "dataflow_tiny.yaml"), "budget": {"trials": 4}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["search", str(tmp_path / "run.yaml")])
    assert res.exit_code == 0, res.output
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## Stage 2: data-flow search over this winner (`dataflow/`)" in summary
    first, second = summary.split("## Stage 2")
    assert "| winner (trial" in first and "| fine-tune: merged |" in second and "| identity flow of the base" in second
    assert 'id="dataflow-test"' in (tmp_path / "run" / "report.html").read_text()
    recipe = yaml.safe_load((tmp_path / "run" / "dataflow" / "best_recipe.yaml").read_text())
    assert recipe["merge_method"] == "passthrough" and recipe["slices"]
    stage2 = yaml.safe_load((tmp_path / "run" / "dataflow" / "run_config.yaml").read_text())
    assert stage2["models"]["merged"] == str(tmp_path / "run" / "merged")
    # the same command again: both budgets spent and both stages finalized, so nothing is redone
    again = CliRunner().invoke(app, ["search", str(tmp_path / "run.yaml")])
    assert again.exit_code == 0, again.output
    assert again.output.count("finalize: already done") == 2
    assert (tmp_path / "run" / "summary.md").read_text() == summary


@pytest.mark.parametrize("extra, pattern", [
    ({"export_checkpoint": False}, r"dataflow: searches over the first stage's exported winner"),
    ({"dataflow": {"search_space": "x.yaml", "budjet": {"trials": 3}}}, r"unknown key 'dataflow\.budjet'"),
])
def test_bad_combined_configs(tmp_path, extra, pattern):
    from evomerge.search.config import ConfigError, load_config

    data = {"zoo": {"size": "tiny"}, "search_space": "x.yaml", "dataflow": {"search_space": "df.yaml"}, **extra}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=pattern):
        load_config(tmp_path / "run.yaml")
