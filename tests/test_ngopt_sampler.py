"""nevergrad's NGOpt as an Optuna sampler: it optimizes, learns from trials it did not ask for (anchors,
other workers, a resumed run), and runs an evomerge search from a run config."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.search.ngopt_sampler import NGOptSampler, from_unit, to_unit

pytest.importorskip("nevergrad")
optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
TARGET = {"a": 0.3, "b": 1.7, "c": -0.4, "d": 0.02, "e": 0.9, "f": 1.2}


def _objective(trial: optuna.Trial) -> float:
    x = {"a": trial.suggest_float("a", 0, 1), "b": trial.suggest_float("b", 0, 2),
         "c": trial.suggest_float("c", -1, 1), "d": trial.suggest_float("d", 1e-3, 1, log=True),
         "e": trial.suggest_float("e", 0, 2), "f": trial.suggest_float("f", 0, 2)}
    return -sum((x[k] - v) ** 2 if k != "d" else (math.log10(x[k]) - math.log10(v)) ** 2 for k, v in TARGET.items())


def test_unit_mapping_round_trips_linear_and_log_ranges():
    lin, log = optuna.distributions.FloatDistribution(-1, 3), optuna.distributions.FloatDistribution(1e-3, 10, log=True)
    for v in (-1, 0.25, 3):
        assert from_unit(to_unit(v, lin), lin) == pytest.approx(v)
    assert to_unit(0.1, log) == pytest.approx(0.5)
    assert from_unit(1.5, log) == 10 and from_unit(-0.2, lin) == -1  # clipped to the range


def test_ngopt_finds_the_optimum_that_random_search_misses():
    best = {}
    for name, sampler in [("ngopt", NGOptSampler(seed=0, budget=150)), ("random", optuna.samplers.RandomSampler(0))]:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(_objective, n_trials=150)
        best[name] = study.best_value
    assert best["ngopt"] > -0.01, best
    assert best["ngopt"] > best["random"] + 0.05, best


def test_a_new_sampler_learns_every_finished_trial_of_the_study(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    first = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                sampler=NGOptSampler(seed=0, budget=40))
    first.enqueue_trial({k: 0.5 for k in "abcef"} | {"d": 0.1})  # an anchor: not asked of the optimizer
    first.optimize(_objective, n_trials=20)
    resumed = NGOptSampler(seed=1, budget=40)
    second = optuna.load_study(study_name="s", storage=storage, sampler=resumed)
    second.optimize(_objective, n_trials=1)
    assert resumed.n_told == 20  # the anchor and the first sampler's 19 trials, told as points
    assert second.best_value >= first.best_value


def test_an_evomerge_search_runs_with_ngopt(tiny_zoo, tmp_path):
    from evomerge.search.config import ConfigError, load_config
    from evomerge.search.run import SearchRun

    cfg = {"name": "ng", "base_model": str(tiny_zoo.base), "models": {k: str(v) for k, v in tiny_zoo.experts.items()},
           "tasks": str(tiny_zoo.tasks_yaml), "search_space": str(SPACES / "ties_per_model.yaml"),
           "budget": {"trials": 10}, "sampler": {"name": "ngopt"}, "pruner": {"name": "none"},
           "output_dir": str(tmp_path / "run"), "device": "cpu", "top_k": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = SearchRun(load_config(path))
    run.run()
    trials = run.study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 10 and len({tuple(sorted(t.params.items())) for t in trials}) == 10
    assert run.study.best_value >= trials[0].value  # never worse than the first (default) trial
    run.builder.close()
    path.write_text(yaml.safe_dump({**cfg, "sampler": {"name": "ngopt", "popsize": 4}}))
    with pytest.raises(ConfigError, match="popsize"):
        load_config(path)
