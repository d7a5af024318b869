"""evomerge search end to end on the tiny zoo: spaces, configs, builder parity, resume, workers, export."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from evomerge.search.config import ConfigError, load_config, parse_duration
from evomerge.search.space import SpaceError, load_space
from tests.conftest import read_weights

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


# --------------------------------------------------------------------------------------- spaces
def test_shipped_spaces_load_and_default_point_decodes():
    for path in sorted(SPACES.glob("*.yaml")):
        space = load_space(path)
        if space.kind in ("dataflow", "moe"):  # bound to real models first: tests/test_dataflow.py, test_moe_search.py
            continue
        names = space.param_names(["a", "b"], 8)
        assert len(names) == len(set(names))
        point = space.default_point(["a", "b"], 8)
        recipe = space.to_recipe(point, base_model="base", models={"a": "A", "b": "B"}, num_layers=8)
        assert recipe.merge_method == space.method
        from evomerge.recipe import validate_recipe
        assert validate_recipe(recipe) == [], path.name


def test_space_granularities_decode_to_gradients_and_filters():
    space = load_space({"method": "ties", "granularity": "block", "block_size": 2, "smooth": False,
                        "attn_mlp": True, "search": {"weight": {"low": 0, "high": 2}, "density": {"low": 0.1, "high": 0.9}}})
    names = space.param_names(["m"], 4)
    assert "weight[m][b1].mlp" in names and "density[m][b0].attn" in names and len(names) == 8
    point = {n: (0.3 if ".mlp" in n else 0.7) + (0.1 if "[b1]" in n else 0) for n in names}
    r = space.to_recipe(point, base_model="B", models={"m": "M"}, num_layers=4)
    w = r.models[0].parameters["weight"]
    assert w[0].filter == "mlp" and w[0].value == [0.3, 0.3, 0.4, 0.4]  # constant within each block
    assert w[1].filter is None and w[1].value == [0.7, 0.7, 0.8, 0.8]
    smooth = load_space({"method": "task_arithmetic", "granularity": "layer",
                         "search": {"weight": {"low": 0, "high": 2}, "lambda": {"low": 0.5, "high": 1.5}}})
    r = smooth.to_recipe(smooth.default_point(["m"], 3), base_model="B", models={"m": "M"}, num_layers=3)
    assert r.models[0].parameters["weight"] == [1.0, 1.0, 1.0] and r.parameters["lambda"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("data, pattern", [
    ({"method": "ties", "search": {"densty": {"low": 0, "high": 1}}}, r"search\.densty: .*did you mean 'density'"),
    ({"method": "ties", "search": {"density": {"low": 0, "high": 1.5}}}, r"search\.density: .*\[0, 1\].*1\.5"),
    ({"method": "ties", "search": {"weight": {"low": 1, "high": 0}}}, r"low \(1\.0\) must be below high"),
    ({"method": "tiez", "search": {"weight": {"low": 0, "high": 1}}}, r"unknown method 'tiez'"),
    ({"method": "ties", "granularity": "row", "search": {"weight": {"low": 0, "high": 1}}}, r"granularity"),
    ({"method": "ties", "search": {"normalize": {"low": 0, "high": 1}}}, r"only weight, density.*fixed"),
    ({"method": "ties", "search": {"weight": {"low": 0, "high": 1}}, "fixd": {}}, r"unknown key 'fixd'"),
])
def test_bad_spaces(data, pattern):
    with pytest.raises(SpaceError, match=pattern):
        load_space(data)


# --------------------------------------------------------------------------------------- configs
def test_duration_parsing():
    assert parse_duration("1h30m") == 5400 and parse_duration("45s") == 45 and parse_duration(90) == 90
    with pytest.raises(ValueError, match="cannot parse duration"):
        parse_duration("8 hours")


@pytest.mark.parametrize("body, pattern", [
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nbudget: {trals: 3}\n", r"unknown key 'budget\.trals'"),
    ("search_space: x.yaml\n", r"without 'zoo:' the config must give base_model, models, tasks"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nobjectives: per_task\n", r"multi-objective.*nsga2"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nobjectives: per_task\nsampler: {name: nsga2}\n"
     "pruner: {name: median}\n", r"pruner: 'median' cannot be used with objectives: per_task"),
    ("zoo: {size: huge}\nsearch_space: x.yaml\n", r"zoo\.size"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nsampler: {name: cma}\n", r"sampler\.name"),
    ("zoo: [\n", r"malformed YAML"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nexport_checkpoint: false\nfinetune: {steps: 2}\n",
     r"finetune: trains the winner's exported checkpoint; it needs export_checkpoint: true"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nsampler: {name: tpe, popsize: 8}\n",
     r"sampler option 'popsize' does not apply to sampler 'tpe' \(only to cmaes / nsga2\)"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nobjectives: per_task\nsampler: {name: nsga2}\nweight_l1: 0.1\n",
     r"weight_l1 penalises the one aggregate search score"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nweight_l1: -1\n", r"weight_l1"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nsampler: {name: tpe, lr_adapt: true}\n",
     r"sampler option 'lr_adapt' does not apply to sampler 'tpe' \(only to cmaes\)"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nsampler: {name: cmaes, lr_adapt: true, separable: true}\n",
     r"lr_adapt and separable cannot be combined"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\nsampler: {name: random, n_startup_trials: 3}\n",
     r"sampler option 'n_startup_trials' does not apply to sampler 'random'"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\npruner: {name: successive_halving, warmup_steps: 2}\n",
     r"pruner option 'warmup_steps' does not apply to pruner 'successive_halving'"),
    ("zoo: {size: tiny}\nsearch_space: x.yaml\npruner: {name: median, percentile: 10}\n",
     r"pruner option 'percentile' does not apply to pruner 'median' \(only to percentile\)"),
])
def test_bad_configs(tmp_path, body, pattern):
    p = tmp_path / "run.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_eta_counts_trials_left_or_time_left_whichever_ends_first():
    from evomerge.search.cli_search import eta_seconds

    assert eta_seconds(100, 40, 2.0, None, 80.0) == 120.0  # 60 trials left at 2 s
    assert eta_seconds(100, 40, 2.0, 150.0, 80.0) == 70.0  # the timeout ends first
    assert eta_seconds(None, 40, 2.0, 3600.0, 600.0) == 3000.0  # a timeout alone
    assert eta_seconds(100, 120, 2.0, None, 10.0) == 0.0  # other workers overshot the budget
    assert eta_seconds(None, 3, 2.0, None, 10.0) is None


def _drive_display(display, outcomes):
    """Feed ``display`` one finished trial per (value, state, first_build) through a real study."""
    from evomerge.search.run import TrialRecord

    study = optuna.create_study(direction="maximize")
    started = time.perf_counter()
    with display:
        for number, (value, state, first) in enumerate(outcomes):
            trial = study.ask()
            if state == "COMPLETE":
                study.tell(trial, value)
            else:
                study.tell(trial, state=getattr(optuna.trial.TrialState, state))
            reason = {"FAIL": "FloatingPointError: NaN", "PRUNED": "pruned"}.get(state, "")
            record = TrialRecord(number, state, value, {}, 20.5 if first else 0.01, 0.02, reason, first)
            display.event("trial", {"record": record, "study": study, "started": started})


OUTCOMES = [(0.5, "COMPLETE", True), (0.7, "COMPLETE", False), (None, "PRUNED", False), (None, "FAIL", False)]


def test_display_prints_trial_of_budget_best_last_score_and_eta_without_a_terminal():
    """Without a TTY the live display prints one plain line per finished trial: i/N, the best so far with its
    trial, the last score (or state and failure reason), merge vs eval seconds (the first build labelled as a
    one-off), time per trial, ETA, pruned and failed counts."""
    import io

    from rich.console import Console

    from evomerge.search.cli_search import Display

    buffer = io.StringIO()
    _drive_display(Display(Console(file=buffer, width=80, force_terminal=False), budget_trials=10, timeout_s=None),
                   OUTCOMES)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4  # one unwrapped line per trial, even on a narrow console
    assert lines[0].startswith("trial 1/10 | best 0.5000 (#0) | last #0 0.5000 | first build 20.5s (one-off: "
                               "compile, plan) + eval 0.02s |")
    assert lines[1].startswith("trial 2/10 | best 0.7000 (#1) | last #1 0.7000 | merge 0.01s + eval 0.02s |")
    assert lines[2].startswith("trial 3/10 | best 0.7000 (#1) | last #2 pruned | merge 0.01s")
    assert lines[3].startswith("trial 4/10 | best 0.7000 (#1) | last #3 fail (FloatingPointError: NaN) |")
    assert lines[3].endswith(" min | pruned 1, failed 1")


def test_display_redraws_one_line_in_a_terminal():
    import io

    from rich.console import Console
    from rich.text import Text

    from evomerge.search.cli_search import Display

    display = Display(Console(file=io.StringIO(), width=300, force_terminal=True), budget_trials=10, timeout_s=None)
    _drive_display(display, OUTCOMES)
    shown = display.live.renderable
    assert isinstance(shown, Text) and "\n" not in shown.plain
    assert shown.plain.startswith("trial 4/10 | best 0.7000 (#1) | last #3 fail")
    # the ETA leaves out the first build's compile: three trials of a few ms, not 20 s
    assert "| ETA 0.0 min |" in shown.plain


def test_config_paths_are_relative_to_the_file_and_command_line_paths_to_the_cwd(tmp_path, monkeypatch):
    """In the file, output_dir and a journal or sqlite storage are relative to the config's folder; the
    same options given on the command line (``overrides``) are relative to the current directory."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    p = tmp_path / "configs" / "run.yaml"
    p.write_text("zoo: {size: tiny}\nsearch_space: x.yaml\noutput_dir: out\nstorage: studies/s.journal\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(p)
    assert cfg.output_dir == str(tmp_path / "configs" / "out")
    assert cfg.storage == f"journal:{tmp_path / 'configs' / 'studies' / 's.journal'}"
    cfg = load_config(p, {"output_dir": "mine", "storage": "sqlite:///db/s.db"})
    assert cfg.output_dir == str(tmp_path / "elsewhere" / "mine")
    assert cfg.storage == f"sqlite:///{tmp_path / 'elsewhere' / 'db' / 's.db'}"
    assert load_config(p, {"storage": "sqlite:////abs/s.db"}).storage == "sqlite:////abs/s.db"


# --------------------------------------------------------------------------------------- end to end
def _config(tmp_path: Path, zoo, **extra) -> Path:
    cfg = {
        "name": "t",
        "base_model": str(zoo.base),
        "models": {k: str(v) for k, v in zoo.experts.items()},
        "tasks": str(zoo.tasks_yaml),
        "reference_model": str(zoo.multitask),
        "search_space": str(SPACES / "ties_per_model.yaml"),
        "budget": {"trials": 10},
        "sampler": {"name": "cmaes", "popsize": 4},
        "pruner": {"name": "none"},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "top_k": 2,
    }
    cfg.update(extra)
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def finished_run(tiny_zoo, tmp_path_factory):
    """One short CMA-ES search on the tiny zoo, finalized."""
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    tmp = tmp_path_factory.mktemp("search")
    cfg = load_config(_config(tmp, tiny_zoo, budget={"trials": 14}))
    run = SearchRun(cfg)
    run.run()
    summary = finalize(run)
    return run, summary


def test_search_improves_on_its_first_trial(finished_run):
    run, summary = finished_run
    trials = run.study.get_trials(deepcopy=False)
    assert len(trials) == 14
    first = trials[0]
    assert first.user_attrs.get("default") is True  # the default recipe is enqueued first
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert max(t.value for t in complete) > first.value


def test_search_outputs(finished_run):
    run, summary = finished_run
    out = run.out
    for f in ("best_recipe.yaml", "trials.csv", "summary.md", "summary.json", "merged/config.json",
              "plots/optimization_history.png", "plots/winner_layers.png", "plots/param_importances.png"):
        assert (out / f).exists(), f
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 14 and rows[0]["default"] == "True"
    # the whole study's time (from what every trial records), not only this process's
    t = summary.timing
    assert t["study_trials"] == 14 and t["study_workers"] == 1
    assert t["study_build_s"] + t["study_first_build_s"] == pytest.approx(sum(float(r["build_s"]) for r in rows),
                                                                          abs=1e-3)
    assert t["study_first_build_s"] == pytest.approx(float(rows[0]["build_s"]), abs=1e-3)  # the one-off compile
    assert t["study_eval_s"] == pytest.approx(sum(float(r["eval_s"]) for r in rows), abs=1e-3)
    assert t["study_build_s"] + t["study_eval_s"] <= t["study_trial_s"] + 1e-3 <= t["study_wall_s"] + 2e-3
    labels = [r.label for r in summary.rows]
    assert labels[0].startswith("winner") and "base" in labels and "multi-task reference" in labels
    assert sum(l.startswith("fine-tune") for l in labels) == len(run.inputs.models)
    assert {"tsv_m defaults (no search)", "iso_cts defaults (no search)", "regmean defaults (no search)"} <= set(labels)
    assert all(r.ci is not None and r.ci[0] <= r.aggregate <= r.ci[1] for r in summary.rows)
    md = (out / "summary.md").read_text()
    assert "merging candidates" in md and "evaluating candidates" in md
    assert "## Where the time went (the whole study)" in md and "14 finished trials by 1 worker process," in md
    assert json.loads((out / "summary.json").read_text())["winner_trial"] == summary.winner_trial


def test_the_winners_card_says_how_it_was_found_with_metadata_the_hub_reads(finished_run):
    """merged/README.md: tags, model-index with the winner's test scores per task (read back by
    huggingface_hub's parser), the search that found it and the test table beside the baselines."""
    from huggingface_hub import ModelCard

    run, summary = finished_run
    card = ModelCard.load(run.out / "merged" / "README.md")
    assert card.data.tags == ["merge", "evomerge", "mergekit"] and card.data.library_name == "transformers"
    winner = summary.rows[0]
    got = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert got == {t: round(v, 4) for t, v in winner.per_task.items()}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert f"trial {summary.winner_trial} won there" in card.text and "sampler `cmaes`" in card.text
    assert f"| {winner.label} | {winner.aggregate:.3f} |" in card.text and "| base |" in card.text
    assert "merge_method: ties" in card.text


def test_push_plan_of_a_run_directory_is_the_winner_at_the_root_and_the_report_beside_it(finished_run):
    """`evomerge push RUN_DIR`: merged/ at the repository's root (from_pretrained loads it), the report, summaries,
    trials and plots under search/; never the study journal or lock files."""
    from evomerge.push import plan_upload

    run, _ = finished_run
    plan = {u.path_in_repo: u.local for u in plan_upload(run.out)}
    assert plan["README.md"] == run.out / "merged" / "README.md" and "model.safetensors" in plan
    assert "mergekit_config.yml" in plan and plan["search/report.html"] == run.out / "report.html"
    for f in ("search/summary.md", "search/trials.csv", "search/best_recipe.yaml",
              "search/plots/optimization_history.png"):
        assert f in plan, f
    assert not [p for p in plan if "journal" in p or "lock" in p or "/." in p or p.startswith(".")]


def test_exported_checkpoint_equals_candidate(finished_run):
    """The merged checkpoint written by the engine equals, bit for bit, the candidate the search scored."""
    from evomerge.recipe import load_recipe

    run, summary = finished_run
    recipe = load_recipe((run.out / "best_recipe.yaml").read_text())
    run.builder.build(recipe)
    live = run.builder.model.state_dict()
    on_disk = read_weights(run.out / "merged")
    assert set(on_disk) <= set(live)
    for k, v in on_disk.items():
        assert torch.equal(v, live[k]), k


def test_mergekit_accepts_exported_recipe(finished_run, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    run, _ = finished_run
    text = (run.out / "best_recipe.yaml").read_text()
    mk_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
           MergeOptions(quiet=True, copy_tokenizer=True))
    theirs = read_weights(tmp_path / "mk")
    ours = read_weights(run.out / "merged")
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


def _random_candidate(space, zoo, models: dict[str, str], *, seed: int, point_seed: int):
    """A builder holding the candidate of a uniformly random point of ``space`` (fields seeded ``seed``),
    and that candidate's recipe."""
    from evomerge.search.builder import CandidateBuilder

    builder = CandidateBuilder(zoo.base, models, method=space.method, device="cpu", seed=seed)
    rng = torch.Generator().manual_seed(point_seed)
    dists = space.distributions(list(models), builder.num_layers)
    point = {k: d.low + (d.high - d.low) * torch.rand(1, generator=rng).item() for k, d in dists.items()}
    recipe = space.to_recipe(point, base_model=str(zoo.base), models=models, num_layers=builder.num_layers,
                             dtype="float32")
    builder.build(recipe)
    return builder, recipe


@pytest.mark.parametrize("space", [
    "ties_per_block_attn_mlp.yaml",  # per-block values, attention and MLP filters
    "ties_per_type.yaml",  # a value per tensor type (q/k/v/o, gate/up/down filters, catch-all) and lambda
    "ties_per_block.yaml",  # smooth: per-block values as gradients over layers
    "task_arithmetic_per_layer.yaml",  # a value per layer, and lambda
    {"method": "breadcrumbs", "granularity": "layer",  # both magnitude bounds, per layer
     "search": {"weight": {"low": 0.0, "high": 2.0, "default": 1.0},
                "density": {"low": 0.3, "high": 0.9, "default": 0.6}, "gamma": {"low": 0.0, "high": 0.2, "default": 0.05}}},
    {"method": "slerp", "granularity": "block", "block_size": 1, "search": {"t": {"low": 0.0, "high": 1.0, "default": 0.5}}},
])
def test_mergekit_merges_searched_recipes_to_the_candidates_tensors(tiny_zoo, tmp_path, space):
    """Recipes as the search decodes them (per-layer lists, per-block gradients, attention / MLP filters)
    go through mergekit 0.1.5 unchanged and give, bit for bit, the candidate the builder made of them."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    space = load_space(SPACES / space if isinstance(space, str) else space)
    models = {k: str(v) for k, v in tiny_zoo.experts.items()}
    if space.method == "slerp":
        models = dict(list(models.items())[:1])  # slerp: the base and one model
    builder, recipe = _random_candidate(space, tiny_zoo, models, seed=0, point_seed=1)
    mk_run(MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml())), str(tmp_path / "mk"),
           MergeOptions(quiet=True))
    theirs, live = read_weights(tmp_path / "mk"), builder.model.state_dict()
    assert theirs and set(theirs) <= set(live)
    for k, v in theirs.items():
        assert torch.equal(v, live[k]), k


def test_builder_matches_engine_for_stochastic_methods(tiny_zoo, tmp_path):
    """DARE/DELLA candidates equal the engine's output from the exported recipe with the same seed."""
    from evomerge.engine import run_merge

    models = {k: str(v) for k, v in tiny_zoo.experts.items()}
    for name in ("dare_ties_per_layer.yaml", "della_per_block.yaml", "task_arithmetic_per_layer.yaml"):
        builder, recipe = _random_candidate(load_space(SPACES / name), tiny_zoo, models, seed=5, point_seed=0)
        out = read_weights(run_merge(recipe, tmp_path / name, device="cpu", seed=5))
        live = builder.model.state_dict()
        assert all(torch.equal(v, live[k]) for k, v in out.items()), name


def _cli(args, **kw):
    # one thread per worker process: two cores shared with the test process and other workers (torch's
    # spinning threads slow to a crawl when oversubscribed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal delivers it, even when the tests run in a background job (which ignores SIGINT
    # and passes that on): Python then turns it into KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _study(run_dir: Path):
    from evomerge.search.study import make_storage

    return optuna.load_study(study_name="t", storage=make_storage(None, run_dir))


def _finished_trials_once(proc, run_dir: Path, n: int) -> list:
    """Poll the study of a running ``evomerge search`` until at least ``n`` trials have finished."""
    deadline = time.time() + 240
    done = []
    while time.time() < deadline:
        time.sleep(0.5)
        if (run_dir / "study.journal").exists():
            try:
                s = _study(run_dir)
            except KeyError:
                continue
            done = [t for t in s.get_trials(deepcopy=False) if t.state.is_finished()]
            if len(done) >= n:
                break
        assert proc.poll() is None, proc.stdout.read()
    assert len(done) >= n
    return done


def _resume_and_check(cfg: Path, run_dir: Path, before: list, budget: int, reason: str) -> None:
    """Re-run the command with this budget: every trial finished before the stop is unchanged, the budget
    is finished, and the stopped trial is marked with ``reason`` and not counted."""
    res = _cli(["search", str(cfg), "--no-finalize", "--trials", str(budget)])
    output = res.communicate(timeout=300)[0]
    assert res.returncode == 0, output
    after = _study(run_dir).get_trials(deepcopy=False)
    by_number = {t.number: t for t in after}
    for t in before:
        assert by_number[t.number].state == t.state and by_number[t.number].params == t.params
    counted = [t for t in after if not t.user_attrs.get("interrupted")]
    assert len([t for t in counted if t.state.is_finished()]) == budget
    assert not [t for t in after if not t.state.is_finished()]
    orphans = [t for t in after if t.user_attrs.get("interrupted")]
    assert all(reason in t.user_attrs["fail_reason"] for t in orphans)


def test_sigkill_then_resume_loses_no_finished_trial(tiny_zoo, tmp_path):
    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 12})
    proc = _cli(["search", str(cfg), "--no-finalize"])
    done_before = _finished_trials_once(proc, tmp_path / "run", 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _resume_and_check(cfg, tmp_path / "run", done_before, 12, "worker died")


def test_ctrl_c_marks_the_running_trial_and_stops_cleanly(tiny_zoo, tmp_path):
    """SIGINT (Ctrl-C): the process exits with 130 and says how to resume; no trial is left running, the
    interrupted one is marked and not counted, and re-running finishes the budget."""
    cfg = _config(tmp_path, tiny_zoo, sampler={"name": "random"})
    proc = _cli(["search", str(cfg), "--no-finalize", "--trials", "100000"])  # still running when interrupted
    _finished_trials_once(proc, tmp_path / "run", 3)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    assert "re-run the same command to resume" in output and "Traceback" not in output
    trials = _study(tmp_path / "run").get_trials(deepcopy=False)
    # nothing left RUNNING for the next start to clean up (an enqueued start point may still wait its turn)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) <= 1 and all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted)
    kept = [t for t in trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    _resume_and_check(cfg, tmp_path / "run", kept, len(kept) + 3, "interrupted")


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_share_one_study(tiny_zoo, tmp_path, storage):
    """Two `evomerge search` processes on one storage (the default journal file, or an sqlite database)
    finish the budget together, every trial recorded once."""
    url = f"sqlite:///{tmp_path / 'studies.db'}" if storage == "sqlite" else None
    # enough trials that both processes are past start-up while trials remain
    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 150}, sampler={"name": "random"}, storage=url)
    procs = [_cli(["search", str(cfg), "--no-finalize"]) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = _study(tmp_path / "run") if url is None else optuna.load_study(study_name="t", storage=url)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 150 and all(t.state.is_finished() for t in counted)
    workers = {t.user_attrs.get("worker") for t in counted}
    assert len(workers) == 2  # both processes did work
    from evomerge.search.export import study_timing
    assert study_timing(study)["workers"] == 2  # what summary.md reports
    recipes = [t.user_attrs["recipe"] for t in counted]
    assert len(set(recipes)) == len(recipes)  # every trial recorded once


def test_a_different_search_space_in_the_same_run_directory_is_refused_and_changes_nothing(finished_run, tiny_zoo,
                                                                                          tmp_path):
    """Pointing a config with another search space at a finished run's directory (its study) is an error
    naming the way out, and leaves the run's saved config (which `evomerge export` reads) untouched."""
    from evomerge.search.run import SearchRun

    run, _ = finished_run
    saved = (run.out / "run_config.yaml").read_text()
    before = [(t.number, t.state, t.params) for t in _study(run.out).get_trials(deepcopy=False)]
    other = load_config(_config(tmp_path, tiny_zoo, search_space=str(SPACES / "ties_per_block.yaml"),
                                output_dir=str(run.out), seed=7))
    with pytest.raises(ValueError, match="created with a different search space; use another --study-name"):
        SearchRun(other)
    assert (run.out / "run_config.yaml").read_text() == saved
    assert [(t.number, t.state, t.params) for t in _study(run.out).get_trials(deepcopy=False)] == before


def test_export_command_reexports_a_trial(finished_run, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    run, summary = finished_run
    res = CliRunner().invoke(app, ["export", str(run.out), str(tmp_path / "t3"), "--trial", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    from evomerge.recipe import load_recipe
    t3 = [t for t in run.study.get_trials(deepcopy=False) if t.number == 3][0]
    assert load_recipe((tmp_path / "t3" / "mergekit_config.yml").read_text()) == load_recipe(t3.user_attrs["recipe"])
    assert "Trial 3 of the evomerge search" in (tmp_path / "t3" / "README.md").read_text()
    res = CliRunner().invoke(app, ["export", str(run.out), str(tmp_path / "t99"), "--trial", "99"])
    assert res.exit_code == 2 and "no trial 99" in res.output


def test_search_with_finetune_section_trains_the_winner_and_reports_it(tiny_zoo, tmp_path):
    """`finetune:` in the run config: after the export, the winner's checkpoint is fine-tuned into
    finetuned/ (only the chosen tensors change) and summary.md gains its before/after test table."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 3}, sampler={"name": "random"},
                  finetune={"steps": 3, "batch_size": 8, "lr": 1e-3, "train": ["*.mlp.*"], "layers": [1, 2]})
    res = CliRunner().invoke(app, ["search", str(cfg)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    merged, tuned = read_weights(run / "merged"), read_weights(run / "finetuned")
    changed = {k for k in merged if not torch.equal(merged[k], tuned[k])}
    assert changed and all(".layers.1.mlp." in k for k in changed)
    md = (run / "summary.md").read_text()
    section = md[md.index("## Fine-tune of the winner (`finetuned/`)"):]
    assert "### Test split" in section and "| before |" in section and "| after |" in section
    assert section.strip() == ("## Fine-tune of the winner (`finetuned/`)\n"
                               + (run / "finetuned" / "finetune_report.md").read_text().split("\n", 1)[1]
                               .replace("\n## ", "\n### ")).strip()


def test_failed_candidate_is_recorded_and_search_goes_on(tiny_zoo, tmp_path):
    """A candidate whose build fails (DELLA window violated) is recorded as FAIL with its reason."""
    from evomerge.search.run import SearchRun

    space = {"method": "della", "search": {"density": {"low": 0.05, "high": 0.95, "default": 0.5},
                                           "epsilon": {"low": 0.01, "high": 0.3, "default": 0.1}},
             "fixed": {"weight": 1.0}}
    cfg = load_config(_config(tmp_path, tiny_zoo, search_space=space, budget={"trials": 8},
                              sampler={"name": "random"}))
    run = SearchRun(cfg)
    run.run()
    trials = run.study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(trials) == 8 and failed, "expected some windows outside (0, 1) with these ranges"
    assert all("density ± epsilon" in t.user_attrs["fail_reason"] for t in failed)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_importances_are_for_high_scores():
    """Importances rank parameters by what makes scores high, for one objective and for several (whose
    mean counts): here only x separates the best trials and only y the worst, so x must come first."""
    import numpy as np
    from optuna.distributions import FloatDistribution

    from evomerge.search.plots import param_importances

    rng = np.random.default_rng(0)
    dist = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    for directions in (["maximize"], ["maximize", "maximize"]):
        study = optuna.create_study(directions=directions)
        for x, y in rng.random((200, 2)):
            score = (10.0 if x > 0.8 else 0.0) - (10.0 if y > 0.8 else 0.0) + rng.random()
            study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions=dist,
                                                      values=[score] * len(directions)))
        imp = param_importances(study)
        assert imp["x"] > 2 * imp["y"], (directions, imp)


def test_multi_objective_nsga2_per_task(tiny_zoo, tmp_path):
    """One objective per task with NSGA-II: every trial records a value per task; a Pareto plot is written."""
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    cfg = load_config(_config(tmp_path, tiny_zoo, objectives="per_task", sampler={"name": "nsga2", "popsize": 4},
                              budget={"trials": 8}, export_checkpoint=False))
    run = SearchRun(cfg)
    run.run()
    complete = [t for t in run.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    n_tasks = len(run.task_specs)
    assert len(complete) == 8 and all(len(t.values) == n_tasks for t in complete)
    assert run.study.best_trials  # a non-empty Pareto front
    summary = finalize(run, export_checkpoint=False)
    assert (run.out / "plots" / "pareto_front.png").exists()
    assert 'data-chart="pareto"' in (run.out / "report.html").read_text()
    assert "checkpoint" not in summary.files and summary.rows[0].label.startswith("winner")


def test_pruned_trials_are_kept_and_reported(tiny_zoo, tmp_path):
    """With a pruner that stops most trials early, pruned trials count against the budget, keep where they
    stopped, and appear in trials.csv and summary.md."""
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    cfg = load_config(_config(tmp_path, tiny_zoo, budget={"trials": 8}, sampler={"name": "random"},
                              export_checkpoint=False,
                              pruner={"name": "percentile", "percentile": 90.0, "startup_trials": 1,
                                      "warmup_steps": 0, "chunk_size": 8}))
    run = SearchRun(cfg)
    run.run()
    trials = run.study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(trials) == 8 and pruned
    assert trials[0].state == optuna.trial.TrialState.COMPLETE  # the startup trial is never pruned
    chunks = max(len(t.intermediate_values) for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    for t in pruned:
        stop = t.user_attrs["pruned_at"]
        assert 0 < stop["examples"] and 0 <= stop["score"] <= 1
        assert 0 < len(t.intermediate_values) < chunks  # stopped before scoring the whole search split
    summary = finalize(run, export_checkpoint=False, log=lambda m: None)
    rows = {int(r["number"]): r for r in csv.DictReader(open(run.out / "trials.csv"))}
    for t in pruned:
        assert rows[t.number]["state"] == "PRUNED"
        assert int(rows[t.number]["pruned_at_examples"]) == t.user_attrs["pruned_at"]["examples"]
    assert summary.counts["PRUNED"] == len(pruned)
    assert f"{len(pruned)} pruned" in (run.out / "summary.md").read_text()
    assert summary.winner_trial not in {t.number for t in pruned}


def test_sqlite_storage_url_resumes_the_study(tiny_zoo, tmp_path):
    """A storage URL instead of the journal file: the study lives in that database (no journal is written)
    and a second run with a larger budget resumes it instead of starting over."""
    from evomerge.search.run import SearchRun

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    first = SearchRun(load_config(_config(tmp_path, tiny_zoo, storage=url, budget={"trials": 3},
                                          sampler={"name": "tpe"})))
    first.run()
    done = {t.number: t.params for t in first.study.get_trials(deepcopy=False) if t.state.is_finished()}
    assert len(done) == 3  # the anchors not yet run stay queued for the next run
    second = SearchRun(load_config(_config(tmp_path, tiny_zoo, storage=url, budget={"trials": 5},
                                           sampler={"name": "tpe"})))
    second.run()
    trials = optuna.load_study(study_name="t", storage=url).get_trials(deepcopy=False)
    assert len(trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.number: t.params for t in trials[:3]} == done
    assert trials[0].user_attrs.get("default") is True and not trials[3].user_attrs.get("default")
    assert not (tmp_path / "run" / "study.journal").exists()


def test_storage_creation_retries_while_another_worker_creates_the_schema(tmp_path, monkeypatch):
    """Two workers starting on a new database race to create its tables; the loser's IntegrityError (seen
    in 1 of 4 two-worker sqlite runs before this retry) is retried, and a persistent error still surfaces."""
    import optuna.storages
    from sqlalchemy.exc import IntegrityError

    from evomerge.search import study as study_mod

    real, calls = optuna.storages.RDBStorage, {"n": 0}

    def racing(url, retry_s):
        calls["n"] += 1
        if calls["n"] == 1:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(url)

    monkeypatch.setattr(study_mod, "open_rdb_storage", racing)
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert isinstance(study_mod.make_storage(url, tmp_path), real) and calls["n"] == 2

    def broken(url, retry_s):
        raise IntegrityError("INSERT", {}, Exception("always"))

    monkeypatch.setattr(study_mod, "open_rdb_storage", broken)
    with pytest.raises(IntegrityError):
        study_mod.make_storage(url, tmp_path)


@pytest.mark.parametrize("sampler", [
    {"name": "cmaes", "popsize": 4}, {"name": "cmaes", "separable": True, "sigma0": 0.3},
    {"name": "cmaes", "lr_adapt": True},
    {"name": "tpe", "n_startup_trials": 4}, {"name": "gp", "n_startup_trials": 4}, {"name": "random"},
    {"name": "nsga2", "popsize": 4}])
def test_every_sampler_drives_a_study_from_the_default_point(sampler):
    """Each configurable sampler, as ``make_sampler`` builds it, runs a study over a real search space's
    distributions: the enqueued default comes first, every point lies in its ranges, and after the random
    start the sampler's proposals improve on a smooth objective (optimum at weight 1.5 everywhere)."""
    import warnings

    from evomerge.search.config import Sampler
    from evomerge.search.study import make_sampler

    space = load_space(SPACES / "ties_per_block.yaml")
    dists = space.distributions(["a", "b"], 8)
    default = space.default_point(["a", "b"], 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated or experimental options
        study = optuna.create_study(direction="maximize",
                                    sampler=make_sampler(Sampler(**sampler), seed=0, n_objectives=1))
        study.enqueue_trial(default)
        for _ in range(24):
            trial = study.ask()
            x = {k: trial.suggest_float(k, d.low, d.high, log=d.log) for k, d in dists.items()}
            study.tell(trial, -sum((v - 1.5) ** 2 for k, v in x.items() if "weight" in k))
    trials = study.get_trials(deepcopy=False)
    assert trials[0].params == pytest.approx(default)
    assert all(dists[k].low <= v <= dists[k].high for t in trials for k, v in t.params.items())
    assert study.best_value > trials[0].value  # the default (weights 1) is not the optimum


@pytest.mark.parametrize("failure", ["nan", "oom", "evaluation"])
def test_nan_oom_and_evaluation_errors_fail_one_trial_not_the_search(tiny_zoo, tmp_path, failure):
    """The third candidate gets NaN weights / runs out of memory while building / its evaluation raises:
    that trial is recorded as FAIL with the reason, counts against the budget, and the search goes on."""
    from evomerge.search.run import SearchRun

    cfg = load_config(_config(tmp_path, tiny_zoo, budget={"trials": 5}, sampler={"name": "random"}))
    run = SearchRun(cfg)
    calls = {"n": 0}
    real_build, evaluator = run.builder.build, run.evaluator("search")
    real_evaluate = evaluator.evaluate

    def build(recipe):
        stats = real_build(recipe)
        calls["n"] += 1
        if calls["n"] == 3 and failure == "nan":
            with torch.no_grad():
                next(iter(run.builder.params.values())).view(-1)[0] = float("nan")
        if calls["n"] == 3 and failure == "oom":
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return stats

    def evaluate(model):
        if calls["n"] == 3 and failure == "evaluation":
            raise RuntimeError("scorer crashed (simulated)")
        return real_evaluate(model)

    run.builder.build, evaluator.evaluate = build, evaluate
    run.run()
    trials = run.study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert len(trials) == 5 and states[2] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    reason = trials[2].user_attrs["fail_reason"]
    expected = {"nan": "FloatingPointError: candidate has NaN or infinite values in ",
                "oom": "OutOfMemoryError: out of memory (simulated)",
                "evaluation": "RuntimeError: scorer crashed (simulated)"}[failure]
    assert reason.startswith(expected), reason
    assert "Traceback" in trials[2].user_attrs["traceback"] and not trials[2].user_attrs.get("interrupted")


def test_weight_l1_penalises_the_search_score_by_the_searched_weights(tiny_zoo, tmp_path):
    """LoraHub's L1 regulariser: each trial's value is its search-split aggregate minus weight_l1 times the sum
    of |searched model weights|; the per-task scores it stores are not penalised."""
    from evomerge.search.run import SearchRun

    run = SearchRun(load_config(_config(tmp_path, tiny_zoo, budget={"trials": 4}, sampler={"name": "random"},
                                        weight_l1=0.1)))
    stats = run.run()
    trials = {t.number: t for t in run.study.get_trials(deepcopy=False)}
    assert [r.state for r in stats.trials] == ["COMPLETE"] * 4
    for rec in stats.trials:
        t = trials[rec.number]
        weights = [v for k, v in t.params.items() if k.startswith("weight[")]
        assert weights and sum(abs(w) for w in weights) > 0
        assert t.value == pytest.approx(rec.value - 0.1 * sum(abs(w) for w in weights), abs=1e-9)
        assert t.user_attrs["scores"] == pytest.approx(rec.scores)
