"""Many workers on one study, with real processes on a real PostgreSQL (and the journal file): every trial
once, the budget exact, one finalize; a worker killed on a "remote host"; the database restarted under
running workers; status and finalize by hand; a worker with another config refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.search.config import load_config
from tests import pgserver
from tests.test_search import _config

_NO_PG = pgserver.unavailable_reason()
needs_pg = pytest.mark.skipif(_NO_PG is not None, reason=_NO_PG or "")


@pytest.fixture(scope="session")
def pg_server():
    """The URL of a PostgreSQL server: ``$EVOMERGE_TEST_POSTGRES`` (.ci/run starts one), else a private one."""
    if os.environ.get(pgserver.ENV_URL):
        yield os.environ[pgserver.ENV_URL]
        return
    server = pgserver.PrivateServer()
    yield server.url
    server.close()


@pytest.fixture
def pg_url(pg_server):
    """A fresh database for one test."""
    return pgserver.new_database(pg_server)


def _cli(args, env_extra=None):
    """``evomerge ARGS`` in a new process (stdout and stderr together)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


FAST_WORKERS = {"heartbeat_s": 0.5, "grace_s": 3.0, "storage_retry_s": 60.0}


def _load(url: str | None, run_dir: Path) -> optuna.Study:
    from evomerge.search.study import make_storage

    return optuna.load_study(study_name="t", storage=make_storage(url, run_dir))


def _check_budget(study: optuna.Study, budget: int) -> list:
    """Every trial once and finished, exactly ``budget`` of them counted; returns the counted ones."""
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == len({t._trial_id for t in trials})
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == budget
    params = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(params)) == len(params)  # no trial recorded twice
    return counted


@pytest.mark.parametrize("storage", [pytest.param("postgres", marks=needs_pg), "journal"])
def test_four_workers_finish_the_budget_exactly_and_finalize_once(tiny_zoo, tmp_path, storage, request):
    url = request.getfixturevalue("pg_url") if storage == "postgres" else None
    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 40}, sampler={"name": "random"}, storage=url,
                  export_checkpoint=False, workers=FAST_WORKERS)
    procs = [_cli(["search", str(cfg)]) for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = _load(url, tmp_path / "run")
    counted = _check_budget(study, 40)
    assert len({t.user_attrs["worker"] for t in counted}) >= 2
    finalizers = [o for o in outs if "test split" in o]
    assert len(finalizers) == 1, outs  # one finalize; the others say who does it
    assert sum("finalizes this study" in o for o in outs) == 3, outs
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(summary["finalists"], key=lambda f: f["validation"])
    assert summary["winner_trial"] == best["trial"]
    assert study.user_attrs["finalized"]["winner_trial"] == best["trial"]


def _running_trial_of(study_fn, pid: int, proc) -> optuna.trial.FrozenTrial:
    """Stop process ``pid`` (SIGSTOP) while it is running a trial; returns that trial (still RUNNING)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        os.kill(pid, signal.SIGSTOP)
        mine = [t for t in study_fn().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker", "").endswith(f":{pid}")]
        if mine:
            return mine[0]
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)
    raise AssertionError("the worker never ran a trial")


@needs_pg
def test_a_remote_worker_killed_mid_trial_is_marked_lost_and_its_slot_rerun(tiny_zoo, tmp_path, pg_url):
    """A worker on another "host" (its host name faked, so no pid check can see it) is killed with SIGKILL in
    the middle of a trial: a worker on this host marks the trial "worker lost" within the grace period, and
    the budget is still completed; no finished trial is lost."""
    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 60}, sampler={"name": "random"}, storage=pg_url,
                  workers=FAST_WORKERS)
    local = _cli(["search", str(cfg), "--no-finalize"])
    remote = _cli(["search", str(cfg), "--no-finalize"], env_extra={"EVOMERGE_WORKER_HOST": "remote-host"})

    def study():
        return _load(pg_url, tmp_path / "run")

    victim = _running_trial_of(study, remote.pid, remote)
    before = {t.number: t for t in study().get_trials(deepcopy=False) if t.state.is_finished()}
    remote.send_signal(signal.SIGKILL)
    killed_at = time.time()
    remote.wait()
    out = local.communicate(timeout=300)[0]
    assert local.returncode == 0, out
    trials = {t.number: t for t in study().get_trials(deepcopy=False)}
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL and "worker lost (remote-host:" in lost.user_attrs["fail_reason"]
    grace = FAST_WORKERS["grace_s"]
    assert lost.datetime_complete.timestamp() - killed_at < grace + 3  # marked within the grace period (+ a poll)
    for n, t in before.items():  # 0 finished trials lost
        assert trials[n].state == t.state and trials[n].params == t.params
    _check_budget(study(), 60)


@pytest.mark.skipif(pgserver.pg_bin("pg_ctl") is None or pgserver.unavailable_reason() is not None,
                    reason=_NO_PG or "needs the PostgreSQL server binaries to restart a private server")
def test_workers_ride_out_a_database_restart(tiny_zoo, tmp_path):
    """The database is stopped for a few seconds under two running workers: both retry and finish the budget,
    no finished trial is lost; a database that stays down ends a worker with a clear error."""
    server = pgserver.PrivateServer()
    try:
        url = pgserver.new_database(server.url)
        cfg = _config(tmp_path, tiny_zoo, budget={"trials": 60}, sampler={"name": "random"}, storage=url,
                      workers={**FAST_WORKERS, "grace_s": 30.0})
        procs = [_cli(["search", str(cfg), "--no-finalize"]) for _ in range(2)]
        deadline = time.time() + 120
        while len([t for t in _load(url, tmp_path).get_trials(deepcopy=False) if t.state.is_finished()]) < 8:
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.3)
        before = {t.number: t for t in _load(url, tmp_path).get_trials(deepcopy=False) if t.state.is_finished()}
        server.stop()
        time.sleep(3)
        server.start()
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        trials = {t.number: t for t in _load(url, tmp_path).get_trials(deepcopy=False)}
        for n, t in before.items():
            assert trials[n].state == t.state and trials[n].params == t.params
        _check_budget(_load(url, tmp_path), 60)

        # down for good: bounded retries, then a clear error
        cfg = _config(tmp_path, tiny_zoo, budget={"trials": 1000}, sampler={"name": "random"}, storage=url,
                      study_name="down", workers={**FAST_WORKERS, "storage_retry_s": 2.0})
        proc = _cli(["search", str(cfg), "--no-finalize"])
        while not _has_trials(url, "down"):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        server.stop()
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2, out
        assert "stayed unreachable for 2 s" in out and "Traceback" not in out, out
    finally:
        server.close()


def _has_trials(url: str, name: str) -> bool:
    from evomerge.search.study import make_storage

    try:
        return len(optuna.load_study(study_name=name, storage=make_storage(url, Path("."))).trials) > 2
    except KeyError:
        return False
