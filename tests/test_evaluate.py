"""Tests for evomerge.evaluate: specs and splits, native scorers vs hand-computed forwards, batching,
the lm-eval adapter on a live model (offline), bootstrap CIs, chunked scores and bad input."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import evomerge  # noqa: F401  (sets the HF offline variables)
from evomerge.evaluate import (
    SPLITS,
    Evaluator,
    TaskError,
    evaluate_model_dir,
    load_tasks,
    render_table,
)
from evomerge.evaluate.scoring import build_loglik_batches, continuation_logprobs, encode_pairs
from evomerge.tiny import build_tiny_model, make_tokenizer, save_model, tiny_config


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not thrash when the 2 cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tiny_config("llama", vocab_size=len(tok), num_layers=2), seed=0).eval()


def arith_rows(n: int = 48) -> list[dict]:
    """Distinct arithmetic questions in the tiny tokenizer's vocabulary."""
    rows = []
    for i in range(n):
        a, b = i % 10, (i // 10) * 2 + 1
        s = a + b
        rows.append({"question": f"{a} + {b}", "answer": str(s), "choices": [str(s), str(s + 1), str(s + 2)], "label": i % 3})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MC = """
  - name: mc
    kind: multiple_choice
    data: arith.jsonl
    prompt: "Q : {question} = A :"
    metric: acc
"""


@pytest.fixture()
def arith(tmp_path):
    return write_jsonl(tmp_path / "arith.jsonl", arith_rows())


# --- hand-computed references ----------------------------------------------------------------------


def manual_loglik(model, tok, prompt: str, cont: str) -> float:
    """Σ log p(continuation tokens) from one unbatched full-vocabulary log_softmax."""
    ctx = tok(prompt).input_ids
    whole = tok(prompt + cont).input_ids
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(whole[len(ctx):])))


def manual_greedy(model, tok, prompt: str, max_new: int, stops=()) -> str:
    """Greedy text after `prompt` from an unbatched, cache-free argmax loop."""
    ids = tok(prompt).input_ids
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    text = tok.decode(ids + out, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:cut]


# --- native scorers --------------------------------------------------------------------------------


def test_multiple_choice_matches_manual_forward(tmp_path, arith, tok, model):
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", "tasks:" + MC + MC.replace("name: mc", "name: mcn").replace("metric: acc", "metric: acc_norm")))
    examples = tasks[0].examples("search")
    lls = [[manual_loglik(model, tok, e.prompt, c) for c in e.continuations] for e in examples]
    acc = np.mean([int(np.argmax(ll)) == e.label for ll, e in zip(lls, examples)])
    acc_norm = np.mean([
        int(np.argmax([x / len(c) for x, c in zip(ll, e.continuations)])) == e.label for ll, e in zip(lls, examples)
    ])
    res = Evaluator(tasks, tok, split="search", batch_size=5).evaluate(model)
    assert res.per_task["mc"] == pytest.approx(acc)
    assert res.per_task["mcn"] == pytest.approx(acc_norm)
    assert 0 < acc < 1  # the check discriminates

    # the kernel itself: every per-choice log-likelihood, batched and left-padded; single-token
    # choices of one question share a row, multi-token continuations of mixed lengths do not
    pairs = [(e.prompt, c) for e in examples for c in e.continuations]
    pairs += [(e.prompt, e.continuations[0] + " ." * (i % 3 + 1)) for i, e in enumerate(examples)]
    reqs = encode_pairs(tok, pairs)
    want = np.array(sum(lls, []) + [manual_loglik(model, tok, *p) for p in pairs[len(pairs) // 4 * 3:]])
    got = torch.empty(len(reqs))
    batches = build_loglik_batches(reqs, range(len(reqs)), batch_size=7, pad_id=0, max_length=128)
    with torch.no_grad():
        for b in batches:
            got[b.request_ids] = continuation_logprobs(model, b)
    assert got.numpy() == pytest.approx(want, abs=1e-4)
    assert sum(b.input_ids.shape[0] for b in batches) == 2 * len(examples)


def test_loglikelihood_and_perplexity_match_manual(tmp_path, arith, tok, model):
    text = """
tasks:
  - {name: ll, kind: loglikelihood, data: arith.jsonl, prompt: "Q : {question} = A :", target: " {answer} ."}
  - {name: ppl, kind: loglikelihood, data: arith.jsonl, prompt: "Q : {question} = A :", target: " {answer} .", metric: perplexity}
"""
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", text))
    examples = tasks[0].examples("validation")
    lls = [manual_loglik(model, tok, e.prompt, e.target) for e in examples]
    n_tok = sum(len(tok(e.target).input_ids) for e in examples)
    res = Evaluator(tasks, tok, split="validation", batch_size=4).evaluate(model)
    assert res.per_task["ll"] == pytest.approx(np.mean(lls), abs=1e-4)
    ppl = math.exp(-sum(lls) / n_tok)
    assert res.per_task["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert res.tasks["ppl"].higher_is_better is False
    assert res.tasks["ppl"].score == pytest.approx(1 / ppl, rel=1e-4)  # perplexity enters as 1/ppl
    assert res.aggregate == pytest.approx((np.mean(lls) + 1 / ppl) / 2, rel=1e-4)


def test_generate_exact_match_matches_manual_greedy(tmp_path, tok, model):
    rows = arith_rows(24)
    prompts = [f"Q : {r['question']} = A :" for r in rows]
    greedy = [manual_greedy(model, tok, p, 3) for p in prompts]
    assert len(set(greedy)) > 1
    # half the targets are what the model generates, half are not
    for i, r in enumerate(rows):
        r["answer"] = greedy[i] if i % 2 == 0 else " yes no"
    write_jsonl(tmp_path / "gen.jsonl", rows)
    # a stop string the model emits mid-output: text must be cut right before it
    stop = tok.decode(tok(prompts[0]).input_ids + [tok(greedy[0]).input_ids[1]])[len(tok.decode(tok(prompts[0]).input_ids)):]
    rows_stop = [dict(r, answer=manual_greedy(model, tok, p, 3, stops=[stop])) for r, p in zip(rows, prompts)]
    write_jsonl(tmp_path / "stop.jsonl", rows_stop)
    text = f"""
tasks:
  - {{name: gen, kind: generate, data: gen.jsonl, prompt: "Q : {{question}} = A :", target: "{{answer}}", max_new_tokens: 3,
      split: {{seed: 1, search: 0.5, validation: 0.25, test: 0.25}}}}
  - {{name: stop, kind: generate, data: stop.jsonl, prompt: "Q : {{question}} = A :", target: "{{answer}}", max_new_tokens: 3,
      stop: [{json.dumps(stop)}]}}
"""
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", text))
    expected = np.mean([manual_greedy(model, tok, e.prompt, 3) == e.target for e in tasks[0].examples("search")])
    assert 0 < expected < 1
    for bs in (1, 5):
        res = Evaluator(tasks, tok, split="search", batch_size=bs).evaluate(model)
        assert res.per_task["gen"] == pytest.approx(expected)
        assert res.per_task["stop"] == 1.0
    cut = [e for e in tasks[1].examples("search") if manual_greedy(model, tok, e.prompt, 3) != e.target]
    assert cut  # the stop string really shortened some outputs


def test_exact_match_normalization(tmp_path, tok, model):
    rows = arith_rows(12)
    prompts = [f"Q : {r['question']} = A :" for r in rows]
    for r, p in zip(rows, prompts):
        r["answer"] = "  " + manual_greedy(model, tok, p, 2).upper() + "  "
    write_jsonl(tmp_path / "g.jsonl", rows)
    base = '{name: NAME, kind: generate, data: g.jsonl, prompt: "Q : {question} = A :", target: "{answer}", max_new_tokens: 2'
    text = "tasks:\n  - " + base.replace("NAME", "raw") + "}\n  - " + base.replace("NAME", "norm") + ", normalize: [strip, lower]}\n"
    res = Evaluator(load_tasks(write_yaml(tmp_path / "t.yaml", text)), tok, split="test").evaluate(model)
    assert res.per_task["raw"] == 0.0
    assert res.per_task["norm"] == 1.0


def test_batched_equals_unbatched_any_padding_side(tmp_path, arith, tok, model):
    text = "tasks:" + MC + """
  - {name: ll, kind: loglikelihood, data: arith.jsonl, prompt: "Q : {question} = A :", target: " {answer}"}
  - {name: gen, kind: generate, data: arith.jsonl, prompt: "Q : {question} =", target: " {answer}", max_new_tokens: 3}
"""
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", text))
    results = []
    for side in ("right", "left"):
        tok.padding_side = side
        for bs in (1, 3, 64):
            results.append(Evaluator(tasks, tok, split="search", batch_size=bs).evaluate(model).per_task)
    tok.padding_side = "right"
    for r in results[1:]:
        assert r["mc"] == results[0]["mc"]
        assert r["gen"] == results[0]["gen"]
        assert r["ll"] == pytest.approx(results[0]["ll"], abs=1e-5)


def test_model_mode_and_dtype(tmp_path, arith, tok, model):
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", "tasks:" + MC))
    ev = Evaluator(tasks, tok, split="test", batch_size=8)
    ref = ev.evaluate(model).per_task["mc"]
    model.train()
    try:
        assert ev.evaluate(model).per_task["mc"] == ref  # scored in eval mode ...
        assert model.training  # ... and the mode is restored
    finally:
        model.eval()
    half = build_tiny_model(model.config, seed=0, dtype=torch.bfloat16).eval()
    assert 0 <= ev.evaluate(half).per_task["mc"] <= 1  # runs in the model's dtype


# --- splits, bootstrap, chunks -----------------------------------------------------------------------


def test_split_determinism_and_disjointness(tmp_path, arith):
    def load(seed):
        text = "tasks:" + MC.replace("metric: acc", f"metric: acc\n    split: {{seed: {seed}, search: 0.5, validation: 0.3, test: 0.2}}")
        t = load_tasks(write_yaml(tmp_path / "t.yaml", text))[0]
        return {s: [e.source for e in t.examples(s)] for s in SPLITS}

    a, b, c = load(3), load(3), load(4)
    assert a == b and a != c
    assert [len(a[s]) for s in SPLITS] == [24, 14, 10]
    assert sorted(sum(a.values(), [])) == sorted(f"{tmp_path / 'arith.jsonl'}:{i}" for i in range(1, 49))
    assert len(set(sum(a.values(), []))) == 48  # disjoint


def test_three_split_files(tmp_path, tok, model):
    rows = arith_rows(30)
    for i, s in enumerate(SPLITS):
        write_jsonl(tmp_path / f"{s}.jsonl", rows[i * 10:(i + 1) * 10])
    text = "tasks:" + MC.replace("data: arith.jsonl", "splits: {search: search.jsonl, validation: validation.jsonl, test: test.jsonl}")
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", text))
    assert [e.source for e in tasks[0].examples("validation")] == [f"{tmp_path / 'validation.jsonl'}:{i}" for i in range(1, 11)]
    assert Evaluator(tasks, tok, split="test").n_examples == {"mc": 10}


def test_bootstrap_ci_seeded_and_contains_estimate(tmp_path, arith, tok, model):
    text = "tasks:" + MC + """
  - {name: ll, kind: loglikelihood, data: arith.jsonl, prompt: "Q : {question} = A :", target: " {answer}", metric: perplexity, weight: 2}
"""
    tasks = load_tasks(write_yaml(tmp_path / "t.yaml", text))
    r1 = Evaluator(tasks, tok, split="search", seed=7).evaluate(model)
    r2 = Evaluator(tasks, tok, split="search", seed=7).evaluate(model)
    r3 = Evaluator(tasks, tok, split="search", seed=8).evaluate(model)
    assert r1.ci == r2.ci and r1.tasks["ll"].ci == r2.tasks["ll"].ci
    assert r1.ci != r3.ci
    assert r1.ci[0] < r1.aggregate < r1.ci[1]
    for t in r1.tasks.values():
        assert t.ci[0] <= t.value <= t.ci[1] and t.ci[0] < t.ci[1]
    assert Evaluator(tasks, tok, split="search", bootstrap_iters=0).evaluate(model).ci is None


def test_chunked_scores_end_at_full_score(tmp_path, arith, tok, model):
    text = "tasks:" + MC + """
  - {name: gen, kind: generate, data: arith.jsonl, prompt: "Q : {question} =", target: " {answer}", max_new_tokens: 2, weight: 0.5}
  - {name: ll, kind: loglikelihood, data: arith.jsonl, prompt: "Q : {question} = A :", target: " {answer}", metric: perplexity}
"""
    ev = Evaluator(load_tasks(write_yaml(tmp_path / "t.yaml", text)), tok, split="search", batch_size=8)
    full = ev.evaluate(model)
    running = list(ev.evaluate_chunks(model, chunk_size=10))
    total = sum(full.n_examples.values())
    assert total == 72 and len(running) == math.ceil(total / 10)
    assert [seen for seen, _ in running] == [min(10 * (i + 1), total) for i in range(len(running))]
    assert running[-1].aggregate == pytest.approx(full.aggregate, abs=1e-6)
    assert ev.last_result.per_task == pytest.approx(full.per_task, abs=1e-6)
    assert len({round(a, 9) for _, a in running}) > 1  # running scores move


# --- lm-eval adapter ---------------------------------------------------------------------------------


def lm_eval_fixture(tmp_path: Path) -> Path:
    """A local custom lm-eval MC task and loglikelihood task over the same rows, plus our task file."""
    write_jsonl(tmp_path / "arith.jsonl", arith_rows())
    lm_dir = tmp_path / "lm_tasks"
    lm_dir.mkdir()
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'arith.jsonl'}\ntest_split: test\n"
    write_yaml(lm_dir / "mc.yaml", f"""task: toy_mc
{data}output_type: multiple_choice
doc_to_text: "Q : {{{{question}}}} = A :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""")
    write_yaml(lm_dir / "ll.yaml", f"""task: toy_ll
{data}output_type: loglikelihood
doc_to_text: "Q : {{{{question}}}} = A :"
doc_to_target: " {{{{answer}}}}"
target_delimiter: ""
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
""")
    return write_yaml(tmp_path / "tasks.yaml", "tasks:" + MC + """
  - {name: lm_mc, kind: lm_eval, task: toy_mc, include_path: lm_tasks, metric: "acc,none"}
  - {name: lm_ll, kind: lm_eval, task: toy_ll, include_path: lm_tasks, metric: "perplexity,none", limit: 20}
""")


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_lm_eval_live_model_offline_no_stale_cache(tmp_path, tok, model, no_network):
    tasks = load_tasks(lm_eval_fixture(tmp_path))
    live = build_tiny_model(model.config, seed=0).eval()
    ev = Evaluator(tasks, tok, split="search", batch_size=8)
    leaves = [t.lm_eval.leaves[0] for t in ev._tasks[1:]]
    first = ev.evaluate(live)
    assert first.n_examples == {"mc": 24, "lm_mc": 24, "lm_ll": 20}
    # lm-eval and the native scorer see the same docs and prompts, so the accuracies agree
    assert first.per_task["lm_mc"] == pytest.approx(first.per_task["mc"])
    # per-request log-likelihoods agree with the native kernel (same tokenization rule)
    insts = [i for group in ev._tasks[1].lm_eval.instances for i in group]
    reqs = encode_pairs(tok, [i.args for i in insts])
    native = torch.empty(len(reqs))
    with torch.no_grad():
        for b in build_loglik_batches(reqs, range(len(reqs)), batch_size=16, pad_id=0, max_length=128):
            native[b.request_ids] = continuation_logprobs(live, b)
    assert [i.resps[0][0] for i in insts] == pytest.approx(native.tolist(), abs=1e-4)
    assert insts[0].resps[0][0] == pytest.approx(manual_loglik(live, tok, *insts[0].args), abs=1e-4)
    assert first.tasks["lm_ll"].higher_is_better is False and first.per_task["lm_ll"] > 1

    again = ev.evaluate(live)
    assert again.per_task == first.per_task
    assert [t.lm_eval.leaves[0] for t in ev._tasks[1:]] == leaves  # loaded tasks are reused
    lm = ev._hflm[1]
    assert lm.cache_hook.dbdict is None  # no lm-eval response cache attached

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    changed = ev.evaluate(live)
    assert ev._hflm[1] is lm  # same live model object: wrapper reused, weights read afresh
    assert changed.per_task["lm_ll"] != pytest.approx(first.per_task["lm_ll"], rel=1e-3)
    fresh = Evaluator(tasks, tok, split="search", batch_size=8).evaluate(live)
    assert changed.per_task == pytest.approx(fresh.per_task, rel=1e-6)  # no stale responses

    chunks = list(ev.evaluate_chunks(live, chunk_size=16))
    assert chunks[-1].examples_seen == 68
    assert ev.last_result.per_task == pytest.approx(changed.per_task, rel=1e-6)


def test_lm_eval_split_names_and_errors(tmp_path, tok, model, no_network):
    rows = arith_rows(30)
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows[i * 10:(i + 1) * 10]) for i, s in enumerate(SPLITS)}
    files["dup"] = write_jsonl(tmp_path / "dup.jsonl", rows[:3])
    data_files = "".join(f"    {k}: {v}\n" for k, v in files.items())
    write_yaml(lm_dir / "three.yaml", f"""task: toy_three
dataset_path: json
dataset_kwargs:
  data_files:
{data_files}test_split: test
output_type: multiple_choice
doc_to_text: "Q : {{{{question}}}} = A :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc}}
""")

    def spec(**extra):
        base = {"name": "x", "kind": "lm_eval", "task": "toy_three", "include_path": str(lm_dir), "metric": "acc,none"}
        return load_tasks({"tasks": [{**base, **extra}]})

    names = {"search": "search", "validation": "validation", "test": "test"}
    ev = Evaluator(spec(split_names=names), tok, split="validation")
    assert ev.n_examples == {"x": 10}
    docs = [d["question"] for _, d in ev._tasks[0].lm_eval.units]
    assert docs == [r["question"] for r in rows[10:20]]

    shots = Evaluator(spec(split_names=names, num_fewshot=2), tok, split="search")._tasks[0].lm_eval
    contexts = [group[0].args[0] for group in shots.instances]
    assert all(c.count("Q :") == 3 for c in contexts)  # two few-shot examples + the question

    with pytest.raises(TaskError, match=r"identical|same example") as e:
        Evaluator(spec(split_names={**names, "validation": "dup"}), tok, split="search")
    assert "dup[0]" in str(e.value) and "search[0]" in str(e.value)
    with pytest.raises(TaskError, match=r"dataset has no split 'nope'"):
        Evaluator(spec(split_names={**names, "test": "nope"}), tok)
    with pytest.raises(TaskError, match=r"has no metric 'f1,none'; it has: acc,none"):
        Evaluator(spec(metric="f1,none"), tok)
    with pytest.raises(TaskError, match=r"unknown lm-eval task 'no_such_task'"):
        Evaluator(spec(task="no_such_task"), tok)
    with pytest.raises(TaskError, match=r"include_path .*missing.* is not a directory"):
        spec(include_path=str(tmp_path / "missing"))
    with pytest.raises(TaskError, match=r"three different lm-eval splits"):
        spec(split_names={**names, "test": "search"})


# --- model directory, table ---------------------------------------------------------------------------


def test_evaluate_model_dir_and_table(tmp_path, arith, tok, model):
    from rich.console import Console

    model_dir = save_model(model, tok, tmp_path / "model")
    tasks_path = write_yaml(tmp_path / "t.yaml", "tasks:" + MC)
    out = tmp_path / "out" / "res.json"
    res = evaluate_model_dir(model_dir, tasks_path, split="test", device="cpu", batch_size=4, out_json=out)
    ref = Evaluator(load_tasks(tasks_path), tok, split="test").evaluate(model)
    assert res.per_task == ref.per_task and res.split == "test"
    saved = json.loads(out.read_text())
    assert saved["aggregate"] == res.aggregate and saved["tasks"]["mc"]["n_examples"] == 12
    console = Console(record=True, width=150)
    console.print(render_table(res))
    text = console.export_text()
    assert "mc" in text and "aggregate" in text and f"{res.aggregate:.4f}" in text


# --- bad input -----------------------------------------------------------------------------------------


def bad(tmp_path: Path, text: str, match: str):
    with pytest.raises(TaskError, match=match):
        load_tasks(write_yaml(tmp_path / "t.yaml", text))


def test_bad_input_files_and_lines(tmp_path, arith):
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "nope.jsonl"), r"nope\.jsonl: file not found")
    lines = arith.read_text().splitlines()
    write_jsonl(tmp_path / "broken.jsonl", [])
    (tmp_path / "broken.jsonl").write_text("\n".join(lines[:2] + ['{"question": "1 + 2", '] + lines[3:]) + "\n")
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "broken.jsonl"), r"broken\.jsonl:3: malformed JSON")
    (tmp_path / "list.jsonl").write_text(lines[0] + "\n[1, 2]\n")
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "list.jsonl"), r"list\.jsonl:2: expected a JSON object")
    rows = arith_rows()
    del rows[4]["question"]
    write_jsonl(tmp_path / "miss.jsonl", rows)
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "miss.jsonl"),
        r"miss\.jsonl:5: field 'question' used by the `prompt` template is missing")
    rows = arith_rows()
    rows[0]["label"] = 3
    write_jsonl(tmp_path / "label.jsonl", rows)
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "label.jsonl"), r"label\.jsonl:1: label 3 is out of range for 3 choices")
    rows[0]["label"] = "0"
    write_jsonl(tmp_path / "label.jsonl", rows)
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "label.jsonl"), r"label\.jsonl:1: `label` .* must be an integer")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "empty.jsonl"), r"empty\.jsonl: no examples")
    write_jsonl(tmp_path / "tiny.jsonl", arith_rows(3))
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "tiny.jsonl").replace("metric: acc", "metric: acc\n    split: {search: 0.8, validation: 0.1, test: 0.1}"),
        r"split 'validation' is empty")


def test_bad_input_overlapping_splits(tmp_path):
    rows = arith_rows(30)
    write_jsonl(tmp_path / "search.jsonl", rows[:10])
    write_jsonl(tmp_path / "validation.jsonl", rows[10:20])
    write_jsonl(tmp_path / "test.jsonl", rows[20:] + [rows[3]])
    text = "tasks:" + MC.replace("data: arith.jsonl", "splits: {search: search.jsonl, validation: validation.jsonl, test: test.jsonl}")
    with pytest.raises(TaskError) as e:
        load_tasks(write_yaml(tmp_path / "t.yaml", text))
    msg = str(e.value)
    assert "overlap" in msg and "search.jsonl:4 (search)" in msg and "test.jsonl:11 (test)" in msg
    # duplicate lines in one file that the split separates are caught too
    write_jsonl(tmp_path / "dups.jsonl", rows + rows[:5])
    bad(tmp_path, "tasks:" + MC.replace("arith.jsonl", "dups.jsonl"), r"splits overlap: .*dups\.jsonl:\d+ \(\w+\) and .*dups\.jsonl:\d+ \(\w+\)")


def test_bad_input_spec_keys(tmp_path, arith):
    bad(tmp_path, "tasks:" + MC.replace("metric: acc", "metric: f1"), r"tasks\[0\] \('mc'\): unknown metric 'f1'; expected 'acc' or 'acc_norm'")
    bad(tmp_path, "tasks:" + MC.replace("kind: multiple_choice", "kind: classify"), r"unknown kind 'classify'; expected one of")
    bad(tmp_path, "tasks:" + MC.replace("prompt:", "promt:"), r"t\.yaml: tasks\[0\] \('mc'\): unknown key 'promt'")
    bad(tmp_path, "tasks:" + MC.replace("prompt:", "promt:"), r"missing required key 'prompt'")
    bad(tmp_path, "tasks:" + MC.replace("metric: acc", "metric: acc\n    split: {search: 0.5, validation: 0.3, test: 0.3}"),
        r"split: split fractions must sum to 1, got 1\.1")
    bad(tmp_path, "tasks:" + MC.replace("metric: acc", "metric: acc\n    weight: '2'"), r"weight: Input should be a valid number")
    bad(tmp_path, "tasks:" + MC + MC, r"task names must be unique; 'mc' appears 2 times")
    bad(tmp_path, "tasks:" + MC.replace("{question}", "{}"), r"bad `prompt` template: positional field")
    bad(tmp_path, "tasks:" + MC.replace("{question}", "{question"), r"bad `prompt` template")
    bad(tmp_path, "tasks:" + MC.replace("metric: acc", "metric: acc\n    choice: ' x'"), r"must contain \{choice\}")
    bad(tmp_path, "tasks:" + MC.replace("data: arith.jsonl", ""), r"give `data` .* or `splits`")
    bad(tmp_path, "tasks:\n  - {name: g, kind: generate, data: arith.jsonl, prompt: 'Q'}", r"missing required key 'target'")
    bad(tmp_path, "tasks:\n  - {name: l, kind: loglikelihood, data: arith.jsonl, prompt: 'Q', target: ' {answer}', metric: perplexity, higher_is_better: true}",
        r"lower-is-better; higher_is_better: True contradicts it")
    bad(tmp_path, "tasks:\n  - {name: l, kind: lm_eval, task: x}", r"missing required key 'metric'")
    bad(tmp_path, "- 1\n- 2\n", r"tasks\[0\]")
    bad(tmp_path, "tasks: [", r"invalid YAML")
    with pytest.raises(TaskError, match=r"task file not found"):
        load_tasks(tmp_path / "absent.yaml")
    # a single task mapping is accepted too, and its errors name it as "task"
    assert load_tasks(write_yaml(tmp_path / "one.yaml", MC.replace("  - name", "name").replace("\n    ", "\n")))[0].name == "mc"
    bad(tmp_path, MC.replace("  - name", "name").replace("\n    ", "\n").replace("metric: acc", "metric: bleu"), r"t\.yaml: task \('mc'\): unknown metric 'bleu'")
