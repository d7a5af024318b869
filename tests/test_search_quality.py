"""Search quality: zoo variants, anchored starts, the mixed objective, tensor-type spaces, the overfitting
guard in the winner's selection, and the search-quality benchmark on the tiny zoo."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.search.config import ConfigError, load_config
from evomerge.search.space import SpaceError, load_space
from evomerge.zoo import (FAMILIES, FAMILY_ORDER, MARKER_NAME, ZooVariant, build_zoo, default_zoo_dir, load_zoo,
                          make_zoo_data, zoo_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


def _run_config(tmp_path: Path, zoo, **extra) -> Path:
    cfg = {"name": "q", "base_model": str(zoo.base), "models": {k: str(v) for k, v in zoo.experts.items()},
           "tasks": str(zoo.tasks_yaml), "search_space": str(SPACES / "ties_per_model.yaml"),
           "budget": {"trials": 8}, "sampler": {"name": "cmaes", "popsize": 4}, "pruner": {"name": "none"},
           "output_dir": str(tmp_path / "run"), "device": "cpu", "top_k": 2, **extra}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# --------------------------------------------------------------------------------------- zoo variants
def test_zoo_variants_name_their_families_experts_and_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    v = ZooVariant(experts=8, base_knows_tasks=False, overlap=True, dtype="bfloat16")
    assert v.families("small") == FAMILY_ORDER and len(FAMILY_ORDER) == 8
    assert v.tag("small") == "-e8-naive-overlap-bf16"
    assert v.expert_tasks("small")["prv+rev"] == ("prv", "rev") and len(v.expert_tasks("small")) == 8
    assert v.spec("small").base_task_share == 0 and v.spec("small").families == FAMILY_ORDER
    assert default_zoo_dir("small", 1, v) == tmp_path / "zoo" / "small-e8-naive-overlap-bf16-seed1"
    # the size's own zoo is the default variant, however it is spelled
    assert ZooVariant().tag("small") == "" and ZooVariant(experts=4).is_default("small")
    assert ZooVariant(experts=2).families("small") == ("rev", "map")
    assert default_zoo_dir("small", 0, ZooVariant(experts=4)) == tmp_path / "zoo" / "small-seed0"
    for bad, pattern in [(ZooVariant(experts=9), "between 2 and 8"), (ZooVariant(experts=2, overlap=True), "overlap"),
                         (ZooVariant(dtype="float16"), "float32 or bfloat16")]:
        with pytest.raises(ValueError, match=pattern):
            bad.check("small")


def test_the_eight_task_families_answer_correctly_and_keep_their_splits_disjoint():
    data = make_zoo_data("tiny", 0, ZooVariant(experts=8))
    assert list(data) == list(FAMILY_ORDER)
    tok = zoo_tokenizer()
    for name in ("srt", "add", "par", "prv"):
        fam = FAMILIES[name]
        splits = data[name]
        keys = {s: {fam.key(r) for r in splits[s]} for s in ("search", "validation", "test")}
        assert all(len(keys[s]) == len(splits[s]) for s in keys)  # unique within a split
        assert not keys["search"] & keys["test"] and not keys["validation"] & keys["test"]
        for row in splits["test"][:50]:
            prompt, gold = fam.completion(row)
            ids = tok(prompt + gold, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, (name, prompt, gold)
            q = row["question"].split()
            if name == "srt":
                assert row["answer"].split() == sorted(q)
            elif name == "add":
                assert int(row["answer"]) == int(q[0]) + int(q[1]) < 100
            elif name == "par":
                assert row["choices"][row["label"]] == ["zero", "one"][(int(q[0]) + int(q[1])) % 2]
            else:
                n, letter = row["answer"].split()
                assert int(n) == int(q[0]) - 1 and ord(letter) == ord(q[1]) - 1


def test_a_variant_zoo_builds_saves_its_dtype_and_reloads_from_its_marker(tmp_path, tiny_zoo):
    v = ZooVariant(overlap=True, base_knows_tasks=False, dtype="bfloat16")
    zoo = build_zoo(tmp_path / "v", size="tiny", seed=0, variant=v, progress=False)
    assert sorted(zoo.experts) == ["cmp+rev", "map+cmp", "rev+map"]
    assert [t for t in yaml.safe_load(zoo.tasks_yaml.read_text())["tasks"]] and set(zoo.task_yamls) == {"rev", "map", "cmp"}
    for path in (zoo.base, *zoo.experts.values(), zoo.multitask):
        assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.bfloat16}
    marker = json.loads((zoo.root / MARKER_NAME).read_text())
    assert marker["variant"]["overlap"] is True and marker["spec"]["base_task_share"] == 0
    assert load_zoo(zoo.root) == zoo and load_zoo(zoo.root).variant == v
    assert "variant" not in json.loads((tiny_zoo.root / MARKER_NAME).read_text())  # the default zoo: as it was
    assert build_zoo(zoo.root, size="tiny", seed=0, variant=v, progress=False) == zoo  # from the cache


def test_zoo_variant_keys_in_a_run_config_are_checked(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"zoo": {"size": "small", "experts": 2, "overlap": True}, "search_space": "x.yaml"}))
    with pytest.raises(ConfigError, match="overlap needs at least 3 experts") as e:
        load_config(p)
    assert str(p) in str(e.value)
    p.write_text(yaml.safe_dump({"zoo": {"size": "small", "experts": 12}, "search_space": "x.yaml"}))
    with pytest.raises(ConfigError, match=r"zoo\.experts"):
        load_config(p)


# --------------------------------------------------------------------------------------- spaces
def test_anchor_points_vary_one_parameter_at_a_time_from_the_default():
    space = load_space(SPACES / "ties_per_block.yaml")
    points = space.anchor_points(["a", "b"], 8)
    assert points[0] == space.default_point(["a", "b"], 8)
    assert len(points) == 1 + 2 * 2  # weight and density, each at its quartiles
    levels = {(name, round(v, 6)) for p in points[1:] for name, v in p.items() if v != points[0][name]}
    assert {lvl for _, lvl in levels} == {0.5, 1.5, 0.275, 0.725}
    for p in points[1:]:
        changed = {n.split("[")[0] for n, v in p.items() if v != points[0][n]}
        assert len(changed) == 1  # one parameter, every one of its dimensions
        assert len({v for n, v in p.items() if n.split("[")[0] in changed}) == 1


def test_tensor_type_parts_decode_to_filters_with_a_catch_all():
    space = load_space({"method": "ties", "parts": ["q_proj", "mlp"],
                        "search": {"weight": {"low": 0, "high": 2}, "density": {"low": 0.1, "high": 0.9}}})
    names = space.param_names(["m"], 4)
    assert names == ["weight[m].q_proj", "weight[m].mlp", "weight[m].rest",
                     "density[m].q_proj", "density[m].mlp", "density[m].rest"]
    point = {n: {"q_proj": 0.2, "mlp": 0.4, "rest": 0.6}[n.split(".")[1]] for n in names}
    r = space.to_recipe(point, base_model="B", models={"m": "M"}, num_layers=4)
    w = r.models[0].parameters["weight"]
    assert [(c.filter, c.value) for c in w] == [("q_proj", 0.2), ("mlp", 0.4), (None, 0.6)]
    for bad, pattern in [({"parts": ["rest"]}, "not 'rest'"), ({"parts": ["mlp", "mlp"]}, "distinct"),
                         ({"parts": ["mlp"], "attn_mlp": True}, "parts alone")]:
        with pytest.raises(SpaceError, match=pattern):
            load_space({"method": "ties", "search": {"weight": {"low": 0, "high": 2}}, **bad})


# --------------------------------------------------------------------------------------- the search
def test_anchored_start_scores_the_anchors_then_starts_cma_es_at_the_best(tiny_zoo, tmp_path):
    from evomerge.search.run import SearchRun, trial_score

    cfg = load_config(_run_config(tmp_path, tiny_zoo, start="anchors", budget={"trials": 9}))
    run = SearchRun(cfg)
    run.run()
    trials = run.study.get_trials(deepcopy=False)
    anchors = run.space.anchor_points(run.model_names, run.num_layers)
    assert len(anchors) == 5 and run.study.user_attrs["anchors"] == 5
    assert [t.params for t in trials[:5]] == anchors
    assert trials[0].user_attrs["default"] is True and trials[3].user_attrs["anchor"] == 3
    best = max(trials[:5], key=trial_score)
    assert run.study.user_attrs["start_point"] == best.params
    assert isinstance(run.study.sampler, optuna.samplers.CmaEsSampler)
    cma = [t for t in trials[5:] if any(k.startswith("cma") for k in t.system_attrs)]
    assert len(cma) == 4  # every trial after the anchors is CMA-ES's
    # a resumed run starts the same CMA-ES (from the stored start point) and finishes the budget
    more = load_config(_run_config(tmp_path, tiny_zoo, start="anchors", budget={"trials": 11}))
    again = SearchRun(more)
    again.run()
    assert len(again.study.get_trials(deepcopy=False)) == 11
    assert again.study.user_attrs["start_point"] == best.params


def test_mixed_search_metric_is_the_mean_of_the_metric_and_its_proxy(tiny_zoo, tmp_path):
    from evomerge.evaluate import Evaluator
    from evomerge.search.run import SearchRun

    cfg = load_config(_run_config(tmp_path, tiny_zoo, search_metric="mix", budget={"trials": 2},
                                  pruner={"name": "median", "chunk_size": 16}))
    run = SearchRun(cfg)
    run.run()
    first = run.study.get_trials(deepcopy=False)[0]
    run.builder.build(run.recipe_for(run.default_point))
    task = Evaluator(run.task_specs, run.tokenizer, split="search", bootstrap_iters=0).evaluate(run.builder.model)
    proxy = Evaluator(run.task_specs, run.tokenizer, split="search", proxy=True,
                      bootstrap_iters=0).evaluate(run.builder.model)
    assert first.value == pytest.approx((task.aggregate + proxy.aggregate) / 2)
    assert first.user_attrs["scores"] == pytest.approx({t: (task.per_task[t] + proxy.per_task[t]) / 2
                                                        for t in task.per_task})


def _study_with(values: list[float], default: int | None = None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for i, v in enumerate(values):
        study.add_trial(optuna.trial.create_trial(value=v, user_attrs={"default": True} if i == default else {}))
    return study


def test_selection_widens_the_finalists_when_the_search_split_overfits():
    from evomerge.search.select import WIDEN, noise_threshold, select_winner

    values = [0.9 - 0.01 * i for i in range(20)]  # trial i scored 0.9 - 0.01 i on the search split
    honest = select_winner(_study_with(values), 3, lambda t: t.value - 0.001, n_validation=400)
    assert not honest.widened and len(honest.ranked) == 3 and honest.winner.number == 0
    assert honest.gap == pytest.approx(0.001) and honest.threshold == pytest.approx(noise_threshold(0.889, 400))
    # the best search scores are luck: validation is flat, except trial 7 (outside the top 3)
    lucky = select_winner(_study_with(values), 3, lambda t: 0.8 if t.number == 7 else 0.6, n_validation=400)
    assert lucky.widened and len(lucky.ranked) == WIDEN * 3 and lucky.winner.number == 7
    assert "re-ranked 9 finalists" in lucky.describe()
    # the default recipe's trial is always a finalist, and wins when validation prefers it
    started = select_winner(_study_with(values, default=15), 3, lambda t: 0.9 if t.number == 15 else 0.6 + 0.01 * t.number,
                            n_validation=400)
    assert [t.number for t, _ in started.ranked] == [15, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # widened, plus the default
    cut = select_winner(_study_with(values), 3, lambda t: 0.8 if t.number == 7 else 0.6, n_validation=400,
                        within=6)
    assert cut.winner.number == 0 and all(t.number < 6 for t, _ in cut.ranked)


# --------------------------------------------------------------------------------------- the benchmark
def test_search_quality_benchmark_reports_each_budget_against_the_best_default(tiny_zoo, tmp_path):
    spec = importlib.util.spec_from_file_location("search_quality", ROOT / "benchmarks" / "search_quality.py")
    sq = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sq  # dataclasses look their module up there
    spec.loader.exec_module(sq)
    case = sq.Case("tiny", "tiny", 0, ZooVariant())
    res = sq.run_case(case, {"search_space": str(SPACES / "ties_per_model.yaml"), "pruner": {"name": "none"},
                             "sampler": {"name": "cmaes", "popsize": 4}, "top_k": 2},
                      [4, 8], 0, log=lambda m: None, zoo=tiny_zoo, cache_dir=tmp_path)
    b = res.baselines
    assert set(b) == {"base", "reference", *[f"expert:{e}" for e in tiny_zoo.experts],
                      *[f"default:{m}" for m in sq.default_methods()]}
    assert res.best_default == max((k for k in b if k.startswith("default:")), key=lambda k: b[k].value)
    for budget in (4, 8):
        w = res.winners[budget]
        assert w["trial"] < budget
        assert w["share"] == pytest.approx((w["test"].value - b[res.best_default].value)
                                           / (b["reference"].value - b[res.best_default].value))
    assert (tmp_path / f"{tiny_zoo.root.name}.json").is_file()  # baselines cached for the next run
    args = type("A", (), {"suite": "ci", "set": []})()
    report = sq.render({0: [res]}, [4, 8], args, 1.0)
    assert "| tiny |" in report and "median share @8" in report


def test_fine_tunes_named_after_tasks_calibrate_on_them():
    from evomerge.calibration import own_tasks

    models = {"rev": "/z/rev", "rev+map": "/z/rm", "chat": "/z/chat"}
    assert own_tasks(models, ["rev", "map"]) == {"/z/rev": ["rev"], "/z/rm": ["rev", "map"]}
    assert own_tasks(models, ["cmp"]) == {}
