"""The short targeted fine-tune: selection by patterns and layers, frozen tensors untouched, atomic output."""

from __future__ import annotations

import pytest
import torch

from evomerge.finetune import finetune_and_report, select_trainable
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
    assert set(res.before.per_task) == set(res.after.per_task) == {t.name for t in load_tasks(tiny_zoo.tasks_yaml)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ft.tmp")]


def test_finetune_selection_matching_nothing_is_an_error(tiny_zoo, tmp_path):
    from evomerge.evaluate import load_tasks

    cfg = Finetune(steps=2, train=["*.no_such_tensor.*"])
    with pytest.raises(ValueError, match="no parameter matches"):
        finetune_and_report(tiny_zoo.base, tmp_path / "ft", cfg, tasks=load_tasks(tiny_zoo.tasks_yaml), device="cpu")
    assert not (tmp_path / "ft").exists()
