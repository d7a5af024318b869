"""The HTML report of a search: written by finalize, refreshable mid-run, and checked in a real Chromium."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import yaml

from evomerge.search.config import load_config
from tests.chromium import Browser, find_chromium

SPACE = {"method": "ties", "granularity": "layer",
         "search": {"weight": {"low": 0.0, "high": 2.0, "default": 1.0},
                    "density": {"low": 0.1, "high": 0.9, "default": 0.5}}}
CHARTS = {"test", "history", "layers", "importances", "finalists", "time"}


@pytest.fixture(scope="module")
def report_run(tiny_zoo, tmp_path_factory):
    """A short search on the tiny zoo, four complete trials then some pruned: the report mid-run (before
    finalize) and at the end."""
    from evomerge.report import write_report
    from evomerge.search.export import finalize
    from evomerge.search.run import SearchRun

    tmp = tmp_path_factory.mktemp("report")
    cfg = {"name": "rep", "base_model": str(tiny_zoo.base), "models": {k: str(v) for k, v in tiny_zoo.experts.items()},
           "tasks": str(tiny_zoo.tasks_yaml), "reference_model": str(tiny_zoo.multitask), "search_space": SPACE,
           "budget": {"trials": 10}, "sampler": {"name": "random"}, "device": "cpu", "top_k": 2,
           "pruner": {"name": "median", "startup_trials": 4, "warmup_steps": 0, "chunk_size": 8},
           "output_dir": str(tmp / "run"), "export_checkpoint": False}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = SearchRun(load_config(tmp / "run.yaml"))
    run.run()
    midway = write_report(run.out, tmp / "midway.html")
    finalize(run, export_checkpoint=False, log=lambda m: None)
    return run, midway, run.out / "report.html"


def test_finalize_writes_a_self_contained_report_with_every_section(report_run):
    run, _, page = report_run
    text = page.read_text()
    assert set(re.findall(r'data-chart="(\w+)"', text)) == CHARTS
    for section in ("config", "recipe"):
        assert f'<section id="{section}">' in text
    # offline and self-contained: no script, no external style sheet, image or font
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(?!data:)', text)
    # the test table: the winner first with its CI, the baselines after it
    assert re.search(r'<tr class="winner"><td>winner \(trial \d+\)</td><td>[01]\.\d{3}</td><td>\[', text)
    for label in ("default recipe (ties)", "base", "multi-task reference"):
        assert f"<td>{label}</td>" in text
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in run.study.get_trials(deepcopy=False))
    assert pruned and f"{pruned} pruned" in text


def test_the_report_can_be_refreshed_during_a_run(report_run):
    """Before finalize there are no test scores: the page says so and shows the best recipe so far."""
    _, midway, _ = report_run
    text = midway.read_text()
    assert "Not finalized yet" in text and "Best recipe so far" in text
    assert set(re.findall(r'data-chart="(\w+)"', text)) == CHARTS - {"test", "finalists"}


def test_report_command_refuses_a_directory_that_is_not_a_run(tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "not a search run directory" in " ".join(res.output.split())


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH: the report's browser test needs Debian's `chromium` package "
                    "(apt-get install -y chromium; .ci/run installs it)")
    with Browser(binary) as b:
        yield b


def test_report_loads_in_chromium_without_errors_and_every_chart_renders(report_run, browser):
    _, _, page = report_run
    res = browser.open(page.as_uri())
    assert res.errors == []
    assert res.title == "evomerge search: rep"
    assert {c["chart"] for c in res.charts} == CHARTS
    assert all(c["loaded"] and c["width"] > 300 for c in res.charts), res.charts


def test_the_browser_check_sees_console_errors_and_broken_charts(browser, tmp_path):
    """The check above can fail: a console error, an exception and an image that does not decode are seen."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                    '<figure class="chart" data-chart="x"><img src="data:image/png;base64,AAAA"></figure>'
                    '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    res = browser.open(page.as_uri())
    assert any("boom" in e for e in res.errors) and any("undefinedFunction" in e for e in res.errors)
    assert res.charts == [{"chart": "x", "loaded": False, "width": 0}]


def _get(app, path: str):
    """GET ``path`` from a WSGI app in-process; returns the decoded JSON body."""
    import json
    from wsgiref.util import setup_testing_defaults

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def test_optuna_dashboard_reads_the_runs_journal_with_each_trials_recipe_and_scores(report_run):
    """`optuna-dashboard RUN_DIR/study.journal` (the same storage guess, through its WSGI app): the study is
    listed, and every finished trial shows its recipe and per-task scores as user attributes."""
    dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the test extras")
    run, _, _ = report_run
    app = dashboard.wsgi(str(run.out / "study.journal"))
    studies = _get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["rep"]
    detail = _get(app, f"/api/studies/{studies[0]['study_id']}")
    trials = detail["trials"]
    assert len(trials) == len(run.study.trials) == 10
    tasks = {t.name for t in run.task_specs}
    for t in trials:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert "merge_method: ties" in attrs["recipe"]
        if t["state"] == "Complete":
            assert set(json.loads(attrs["scores"])) == tasks  # the dashboard shows a dict attribute as JSON
