"""The demo zoo: a real tiny build (once per module), its files, specialization, determinism, cache."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate import Evaluator, load_tasks
from evomerge.zoo import (
    FAMILIES,
    MARKER_NAME,
    SIZES,
    build_zoo,
    default_zoo_dir,
    finetune,
    load_zoo,
    make_zoo_data,
    write_zoo_data,
)

TINY = SIZES["tiny"]


class Interrupt(Exception):
    """Raised from a progress callback to interrupt a build."""


def interrupt_at(prefix: str):
    """A progress callback that raises Interrupt at the first line starting with `prefix`."""

    def callback(line: str) -> None:
        if line.startswith(prefix):
            raise Interrupt(line)

    return callback


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    lines: list[str] = []
    built = build_zoo(root, size="tiny", seed=0, progress=lines.append)  # ~30 s on 2 cores
    assert any(line.startswith("[zoo] built in") for line in lines)
    return built


@pytest.fixture(scope="module")
def test_scores(zoo):
    """Test-split per-task scores of base, experts and multitask, measured here (not by the build)."""
    tok = AutoTokenizer.from_pretrained(zoo.base)
    ev = Evaluator(zoo.tasks_yaml, tok, split="test", batch_size=64, bootstrap_iters=0)
    models = {"base": zoo.base, **{f"expert:{n}": p for n, p in zoo.experts.items()}, "multitask": zoo.multitask}
    return {label: ev.evaluate(AutoModelForCausalLM.from_pretrained(path).eval()).per_task
            for label, path in models.items()}


def test_layout_and_checkpoints_load(zoo):
    assert zoo.root.is_dir() and (zoo.root / MARKER_NAME).is_file()
    assert sorted(zoo.experts) == sorted(TINY.families)
    assert not [p for p in zoo.root.parent.iterdir() if ".building-" in p.name], "temp dir left behind"
    tok = AutoTokenizer.from_pretrained(zoo.base)
    prompt = "rev a b c ="
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 5
    for path in [zoo.base, *zoo.experts.values(), zoo.multitask]:
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama"
        assert model.config.hidden_size == TINY.hidden_size
        assert model.config.num_hidden_layers == TINY.num_layers
        assert next(model.parameters()).dtype == torch.float32
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tok.get_vocab()
    # fine-tuning moved the weights away from the base, but only refined them (small task vectors)
    base = load_file(zoo.base / "model.safetensors")
    for name, path in zoo.experts.items():
        expert = load_file(path / "model.safetensors")
        rel = (sum((expert[k] - base[k]).norm() ** 2 for k in base) / sum(base[k].norm() ** 2 for k in base)) ** 0.5
        assert 0.02 < rel < 0.2, f"expert {name}: task vector is {rel:.4f} of the base's norm"


def test_task_yamls_load_with_evaluate(zoo):
    tasks = load_tasks(zoo.tasks_yaml)
    assert [t.name for t in tasks] == list(TINY.families)
    sizes = {"search": TINY.n_search, "validation": TINY.n_validation, "test": TINY.n_test}
    for task in tasks:
        assert task.kind == FAMILIES[task.name].spec["kind"]
        for split, n in sizes.items():
            assert len(task.examples(split)) == n
        prompts = {s: {e.prompt for e in task.examples(s)} for s in sizes}
        assert not prompts["search"] & prompts["test"] and not prompts["validation"] & prompts["test"]
        train = [json.loads(line) for line in (zoo.data_dir / f"{task.name}_train.jsonl").open()]
        train_prompts = {FAMILIES[task.name].key(row) for row in train}
        assert len(train) == TINY.n_train and not train_prompts & prompts["test"]
    for name, path in zoo.task_yamls.items():
        (single,) = load_tasks(path)
        assert single.name == name
        assert [e.prompt for e in single.examples("test")] == [
            e.prompt for e in next(t for t in tasks if t.name == name).examples("test")
        ]


def test_base_has_partial_skill_experts_specialize_and_multitask_covers_all(zoo, test_scores):
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    chance = {t: 0.5 if FAMILIES[t].spec["kind"] == "multiple_choice" else 0.0 for t in TINY.families}
    base = test_scores["base"]
    # pre-training saw a little task data: the base is clearly above chance, but masters nothing
    assert mean(base) >= mean(chance) + 0.1, base
    assert max(base.values()) <= 0.9, base
    for name in TINY.families:
        own = test_scores[f"expert:{name}"]
        assert own[name] >= 0.9, (name, own)
        # the expert removes at least half of the base's remaining error on its task
        assert own[name] - base[name] >= 0.5 * (1 - base[name]), (name, own, base)
        for other in TINY.families:
            if other == name:
                continue
            theirs = test_scores[f"expert:{other}"][name]
            assert own[name] >= theirs + 0.15, (name, other, own[name], theirs)
            # training on one task does not teach the others
            assert own[other] <= base[other] + 0.1, (name, other, own[other], base[other])
    multi = test_scores["multitask"]
    assert min(multi.values()) >= 0.75, multi
    assert mean(multi) >= max(mean(test_scores[f"expert:{n}"]) for n in TINY.families) + 0.2


def test_report_table_has_default_merges_below_multitask(zoo):
    report = zoo.report
    for row in ["| base |", "| multitask |", "| task_arithmetic (default) |", "| ties (default) |",
                "| dare_ties (default) |", *[f"| expert:{n} |" for n in TINY.families]]:
        assert row in report, row
    scores = json.loads((zoo.root / MARKER_NAME).read_text())["scores"]
    multi = scores["multitask"]["mean"]
    for method in ["task_arithmetic", "ties", "dare_ties"]:
        assert scores[f"{method} (default)"]["mean"] <= multi - 0.15, (method, scores)


def test_data_and_finetune_are_deterministic(zoo, tmp_path):
    again = tmp_path / "again"
    write_zoo_data(make_zoo_data("tiny", 0), again)
    assert sorted(p.name for p in zoo.data_dir.iterdir()) == sorted(p.name for p in (again / "data").iterdir())
    for p in sorted(zoo.data_dir.iterdir()):
        assert filecmp.cmp(p, again / "data" / p.name, shallow=False), p.name
    assert filecmp.cmp(zoo.tasks_yaml, again / "tasks.yaml", shallow=False)
    other = tmp_path / "seed1"
    write_zoo_data(make_zoo_data("tiny", 1), other)
    assert not filecmp.cmp(zoo.data_dir / "map_test.jsonl", other / "data" / "map_test.jsonl", shallow=False)

    # re-running the expert fine-tune from the saved base gives bit-identical weights
    base = AutoModelForCausalLM.from_pretrained(zoo.base)
    tok = AutoTokenizer.from_pretrained(zoo.base)
    expert = finetune(base, ["map"], "tiny", 0, tokenizer=tok)
    saved = load_file(zoo.experts["map"] / "model.safetensors")
    fresh = expert.state_dict()
    assert set(saved) <= set(fresh)
    for k, v in saved.items():
        assert torch.equal(fresh[k], v), k


def test_cache_hit_returns_at_once(zoo):
    marker = zoo.root / MARKER_NAME
    before = marker.stat().st_mtime_ns
    lines: list[str] = []
    start = time.perf_counter()
    again = build_zoo(zoo.root, size="tiny", seed=0, progress=lines.append)
    assert time.perf_counter() - start < 1.0
    assert again == zoo and lines == [] and marker.stat().st_mtime_ns == before
    assert load_zoo(zoo.root) == zoo


def test_interrupted_build_leaves_nothing(tmp_path):
    root = tmp_path / "zoo"
    with pytest.raises(Interrupt):
        build_zoo(root, size="tiny", progress=interrupt_at("[zoo] base:"))  # after the data is written
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rebuild_keeps_the_old_zoo_and_incomplete_zoos_are_rebuilt(zoo, tmp_path):
    # a forced rebuild that fails leaves the complete zoo untouched
    marker = (zoo.root / MARKER_NAME).read_bytes()
    with pytest.raises(Interrupt):
        build_zoo(zoo.root, size="tiny", force=True, progress=interrupt_at("[zoo] base:"))
    assert (zoo.root / MARKER_NAME).read_bytes() == marker and load_zoo(zoo.root) == zoo
    assert not [p for p in zoo.root.parent.iterdir() if ".building-" in p.name]

    # a zoo built with another seed, another zoo version or without its marker is rebuilt, not reused
    copy = tmp_path / "copy"
    shutil.copytree(zoo.root, copy)
    with pytest.raises(Interrupt):
        build_zoo(copy, size="tiny", seed=1, progress=interrupt_at("[zoo] building"))
    info = json.loads((copy / MARKER_NAME).read_text())
    for stale in [{**info, "version": info["version"] + 1}, {**info, "spec": {**info["spec"], "base_steps": 1}}]:
        (copy / MARKER_NAME).write_text(json.dumps(stale))
        assert load_zoo(copy) is None
        with pytest.raises(Interrupt):
            build_zoo(copy, size="tiny", seed=0, progress=interrupt_at("[zoo] building"))
    (copy / MARKER_NAME).unlink()
    assert load_zoo(copy) is None
    with pytest.raises(Interrupt):
        build_zoo(copy, size="tiny", seed=0, progress=interrupt_at("[zoo] building"))
    assert (copy / "experts").is_dir()  # untouched until a new build completes


def test_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an evomerge zoo"):
        build_zoo(tmp_path / "mine", size="tiny", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown zoo size 'huge'"):
        build_zoo(tmp_path / "x", size="huge", progress=False)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build_zoo(tmp_path / "x", size="tiny", seed=-1, progress=False)
    assert not (tmp_path / "x").exists()


def test_default_zoo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    assert default_zoo_dir("small", 3) == tmp_path / "zoo" / "small-seed3"
    monkeypatch.delenv("EVOMERGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_zoo_dir("tiny", 0) == tmp_path / "xdg" / "evomerge" / "zoo" / "tiny-seed0"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_zoo_dir() == Path(os.path.expanduser("~")) / ".cache" / "evomerge" / "zoo" / "small-seed0"
