"""The short targeted fine-tune: selection by patterns and layers, frozen tensors untouched, atomic output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.finetune import REPORT_NAME, finetune_and_report, select_trainable
from evomerge.search.config import Finetune
from tests.conftest import read_weights


def test_select_trainable_by_pattern_and_layers():
    names = [f"model.layers.{i}.{part}.weight" for i in range(4) for part in ("mlp.up_proj", "self_attn.q_proj")]
    names += ["model.embed_tokens.weight", "lm_head.weight"]
    assert select_trainable(names, ["*.mlp.*"], (2, 4)) == ["model.layers.2.mlp.up_proj.weight",
                                                            "model.layers.3.mlp.up_proj.weight"]
    assert select_trainable(names, ["lm_head.*", "*.q_proj.*"], None) == [
        *[f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)], "lm_head.weight"]
    assert select_trainable(names, ["*"], (0, 1)) == ["model.layers.0.mlp.up_proj.weight",
                                                      "model.layers.0.self_attn.q_proj.weight"]


def test_finetune_trains_only_the_selection(tiny_zoo, tmp_path):
    from evomerge.evaluate import load_tasks

    model_dir = tiny_zoo.experts["map"]
    cfg = Finetune(steps=8, lr=1e-3, batch_size=8, train=["*.mlp.*"], layers=(1, 2))
    res = finetune_and_report(model_dir, tmp_path / "ft", cfg, tasks=load_tasks(tiny_zoo.tasks_yaml),
                              device="cpu")
    assert res.trainable and all(".layers.1.mlp." in n for n in res.trainable)
    assert len(res.losses) == 8 and all(torch.isfinite(torch.tensor(res.losses)))
    before, after = read_weights(model_dir), read_weights(tmp_path / "ft")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(res.trainable)
    tasks = {t.name for t in load_tasks(tiny_zoo.tasks_yaml)}
    assert set(res.before.per_task) == set(res.after.per_task) == tasks
    assert res.sources == {t: "train" for t in tasks}  # the zoo's tasks list the split its models trained on
    report = (tmp_path / "ft" / REPORT_NAME).read_text()
    assert "1 tensors" not in report and f"{len(res.trainable)} tensors matching `*.mlp.*`, layers [1, 2)" in report
    assert f"| after | {res.after.aggregate:.3f} |" in report and "(train split)" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ft.tmp")]
    # the card: evomerge's tags, the model-index with the test scores after fine-tuning, what was trained
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "ft" / "README.md")
    assert "evomerge" in card.data.tags and "mergekit" not in card.data.tags
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == {
        t: round(v, 4) for t, v in res.after.per_task.items()}
    assert "8 AdamW steps" in card.text and "| before fine-tuning |" in card.text


def test_training_examples_come_from_the_train_split_else_search(tiny_zoo, tmp_path):
    """A task with a `train:` file trains on it; one without trains on its search split; neither is ever
    validation or test. A train file overlapping an evaluation split is an error naming both lines."""
    from evomerge.evaluate import TaskError, load_tasks
    from evomerge.finetune import training_pairs

    doc = yaml.safe_load(tiny_zoo.tasks_yaml.read_text())
    for task in doc["tasks"]:
        task["splits"] = {k: str(tiny_zoo.tasks_yaml.parent / v) for k, v in task["splits"].items()}
    first, second = doc["tasks"][0], doc["tasks"][1]
    del second["splits"]["train"]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(doc))
    specs = load_tasks(tmp_path / "tasks.yaml")
    pairs, sources = training_pairs(specs)
    assert sources[first["name"]] == "train" and sources[second["name"]] == "search"
    expected = [(e.prompt, e.continuations[e.label]) for spec in specs
                for e in spec.examples("train" if spec.has_split("train") else "search")]
    assert pairs == expected
    evaluation = {e.prompt for spec in specs for split in ("validation", "test") for e in spec.examples(split)}
    assert not {prompt for prompt, _ in pairs} & evaluation

    train = Path(first["splits"]["train"])
    leaked = tmp_path / "leaked_train.jsonl"
    leaked.write_text(train.read_text() + Path(first["splits"]["test"]).read_text().splitlines(keepends=True)[0])
    first["splits"]["train"] = str(leaked)
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(TaskError, match=r"splits overlap: .*_test.jsonl:1 \(test\) and .*leaked_train.jsonl:\d+ \(train\)"):
        load_tasks(tmp_path / "tasks.yaml")


def test_finetune_selection_matching_nothing_is_an_error(tiny_zoo, tmp_path):
    from evomerge.evaluate import load_tasks

    cfg = Finetune(steps=2, train=["*.no_such_tensor.*"])
    with pytest.raises(ValueError, match="no parameter matches"):
        finetune_and_report(tiny_zoo.base, tmp_path / "ft", cfg, tasks=load_tasks(tiny_zoo.tasks_yaml), device="cpu")
    assert not (tmp_path / "ft").exists()
