"""Smooth search metrics: `Evaluator(proxy=True)` against hand-computed forwards, and a search with
`search_metric: proxy` scoring only its search split by the proxies (validation and test stay on
each task's own metric)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

import evomerge  # noqa: F401  (sets the HF offline variables)
from evomerge.evaluate import Evaluator, load_tasks
from evomerge.search.config import ConfigError, load_config
from tests.test_evaluate import MC, arith_rows, manual_loglik, model, tok, write_jsonl, write_yaml  # noqa: F401
from tests.test_search import _config


GEN = """
  - {name: gen, kind: generate, data: arith.jsonl, prompt: "Q : {question} =", target: " {answer}", max_new_tokens: 3}
"""


@pytest.fixture()
def tasks(tmp_path):
    write_jsonl(tmp_path / "arith.jsonl", arith_rows())
    text = ("tasks:" + GEN + MC + MC.replace("name: mc", "name: mcn").replace("metric: acc", "metric: acc_norm")
            + '  - {name: ll, kind: loglikelihood, data: arith.jsonl, prompt: "Q : {question} = A :", target: " {answer}"}\n')
    return load_tasks(write_yaml(tmp_path / "t.yaml", text))


def test_proxies_match_manual_forwards(tasks, tok, model):
    res = Evaluator(tasks, tok, split="search", batch_size=5, proxy=True, bootstrap_iters=0).evaluate(model)
    assert {k: r.metric for k, r in res.tasks.items()} == {
        "gen": "target_prob", "mc": "choice_prob", "mcn": "choice_prob", "ll": "loglikelihood"}

    gen = tasks[0].examples("search")
    expected = np.mean([math.exp(manual_loglik(model, tok, e.prompt, e.target)) for e in gen])
    assert res.per_task["gen"] == pytest.approx(expected, rel=1e-4)

    mc = tasks[1].examples("search")
    for name, per_char in (("mc", False), ("mcn", True)):
        probs = []
        for e in mc:
            s = np.array([manual_loglik(model, tok, e.prompt, c) / (len(c) if per_char else 1) for c in e.continuations])
            probs.append(float(np.exp(s[e.label]) / np.exp(s).sum()))
        assert res.per_task[name] == pytest.approx(np.mean(probs), rel=1e-4)
        assert 0 < res.per_task[name] < 1

    plain = Evaluator(tasks, tok, split="search", batch_size=5, bootstrap_iters=0).evaluate(model)
    assert plain.tasks["gen"].metric == "exact_match" and plain.tasks["mc"].metric == "acc"
    assert plain.per_task["ll"] == pytest.approx(res.per_task["ll"])  # not a step function: unchanged
    # the point of the proxy: an untrained model gets no exact match at all, yet a graded score
    assert plain.per_task["gen"] == 0.0 and 0 < res.per_task["gen"] < 1


def test_proxy_chunked_equals_whole_and_has_cis(tasks, tok, model):
    ev = Evaluator(tasks, tok, split="test", batch_size=4, proxy=True)
    whole = ev.evaluate(model)
    running = list(ev.evaluate_chunks(model, chunk_size=5))
    assert running[-1].aggregate == pytest.approx(whole.aggregate)
    assert ev.last_result.per_task == pytest.approx(whole.per_task)
    lo, hi = whole.tasks["gen"].ci
    assert lo <= whole.per_task["gen"] <= hi


def test_search_metric_proxy_scores_only_the_search_split(tiny_zoo, tmp_path):
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    cfg = load_config(_config(tmp_path, tiny_zoo, budget={"trials": 4}, search_metric="proxy",
                              pruner={"name": "median", "chunk_size": 16}))
    assert cfg.search_metric == "proxy"
    run = SearchRun(cfg)
    run.run()
    search_metrics = {t.metric.name for t in run.search_evaluators()[0]._tasks}
    assert search_metrics <= {"target_prob", "choice_prob", "loglikelihood", "perplexity"}
    assert "target_prob" in search_metrics

    # trial 0 (the default recipe) was scored by the proxies, not by exact match / accuracy
    first = run.study.get_trials(deepcopy=False)[0]
    run.builder.build(run.recipe_for(run.default_point))
    proxy = Evaluator(run.task_specs, run.tokenizer, split="search", proxy=True, bootstrap_iters=0).evaluate(run.builder.model)
    real = Evaluator(run.task_specs, run.tokenizer, split="search", bootstrap_iters=0).evaluate(run.builder.model)
    assert first.value == pytest.approx(proxy.aggregate)
    assert proxy.aggregate != pytest.approx(real.aggregate)

    summary = finalize(run, export_checkpoint=False, log=lambda m: None)
    assert {t.metric.name for t in run.evaluator("validation")._tasks} <= {"exact_match", "acc", "acc_norm"}
    default_row = next(r for r in summary.rows if r.label.startswith("default recipe"))
    run.builder.build(run.recipe_for(run.default_point))
    test = Evaluator(run.task_specs, run.tokenizer, split="test", bootstrap_iters=0).evaluate(run.builder.model)
    assert default_row.per_task == pytest.approx(test.per_task)  # the test table is on the real metrics


def test_bad_search_metric_is_named(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"zoo": {"size": "tiny"}, "search_space": "x.yaml", "search_metric": "smooth"}))
    with pytest.raises(ConfigError, match=r"search_metric") as e:
        load_config(p)
    assert str(p) in str(e.value)
