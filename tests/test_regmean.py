"""RegMean: the closed form against least squares, Gram statistics from hooks, cache, recipes and errors.

FusionBench 0.2.33 cannot be imported without hydra, lightning and omegaconf, so the kernel is checked
against an independent derivation (a least-squares solve on the stacked inputs; explicit inverses for
α < 1). During development ``merging_with_regmean_weights`` from FusionBench was also run on the same
float64 tensors: max abs difference 4e-16 at α = 1 and 2e-8 at α = 0.6 (FusionBench builds its α mask
in float32), identical means for tensors without statistics.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.calibration import Calibration, gram_statistics
from evomerge.engine import StateDictReader, merge_in_memory, plan_merge, prepare_statistics, run_merge
from evomerge.methods import get_method, reduce_off_diagonal, regmean_diagonal, regmean_full
from evomerge.recipe import RecipeError, load_recipe
from tests.conftest import read_weights


def test_regmean_full_is_the_least_squares_merge():
    """α = 1: W minimizes Σᵢ ‖XᵢWᵀ − XᵢWᵢᵀ‖², solved here by lstsq on the stacked inputs."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(7, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x for x in xs]
    expected = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    torch.testing.assert_close(regmean_full(ws, grams, 1.0), expected, rtol=1e-9, atol=1e-10)
    # α < 1: the same closed form on the reduced Gram matrices, by explicit inverse
    reduced = [0.3 * gm + 0.7 * torch.diag(gm.diagonal()) for gm in grams]
    closed = sum(w @ r for w, r in zip(ws, reduced)) @ torch.linalg.inv(sum(reduced))
    torch.testing.assert_close(regmean_full(ws, grams, 0.3), closed, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(reduce_off_diagonal(grams[0], 0.3), reduced[0])
    # α = 0 is the diagonal approximation
    torch.testing.assert_close(regmean_full(ws, grams, 0.0), regmean_diagonal(ws, [gm.diagonal() for gm in grams]))


def test_regmean_weights_and_strength_for_a_search_on_top_of_it():
    """Per-model weights scale the Gram matrices (and the fallback mean); lambda moves along the merge's
    task vector from the base; the defaults are the paper's merge, bit for bit."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    base = torch.randn(5, 6, generator=g, dtype=torch.float64)
    grams = [x.T @ x for x in xs]
    method = get_method("regmean")

    def merge(weights, lam=1.0, with_base=True, tensors=ws, stats=grams):
        return method.merge(base=base if with_base else None, tensors=tensors, model_params=[{"weight": w} for w in weights],
                            params={"alpha": 0.8, "lambda": lam}, statistics=stats)

    assert torch.equal(merge([1.0, 1.0]), regmean_full(ws, grams, 0.8))
    torch.testing.assert_close(merge([1.0, 0.0]), ws[0])  # model 1 has no say: model 0's own weights
    closed = (2 * ws[0] @ reduce_off_diagonal(grams[0], 0.8) + ws[1] @ reduce_off_diagonal(grams[1], 0.8)) @ \
        torch.linalg.inv(2 * reduce_off_diagonal(grams[0], 0.8) + reduce_off_diagonal(grams[1], 0.8))
    torch.testing.assert_close(merge([2.0, 1.0]), closed)
    torch.testing.assert_close(merge([1.0, 1.0], lam=0.5), base + 0.5 * (regmean_full(ws, grams, 0.8) - base))
    assert torch.equal(merge([1.0, 1.0], lam=0.0), base)
    vectors = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])]  # no statistics: the weighted mean
    assert torch.equal(merge([3.0, 1.0], with_base=False, tensors=vectors, stats=[None, None]),
                       torch.tensor([1.5, 3.5]))
    with pytest.raises(ValueError, match="needs a base_model"):
        merge([1.0, 1.0], lam=0.5, with_base=False)
    with pytest.raises(ValueError, match="must not all be 0"):
        merge([0.0, 0.0])


def test_regmean_diagonal_and_fallbacks():
    ws = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 4.0, 5.0]])]
    diagonals = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 2.0, 0.0])]
    # column 0: (1·1 + 3·3)/4; column 1: model 1 only; column 2: never active -> plain mean
    assert torch.equal(regmean_diagonal(ws, diagonals), torch.tensor([[2.5, 4.0, 4.0]]))
    method = get_method("regmean")
    vectors = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])]
    assert torch.equal(method.merge(base=None, tensors=vectors, model_params=[{}, {}], params={},
                                    statistics=[None, None]), torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="needs calibration statistics for each input model"):
        method.merge(base=None, tensors=vectors, model_params=[{}, {}], params={})
    with pytest.raises(ValueError, match="statistics exist for some input models of this tensor but not all"):
        method.merge(base=None, tensors=ws, model_params=[{}, {}], params={}, statistics=[diagonals[0], None])
    with pytest.raises(ValueError, match="summed Gram matrix is singular"):
        regmean_full(ws, [torch.zeros(3, 3), torch.zeros(3, 3)], 1.0)
    assert method.check_params([{}, {}], {"alpha": 1.5}) == ["regmean: alpha must be in [0, 1], got 1.5"]
    assert not method.in_mergekit and method.calibration == "gram"


def write_tasks(folder):
    """A small native task over the tiny tokenizer's words, with search and train examples."""
    rows = [{"question": f"{a} + {b}", "answer": str(a + b)} for a in range(8) for b in range(6)]
    lines = "\n".join(json.dumps(r) for r in rows)
    (folder / "add.jsonl").write_text(lines + "\n")
    (folder / "tasks.yaml").write_text(
        "tasks:\n  - name: add\n    kind: generate\n    data: add.jsonl\n    prompt: 'Q : {question} = A :'\n"
        "    target: ' {answer}'\n"
        "  - name: echo\n    kind: generate\n    data: add.jsonl\n    prompt: '{question} is'\n    target: ' {answer}'\n")
    return folder / "tasks.yaml"


def test_gram_statistics_are_the_mean_input_gram_without_padding(llama_family):
    model = AutoModelForCausalLM.from_pretrained(llama_family["ft0"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_family["ft0"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = ["Q : 1 + 2 = A : 3", "4 is 4", "Q : 7 + 5 = A : 12 and the 9"]
    batched = gram_statistics(model, tokenizer, texts, diagonal=False, max_length=64, batch_size=3)
    single = gram_statistics(model, tokenizer, texts, diagonal=False, max_length=64, batch_size=1)
    diagonal = gram_statistics(model, tokenizer, texts, diagonal=True, max_length=64)
    name = "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():  # q_proj of layer 0 sees the normalized token embeddings
        rows = [model.model.layers[0].input_layernorm(model.model.embed_tokens(tokenizer(t, return_tensors="pt")
                                                                               ["input_ids"]))[0] for t in texts]
    x = torch.cat(rows)
    expected = x.T @ x / x.shape[0]
    torch.testing.assert_close(batched[name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single[name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diagonal[name], expected.diagonal(), rtol=1e-5, atol=1e-6)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(batched) == linear and "lm_head.weight" in linear


def regmean_recipe(family, tasks, **calibration):
    return {"merge_method": "regmean", "models": [{"model": str(family["ft0"])}, {"model": str(family["ft1"])}],
            "parameters": {"alpha": 0.8},
            "calibration": {"tasks": str(tasks), "split": "search", "examples": 6, **calibration}}


def test_regmean_recipe_merges_with_cached_statistics(llama_family, tmp_path):
    tasks = write_tasks(tmp_path)
    recipe = load_recipe(regmean_recipe(llama_family, tasks, model_tasks={str(llama_family["ft1"]): ["echo"]}))
    plan = plan_merge(recipe)
    assert [len(t) for t in plan.calibration_texts.values()] == [12, 6]  # ft0: both tasks; ft1: echo only
    assert all(" is " in text and "Q :" not in text for text in plan.calibration_texts[str(llama_family["ft1"])])
    messages = []
    prepare_statistics(plan, cache_dir=tmp_path / "cache", device="cpu", progress=messages.append)
    assert len(list((tmp_path / "cache").glob("gram-*.safetensors"))) == 2 and "cached" not in " ".join(messages)
    again = prepare_statistics(plan_merge(recipe), cache_dir=tmp_path / "cache", device="cpu",
                               progress=messages.append)
    assert sum("cached" in m for m in messages) == 2
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(again.statistics[str(llama_family["ft0"])][name],
                               plan.statistics[str(llama_family["ft0"])][name], rtol=0, atol=0)
    # other settings or data: a new cache entry
    prepare_statistics(plan_merge(load_recipe(regmean_recipe(llama_family, tasks, gram="diagonal"))),
                       cache_dir=tmp_path / "cache", device="cpu")
    assert len(list((tmp_path / "cache").glob("gram-*.safetensors"))) == 4

    out = run_merge(recipe, tmp_path / "out", device="cpu", statistics_cache=tmp_path / "cache")
    merged = read_weights(out)
    ft0, ft1 = read_weights(llama_family["ft0"]), read_weights(llama_family["ft1"])
    stats = plan.statistics
    expected = regmean_full([ft0[name], ft1[name]], [stats[str(llama_family["ft0"])][name],
                                                     stats[str(llama_family["ft1"])][name]], 0.8)
    torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
    norm = "model.norm.weight"
    torch.testing.assert_close(merged[norm], (ft0[norm] + ft1[norm]) / 2)
    assert (out / "mergekit_config.yml").read_text().startswith("# merge_method regmean (RegMean)")
    assert load_recipe(out / "mergekit_config.yml", where=str(out / "mergekit_config.yml")).calibration.examples == 6
    # in memory: the same merge from precomputed statistics
    in_memory = merge_in_memory(recipe, {str(llama_family["ft0"]): ft0, str(llama_family["ft1"]): ft1},
                                device="cpu", statistics=plan.statistics)
    assert torch.equal(in_memory[name], merged[name])


def test_calibration_errors_come_before_any_model_runs(llama_family, tmp_path):
    tasks = write_tasks(tmp_path)
    good = regmean_recipe(llama_family, tasks)
    missing = {k: v for k, v in good.items() if k != "calibration"}
    with pytest.raises(RecipeError, match="calibration: method 'regmean' needs calibration data; add e.g."):
        load_recipe(missing)
    with pytest.raises(RecipeError, match="calibration: method 'ties' uses no data"):
        load_recipe({**good, "merge_method": "ties", "base_model": str(llama_family["base"]), "parameters": {}})
    with pytest.raises(RecipeError, match=r"calibration.split: Input should be 'search' or 'train'"):
        load_recipe({**good, "calibration": {**good["calibration"], "split": "test"}})
    with pytest.raises(RecipeError, match="calibration.examples"):
        load_recipe({**good, "calibration": {**good["calibration"], "examples": 0}})
    with pytest.raises(RecipeError, match="unknown key 'calibration.exmples'"):
        load_recipe({**good, "calibration": {"tasks": "t.yaml", "exmples": 3}})
    with pytest.raises(RecipeError, match="calibration.tasks: task file 'nowhere.yaml' not found"):
        plan_merge({**good, "calibration": {"tasks": "nowhere.yaml"}})
    with pytest.raises(RecipeError, match=r"model_tasks.*unknown task\(s\) \['add2'\]"):
        plan_merge(regmean_recipe(llama_family, tasks, model_tasks={str(llama_family["ft0"]): ["add2"]}))
    with pytest.raises(RecipeError, match="'elsewhere' is not an input model"):
        plan_merge(regmean_recipe(llama_family, tasks, model_tasks={"elsewhere": ["add"]}))
    with pytest.raises(RecipeError, match="no train split"):
        plan_merge(regmean_recipe(llama_family, tasks, split="train"))
    sds = {str(llama_family[n]): read_weights(llama_family[n]) for n in ("ft0", "ft1")}
    with pytest.raises(RecipeError, match="needs calibration statistics of model .*give its directory"):
        merge_in_memory(good, sds, device="cpu")
    plan = plan_merge(good, readers={n: StateDictReader(sd) for n, sd in sds.items()})
    with pytest.raises(RecipeError, match="no calibration statistics given for model"):
        prepare_statistics(plan, statistics={})
    assert Calibration(tasks="x").split == "search"


def test_regmean_search_space_builds_the_engines_merge(llama_family, tmp_path):
    """The shipped RegMean space with the run's tasks: statistics computed once per builder, candidates equal
    ``run_merge`` of their recipes."""
    from pathlib import Path

    from evomerge.search.builder import CandidateBuilder
    from evomerge.search.space import SpaceError, load_space

    tasks = write_tasks(tmp_path)
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "regmean_per_block.yaml")
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    with pytest.raises(SpaceError, match="given inline; name a task file"):
        space.with_calibration_tasks({"tasks": []}, models, [])
    space = space.with_calibration_tasks(str(tasks), models, ["gen"])
    assert space.calibration.tasks == str(tasks.resolve())
    assert space.calibration.model_tasks is None  # no fine-tune is named after a task: each sees every task
    builder = CandidateBuilder(llama_family["base"], models, method="regmean", device="cpu",
                               statistics_cache=tmp_path / "cache")
    for alpha in (0.3, 0.9):
        point = {name: alpha for name in space.param_names(list(models), builder.num_layers)}
        recipe = space.to_recipe(point, base_model=str(llama_family["base"]), models=models,
                                 num_layers=builder.num_layers, dtype="float32")
        builder.build(recipe)
        out = read_weights(run_merge(recipe, tmp_path / f"out{alpha}", device="cpu",
                                     statistics_cache=tmp_path / "cache"))
        live = builder.model.state_dict()
        assert all(torch.equal(v, live[k]) for k, v in out.items())
    assert len(builder.backend._statistics) == 1 and len(list((tmp_path / "cache").glob("gram-*"))) == 3
    with pytest.raises(SpaceError, match="needs calibration data"):
        load_space({"method": "regmean", "search": {"alpha": {"low": 0.1, "high": 0.9}}})
    with pytest.raises(SpaceError, match="uses no data"):
        load_space({"method": "ties", "search": {"weight": {"low": 0.1, "high": 0.9}},
                    "calibration": {"tasks": "t.yaml"}})


def test_cli_merge_resolves_calibration_next_to_the_recipe(llama_family, tmp_path):
    """`evomerge merge` of a RegMean recipe whose task file is relative to it (statistics cached next to
    the output); without calibration: an error naming the key, and no output."""
    import yaml
    from typer.testing import CliRunner

    from evomerge.cli import app

    folder = tmp_path / "recipes"
    folder.mkdir()
    write_tasks(folder)
    recipe = regmean_recipe(llama_family, "tasks.yaml")
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(folder / "r.yaml"), str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / ".evomerge-statistics").glob("gram-*.safetensors"))) == 2
    del recipe["calibration"]
    (folder / "bad.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["merge", str(folder / "bad.yaml"), str(tmp_path / "out2")])
    assert res.exit_code != 0 and "calibration: method 'regmean' needs calibration data" in res.output
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("space", ["tsv_m_per_model.yaml", "regmean_per_block.yaml"])
def test_short_searches_over_the_new_methods_finish(llama_family, tmp_path, space):
    """A few trials of a shipped space through SearchRun and finalize: every trial completes, the
    report lists the method baselines, and RegMean's statistics were computed once, in the run."""
    from pathlib import Path

    import yaml

    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    tasks = write_tasks(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "t", "base_model": str(llama_family["base"]),
        "models": {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}, "tasks": str(tasks),
        "search_space": str(Path(__file__).resolve().parents[1] / "search_spaces" / space),
        "budget": {"trials": 3}, "sampler": {"name": "random"}, "pruner": {"name": "none"},
        "output_dir": str(tmp_path / "run"), "device": "cpu", "top_k": 1, "export_checkpoint": False}))
    run = SearchRun(load_config(cfg))
    run.run()
    trials = [t for t in run.study.get_trials(deepcopy=False) if t.state.name != "WAITING"]  # anchors left queued
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials), [t.user_attrs for t in trials]
    summary = finalize(run, export_checkpoint=False, log=lambda m: None)
    labels = [r.label for r in summary.rows]
    assert {"tsv_m defaults (no search)", "iso_cts defaults (no search)", "regmean defaults (no search)"} <= set(labels)
    assert len(list((tmp_path / "run" / ".evomerge-statistics").glob("gram-*.safetensors"))) == 3
    assert (tmp_path / "run" / "best_recipe.yaml").read_text().startswith("# merge_method ")
