"""The ``moe`` search-space kind of ``evomerge search``: a search, its finalize and export, bad spaces."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml

from evomerge.search.space import SpaceError, load_space

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
IDS = torch.tensor([[5, 40, 41, 42, 60, 61, 7, 8]])
SPACE = {"kind": "moe", "gate_modes": ["random", "router_input_mean", "supervised"], "experts_per_token": [1, 2],
         "train_steps": [0, 5]}


def run_config(zoo, out: Path, trials: int) -> dict:
    return {"name": "moe", "base_model": str(zoo.base), "models": {k: str(v) for k, v in zoo.experts.items()},
            "tasks": str(zoo.tasks_yaml), "search_space": SPACE, "budget": {"trials": trials},
            "sampler": {"name": "tpe"}, "pruner": {"name": "none"}, "search_metric": "proxy",
            "output_dir": str(out), "device": "cpu", "top_k": 2}


@pytest.fixture(scope="module")
def moe_run(tiny_zoo, tmp_path_factory):
    """A short TPE moe search on the tiny zoo (first trial: random routers, top-1), finalized with its export."""
    from evomerge.search.config import load_config
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    tmp = tmp_path_factory.mktemp("moe_search")
    (tmp / "run.yaml").write_text(yaml.safe_dump(run_config(tiny_zoo, tmp / "run", 8)))
    run = SearchRun(load_config(tmp / "run.yaml"))
    run.run()
    return run, finalize(run, log=lambda m: None), tmp


def test_moe_search_beats_its_first_trial(moe_run):
    run, summary, _ = moe_run
    trials = run.study.get_trials(deepcopy=False)
    first = yaml.safe_load(trials[0].user_attrs["recipe"])
    assert trials[0].user_attrs.get("default") is True
    assert first["gate_mode"] == "random" and first["experts_per_token"] == 1 and not first["non_expert_weights"]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8
    assert max(t.value for t in complete) > trials[0].value + 0.1
    labels = [r.label for r in summary.rows]
    assert labels[0].startswith("winner") and "base" in labels
    assert {f"fine-tune: {name}" for name in run.inputs.models} <= set(labels)
    assert "regmean defaults (no search)" in labels  # dense method baselines beside the MoE


def test_exported_moe_reloads_to_the_candidates_logits_and_its_config_rebuilds_it(moe_run):
    from transformers import AutoModelForCausalLM

    from evomerge.moe import build_moe

    run, summary, tmp = moe_run
    winner = next(t for t in run.study.get_trials(deepcopy=False) if t.number == summary.winner_trial)
    run.builder.build(run.space.load_candidate(winner.user_attrs["recipe"]))
    written = AutoModelForCausalLM.from_pretrained(run.out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        live = run.builder.model(IDS).logits
        assert (written(IDS).logits - live).abs().max().item() < 1e-5
    assert type(written).__name__ == "MixtralForCausalLM"
    config = yaml.safe_load((run.out / "best_moe.yaml").read_text())
    assert config["gate_mode"] == yaml.safe_load(winner.user_attrs["recipe"])["gate_mode"]
    rebuilt = build_moe(run.out / "best_moe.yaml", tmp / "rebuilt")  # `evomerge moe best_moe.yaml OUT`
    again = AutoModelForCausalLM.from_pretrained(rebuilt, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(IDS).logits - live).abs().max().item() < 1e-4
    card = (run.out / "merged" / "README.md").read_text()
    assert "winner (trial" in card and "| base |" in card
    from evomerge.search.export import export_trial

    with pytest.raises(ValueError, match="is an MoE candidate"):  # `evomerge export` re-exports merge recipes
        export_trial(run.out, tmp / "exported", trial=0)
    assert not (tmp / "exported").exists()


def test_a_resumed_moe_search_finishes_a_larger_budget(moe_run, tiny_zoo):
    from evomerge.search.config import load_config
    from evomerge.search.run import SearchRun

    run, _, tmp = moe_run
    (tmp / "more.yaml").write_text(yaml.safe_dump(run_config(tiny_zoo, tmp / "run", 10)))
    again = SearchRun(load_config(tmp / "more.yaml"))
    assert len(again.run().trials) == 2
    assert len(again.study.get_trials(deepcopy=False)) == 10


@pytest.mark.parametrize("extra, pattern", [
    ({"gate_mode": ["zero"]}, r"unknown key 'gate_mode'"),
    ({"experts_per_token": [1, 4]}, r"experts_per_token: \[4\] outside 1\.\.3"),
    ({"gate_modes": ["hiden"]}, r"gate_modes\[0\]: .*got .hiden."),
    ({"train": {"steps": 5}}, r"train\.steps are searched in an moe space"),
    ({"expert_tasks": {"ft9": ["rev"]}}, r"expert_tasks\.ft9: not one of the run's models"),
    ({"architecture": "qwen"}, r"architecture: 'qwen' cannot be built from llama experts"),
])
def test_bad_moe_spaces_fail_before_any_weight_is_read(llama_family, extra, pattern, monkeypatch, tmp_path):
    import evomerge.checkpoint as ck

    monkeypatch.setattr(ck.ModelReader, "get_tensor", lambda *a, **k: pytest.fail("a weight was read"))
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"kind": "moe", **extra}))
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    with pytest.raises(SpaceError, match=pattern) as err:
        load_space(path).bind(str(llama_family["base"]), models, str(path))
    assert "space.yaml" in str(err.value)


def test_the_shipped_moe_space_binds_to_the_zoo(tiny_zoo):
    space = load_space(SPACES / "moe_small.yaml").bind(str(tiny_zoo.base), {k: str(v) for k, v in tiny_zoo.experts.items()})
    point = space.default_point()
    assert set(space.distributions()) == set(point)
    candidate = space.to_recipe(point)
    assert (candidate.gate_mode, candidate.experts_per_token, candidate.train_steps) == ("zero", 1, 0)
    assert len(space.anchor_points()) == len(space.gate_modes)
