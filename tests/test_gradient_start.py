"""``start: gradient``: a point of a task-arithmetic or RegMean space fitted on the search split (evomerge.search.gradient_start)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.engine import iter_merged, plan_merge, prepare_statistics
from evomerge.evaluate import Evaluator, TaskError
from evomerge.evaluate.scoring import encode_pairs
from evomerge.search.config import load_config
from evomerge.search.gradient_start import GradientStartError, Layout, check_space, resolve_start
from evomerge.search.space import load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _run_config(tmp_path: Path, zoo, **extra) -> Path:
    cfg = {"name": "g", "base_model": str(zoo.base), "models": {k: str(v) for k, v in zoo.experts.items()},
           "tasks": str(zoo.tasks_yaml), "search_space": str(SPACES / "task_arithmetic_per_type.yaml"),
           "budget": {"trials": 6}, "sampler": {"name": "cmaes", "popsize": 4}, "pruner": {"name": "none"},
           "output_dir": str(tmp_path / "run"), "device": "cpu", "top_k": 2, "start": "gradient", **extra}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_task_loss_is_the_proxy_cross_entropy_and_differentiable(tiny_zoo):
    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.base, dtype=torch.float32).eval()
    ev = Evaluator(tiny_zoo.tasks_yaml, tok, split="search", proxy=True, bootstrap_iters=0)
    own = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for i, spec in enumerate(ev.specs):
        loss = ev.task_loss(model, i, own)
        with torch.no_grad():
            assert loss.item() == pytest.approx(ev.task_loss(model, i).item(), rel=1e-5)
        loss.backward()
        assert loss.item() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in own.values())
    assert sum(ev.task_weights()) == pytest.approx(1.0)
    # derived independently, one unpadded sequence at a time: the mean cross-entropy over each example's choices
    i, spec = next((i, s) for i, s in enumerate(ev.specs) if s.kind == "multiple_choice")
    terms = []
    with torch.no_grad():
        for e in spec.examples("search"):
            scores = []
            for ctx, cont in encode_pairs(tok, [(e.prompt, c) for c in e.continuations]):
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                score = sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont))
                scores.append(score / (len(e.continuations[len(scores)]) if spec.metric == "acc_norm" else 1))
            terms.append(-torch.log_softmax(torch.stack(scores), 0)[e.label])
        assert ev.task_loss(model, i).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)
    # without proxy, a generate task has no loss
    plain = Evaluator(tiny_zoo.tasks_yaml, tok, split="search", bootstrap_iters=0)
    gen = [i for i, s in enumerate(plain.specs) if s.kind == "generate"]
    if gen:
        with pytest.raises(TaskError, match="proxy=True"):
            plain.task_loss(model, gen[0])


@pytest.mark.parametrize("family, space_file", [
    ("tiny_zoo", "task_arithmetic_per_type.yaml"),
    ("qwen_family", "task_arithmetic_per_type.yaml"),  # tied embeddings
    ("tiny_zoo", "regmean_per_layer.yaml"),  # through RegMean's own kernel, with calibration statistics
])
def test_layout_reproduces_the_engine_merge_at_any_point(family, space_file, request, tmp_path):
    zoo = request.getfixturevalue(family)
    if family == "tiny_zoo":
        base, models = str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}
    else:
        base, models = str(zoo["base"]), {k: str(v) for k, v in zoo.items() if k != "base"}
    space = load_space(SPACES / space_file)
    if space.calibration is not None:
        space = space.with_calibration_tasks(str(zoo.tasks_yaml), models, list(models))
    check_space(space)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    dists = space.distributions(list(models), num_layers)

    def recipe_for(point):
        return space.to_recipe(point, base_model=base, models=models, num_layers=num_layers)

    params = dict(model.named_parameters())
    layout = Layout(recipe_for, dists, params, statistics_cache=tmp_path)
    g = torch.Generator().manual_seed(0)
    point = {d: round(float(dists[d].low + torch.rand((), generator=g) * (dists[d].high - dists[d].low)), 6)
             for d in layout.dims}
    mine = layout.merged(torch.tensor([point[d] for d in layout.dims]), {n: params[n].dtype for n in layout.names})
    reference = dict(iter_merged(prepare_statistics(plan_merge(recipe_for(point)), cache_dir=tmp_path), device="cpu"))
    assert set(mine) == set(params) and len(mine) > 10
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space, pattern", [
    ({"method": "ties", "search": {"weight": {"low": 0, "high": 2}}}, "task_arithmetic and regmean"),
    ({"method": "task_arithmetic", "search": {"weight": {"low": 0, "high": 2}}, "fixed": {"normalize": True}},
     "normalize: false"),
])
def test_spaces_the_fit_cannot_differentiate_are_refused(space, pattern):
    with pytest.raises(GradientStartError, match=pattern):
        check_space(load_space(space))


def test_interpolated_block_values_are_refused(llama_family):
    base, models = str(llama_family["base"]), {"a": str(llama_family["ft0"]), "b": str(llama_family["ft1"])}
    space = load_space({"method": "task_arithmetic", "granularity": "block", "block_size": 3, "smooth": True,
                        "search": {"weight": {"low": 0, "high": 2}}})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n = model.config.num_hidden_layers
    with pytest.raises(GradientStartError, match="interpolated"):
        Layout(lambda p: space.to_recipe(p, base_model=base, models=models, num_layers=n),
               space.distributions(list(models), n), dict(model.named_parameters()))


def test_a_gradient_start_search_scores_the_fitted_point_as_an_anchor_and_starts_cma_es(tiny_zoo, tmp_path,
                                                                                       monkeypatch):
    from evomerge.search import gradient_start
    from evomerge.search.run import SearchRun, trial_score

    monkeypatch.setattr(gradient_start, "STEPS", 15)
    run = SearchRun(load_config(_run_config(tmp_path, tiny_zoo)))
    run.run()
    trials = run.study.get_trials(deepcopy=False)
    anchors = run.space.anchor_points(run.model_names, run.num_layers)
    n = len(anchors) + 1
    assert run.study.user_attrs["anchors"] == n
    assert [t.params for t in trials[:n - 1]] == anchors
    summary = run.study.user_attrs["gradient_start"]
    assert summary["steps"] == 15 and summary["fitted_loss"] < summary["start_loss"]
    fitted = trials[n - 1]
    assert fitted.user_attrs["anchor"] == n - 1 and fitted.params != trials[summary["start_anchor"]].params
    best = max(trials[:n], key=trial_score)
    assert run.study.user_attrs["start_point"] == best.params
    assert isinstance(run.study.sampler, optuna.samplers.CmaEsSampler)


def test_gradient_start_refuses_a_space_before_loading_models(tiny_zoo, tmp_path):
    from evomerge.search.run import SearchRun

    cfg = load_config(_run_config(tmp_path, tiny_zoo, search_space=str(SPACES / "ties_per_model.yaml")))
    with pytest.raises(GradientStartError, match="task_arithmetic"):
        SearchRun(cfg)


def test_auto_start_fits_where_it_applies_and_falls_back_to_anchors(tiny_zoo):
    from evomerge.evaluate import LmEvalTask, load_tasks

    specs = load_tasks(tiny_zoo.tasks_yaml)
    regmean, ties = load_space(SPACES / "regmean_per_layer.yaml"), load_space(SPACES / "ties_per_model.yaml")
    assert resolve_start("auto", regmean, specs) == "gradient"
    assert resolve_start("auto", ties, specs) == "anchors"
    assert resolve_start("auto", regmean, specs, lora_scalings=True) == "anchors"
    assert resolve_start("anchors", regmean, specs) == "anchors" and resolve_start("default", ties, specs) == "default"
    lm_eval = LmEvalTask.model_validate({"name": "hs", "kind": "lm_eval", "task": "hellaswag", "metric": "acc,none"})
    assert resolve_start("auto", regmean, [*specs, lm_eval]) == "anchors"
    with pytest.raises(GradientStartError, match="lm-eval tasks \\['hs'\\]"):
        resolve_start("gradient", regmean, [*specs, lm_eval])
