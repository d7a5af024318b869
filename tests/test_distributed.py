"""Many workers on one study, with real processes on a real PostgreSQL (and the journal file): every trial
once, the budget exact, one finalize; a worker killed on a "remote host"; the database restarted under
running workers; status and finalize by hand; a worker with another config refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.search.config import load_config
from evomerge.testing import postgres as pgserver
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


@needs_pg
def test_four_workers_finish_the_budget_exactly_and_finalize_once(tiny_zoo, tmp_path, pg_url):
    """Four `evomerge search` processes on one PostgreSQL study (the journal file: test_search's two workers,
    and the finalize claim below)."""
    url = pg_url
    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 20}, sampler={"name": "random"}, storage=url,
                  export_checkpoint=False, workers=FAST_WORKERS)
    procs = [_cli(["search", str(cfg)]) for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = _load(url, tmp_path / "run")
    counted = _check_budget(study, 20)
    assert len({t.user_attrs["worker"] for t in counted}) >= 2
    finalizers = [o for o in outs if "test split" in o]
    assert len(finalizers) == 1, outs  # one finalize; the others say who does it
    assert sum("finalizes this study" in o for o in outs) == 3, outs
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(summary["finalists"], key=lambda f: f["validation"])
    assert summary["winner_trial"] == best["trial"]
    assert study.user_attrs["finalized"]["winner_trial"] == best["trial"]


@pytest.mark.parametrize("storage", [pytest.param("postgres", marks=needs_pg), "journal"])
def test_exactly_one_claim_to_finalize_wins(tmp_path, storage, request):
    """Workers racing to claim the finalize, each with its own storage connection (on the journal file: its
    own writer id): exactly one wins, and every loser names the winner; a larger budget is claimed anew."""
    import threading

    from evomerge.search.study import make_storage
    from evomerge.search.workers import claim_finalize

    url = request.getfixturevalue("pg_url") if storage == "postgres" else None
    optuna.create_study(storage=make_storage(url, tmp_path), study_name="t")
    studies = [optuna.load_study(study_name="t", storage=make_storage(url, tmp_path)) for _ in range(6)]
    results: dict[int, str | None] = {}
    start = threading.Barrier(len(studies))

    def claim(i: int) -> None:
        start.wait()
        results[i] = claim_finalize(studies[i], 20, who=f"w{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, holder in results.items() if holder is None]
    assert len(winners) == 1
    assert all(holder in (f"w{winners[0]}", "another worker") for holder in results.values() if holder)
    assert claim_finalize(studies[0], 20, who="late") == f"w{winners[0]}"
    assert claim_finalize(studies[0], 30, who="later") is None  # the budget was extended and spent again


@pytest.mark.parametrize("storage", [pytest.param("postgres", marks=needs_pg), "journal"])
def test_held_writes_reach_the_storage_as_one_write(tmp_path, storage, request):
    """Inside ``held_writes`` a trial's parameters and user attributes wait and then go as one transaction or
    one journal append; another thread's write (the heartbeat) goes straight through; a block that raises
    sends nothing."""
    import threading

    from evomerge.search.held_writes import held_writes
    from evomerge.search.study import make_storage

    url = request.getfixturevalue("pg_url") if storage == "postgres" else None
    study = optuna.create_study(storage=make_storage(url, tmp_path), study_name="h",
                                sampler=optuna.samplers.RandomSampler(seed=0))  # reads nothing while sampling
    writes = []
    if storage == "postgres":
        from sqlalchemy import event

        event.listen(study._storage._backend.engine, "commit", lambda conn: writes.append(1))
    else:
        backend = study._storage._backend
        append = backend.append_logs
        backend.append_logs = lambda logs: (writes.append(len(logs)), append(logs))[1]
    other = optuna.load_study(study_name="h", storage=make_storage(url, tmp_path))
    trial = study.ask()
    writes.clear()
    with held_writes(study._storage):
        values = {f"x{i}": trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(10)}
        trial.set_user_attr("worker", "me")
        beat = threading.Thread(target=study._storage.set_trial_user_attr, args=(trial._trial_id, "heartbeat", 1.0))
        beat.start()
        beat.join()
        seen = other._storage.get_trial(trial._trial_id)
        assert seen.params == {} and seen.user_attrs == {"heartbeat": 1.0}
        assert trial.params == values  # the trial itself sees what it holds
    assert len(writes) == 2  # the heartbeat's, then everything held
    seen = other._storage.get_trial(trial._trial_id)
    assert seen.params == values and seen.user_attrs == {"heartbeat": 1.0, "worker": "me"}

    with pytest.raises(RuntimeError, match="boom"):
        with held_writes(study._storage):
            trial.set_user_attr("lost", True)
            raise RuntimeError("boom")
    assert "lost" not in other._storage.get_trial(trial._trial_id).user_attrs


def _running_trial_of(study_fn, pid: int, proc) -> optuna.trial.FrozenTrial:
    """Stop process ``pid`` (SIGSTOP) while it is running a trial; returns that trial (still RUNNING)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        os.kill(pid, signal.SIGSTOP)
        try:
            running = study_fn().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        mine = [t for t in running if t.user_attrs.get("worker", "").endswith(f":{pid}")]
        if mine:
            return mine[0]
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)
    raise AssertionError("the worker never ran a trial")


@needs_pg
def test_a_remote_worker_killed_mid_trial_is_marked_lost_and_its_slot_rerun(tiny_zoo, tmp_path, pg_url):
    """A worker on another "host" (its host name faked, so no pid check can see it) is killed with SIGKILL in
    the middle of a trial: `status` shows the trial running and silent; a worker on this host marks it
    "worker lost" once the grace period has passed (not before), as soon as it looks, and completes the
    budget; no finished trial is lost."""
    from evomerge.search.status import study_status
    from evomerge.search.workers import last_beat

    cfg = _config(tmp_path, tiny_zoo, budget={"trials": 30}, sampler={"name": "random"}, storage=pg_url,
                  workers=FAST_WORKERS)
    remote = _cli(["search", str(cfg), "--no-finalize"], env_extra={"EVOMERGE_WORKER_HOST": "remote-host"})

    def study():
        return _load(pg_url, tmp_path / "run")

    victim = _running_trial_of(study, remote.pid, remote)
    remote.send_signal(signal.SIGKILL)
    remote.wait()
    before = {t.number: t for t in study().get_trials(deepcopy=False) if t.state.is_finished()}
    row = next(r for r in study_status(study(), 30).workers if r.worker == f"remote-host:{remote.pid}")
    assert row.running == 1 and row.silent_s is not None
    local = _cli(["search", str(cfg), "--no-finalize"])
    out = local.communicate(timeout=300)[0]
    assert local.returncode == 0, out
    trials = {t.number: t for t in study().get_trials(deepcopy=False)}
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL and "worker lost (remote-host:" in lost.user_attrs["fail_reason"]
    marked, silent_since = lost.datetime_complete.timestamp(), last_beat(lost)
    grace = FAST_WORKERS["grace_s"]
    local_first = min(t.datetime_start.timestamp() for t in trials.values()
                      if t.user_attrs.get("worker") == f"{socket.gethostname()}:{local.pid}")
    assert marked - silent_since >= grace  # never before the grace period
    assert marked <= max(silent_since + grace, local_first) + 2  # and at the first look after it
    for n, t in before.items():  # 0 finished trials lost
        assert trials[n].state == t.state and trials[n].params == t.params
    _check_budget(study(), 30)


@pytest.mark.skipif(pgserver.pg_bin("pg_ctl") is None or pgserver.unavailable_reason() is not None,
                    reason=_NO_PG or "needs the PostgreSQL server binaries to restart a private server")
def test_workers_ride_out_a_database_restart(tiny_zoo, tmp_path):
    """The database is stopped for a few seconds under two running workers: both retry and finish the budget,
    no finished trial is lost; a database that stays down ends a worker with a clear error."""
    server = pgserver.PrivateServer()
    try:
        url = pgserver.new_database(server.url)
        cfg = _config(tmp_path, tiny_zoo, budget={"trials": 30}, sampler={"name": "random"}, storage=url,
                      workers={**FAST_WORKERS, "grace_s": 30.0})
        procs = [_cli(["search", str(cfg), "--no-finalize"]) for _ in range(2)]
        deadline = time.time() + 120
        while not _has_trials(url, "t", 8):
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
        _check_budget(_load(url, tmp_path), 30)

        # down for good: bounded retries, then a clear error (in this process: no second start-up to pay for)
        from evomerge.search.run import SearchRun
        from evomerge.search.study import StorageUnreachable

        run = SearchRun(load_config(_config(tmp_path, tiny_zoo, budget={"trials": 1000}, storage=url,
                                            study_name="down", workers={**FAST_WORKERS, "storage_retry_s": 2.0})))
        server.stop()
        t0 = time.time()
        with pytest.raises(StorageUnreachable, match=r"stayed unreachable for 2 s: .*Connection refused"):
            run.run()
        assert time.time() - t0 < 30
    finally:
        server.close()


@pytest.mark.skipif(pgserver.pg_bin("pg_ctl") is None or pgserver.unavailable_reason() is not None,
                    reason=_NO_PG or "needs the PostgreSQL server binaries to restart a private server")
def test_storage_calls_ride_out_repeated_restarts(tmp_path):
    """Four threads ask, suggest, write attributes, tell and read trials while the server is restarted five
    times: no call fails. A restart in the middle of a multi-query read surfaces as SQLAlchemy's
    PendingRollbackError wrapped in Optuna's StorageInternalError; it is retried like a refused connection."""
    import threading

    from evomerge.search.study import make_storage

    server = pgserver.PrivateServer()
    try:
        url = pgserver.new_database(server.url)
        optuna.create_study(study_name="s", storage=make_storage(url, tmp_path, retry_s=60), direction="maximize")
        errors: list[BaseException] = []
        done = threading.Event()

        def work() -> None:
            study = optuna.load_study(study_name="s", storage=make_storage(url, tmp_path, retry_s=60))
            while not done.is_set():
                try:
                    trial = study.ask()
                    x = trial.suggest_float("x", 0, 1)
                    trial.set_user_attr("heartbeat", time.time())
                    study.tell(trial, x)
                    study.get_trials(deepcopy=False)
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(5):
            time.sleep(1.5)
            server.stop()
            time.sleep(0.5)
            server.start()
        done.set()
        for t in threads:
            t.join(timeout=120)
        assert not errors, [f"{type(e).__name__}: {e} <- {e.__cause__!r}" for e in errors]
        assert len(optuna.load_study(study_name="s", storage=make_storage(url, tmp_path)).trials) > 20
    finally:
        server.close()


def _has_trials(url: str, name: str, n: int) -> bool:
    """Whether study ``name`` exists and has ``n`` finished trials."""
    from evomerge.search.study import make_storage

    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url, Path(".")))
    except KeyError:
        return False
    return len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]) >= n


def _wsgi_get(app, path: str) -> dict:
    """GET ``path`` from a WSGI app; the JSON body."""
    from wsgiref.util import setup_testing_defaults

    env: dict = {}
    setup_testing_defaults(env)
    env.update(PATH_INFO=path, REQUEST_METHOD="GET")
    status = {}
    body = b"".join(app(env, lambda s, headers, exc=None: status.update(s=s)))
    assert status["s"].startswith("200"), (path, status, body[:500])
    return json.loads(body)


def test_status_finalize_by_hand_and_the_dashboard_read_a_finished_study(tiny_zoo, tmp_path):
    """`evomerge status` counts a study's trials per worker with the best so far; `evomerge finalize` (from the
    run directory, or from the storage alone) finalizes it again with the same winner, files rewritten whole;
    optuna-dashboard reads the study evomerge wrote."""
    from typer.testing import CliRunner

    from evomerge.cli import app
    from evomerge.search.run import SearchRun, trial_score
    from evomerge.search.status import study_status
    from evomerge.search.workers import worker_id

    cfg = load_config(_config(tmp_path, tiny_zoo, budget={"trials": 6}, sampler={"name": "random"},
                              export_checkpoint=False))
    run = SearchRun(cfg)
    run.run()
    st = study_status(run.study, 6)
    assert st.counted == 6 and st.eta_s == 0 and [w.worker for w in st.workers] == [worker_id()]
    row = st.workers[0]
    assert row.complete + row.pruned + row.failed == 6 and row.running == 0
    best = max((t for t in run.study.trials if t.state == TrialState.COMPLETE), key=trial_score)
    assert st.best == (best.number, trial_score(best))

    runner = CliRunner()
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["finalize", str(run_dir)])
    assert res.exit_code == 0, res.output
    first = ((run_dir / "best_recipe.yaml").read_text(), json.loads((run_dir / "summary.json").read_text()))
    res = runner.invoke(app, ["finalize", str(run_dir)])  # again: the same files
    assert res.exit_code == 0, res.output
    assert (run_dir / "best_recipe.yaml").read_text() == first[0]
    assert json.loads((run_dir / "summary.json").read_text())["winner_trial"] == first[1]["winner_trial"]
    elsewhere = tmp_path / "elsewhere"
    res = runner.invoke(app, ["finalize", "--storage", f"journal:{run_dir / 'study.journal'}", "--study-name", "t",
                              "--output-dir", str(elsewhere)])  # no run directory: the config stored in the study
    assert res.exit_code == 0, res.output
    assert (elsewhere / "best_recipe.yaml").read_text() == first[0]
    assert not list(run_dir.glob(".*.tmp")) and not list(elsewhere.glob(".*.tmp"))

    res = runner.invoke(app, ["status", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert worker_id() in res.output and "6/6 trials" in res.output
    assert f"winner trial {first[1]['winner_trial']}" in res.output

    from optuna_dashboard import wsgi

    from evomerge.search.study import make_storage

    dash = wsgi(make_storage(None, run_dir))
    studies = _wsgi_get(dash, "/api/studies")["study_summaries"]
    sid = next(s["study_id"] for s in studies if s["study_name"] == "t")
    trials = _wsgi_get(dash, f"/api/studies/{sid}")["trials"]
    assert len(trials) == 6 and {p["name"] for p in trials[-1]["params"]} == set(run.distributions)


def test_a_worker_with_other_models_or_a_bad_storage_is_refused_before_any_trial(tiny_zoo, tmp_path, monkeypatch):
    """A worker whose models differ in content from the study's (same names, other files) is refused naming
    the model; a storage URL that is not one, or a database that cannot be reached, is a clear error."""
    from evomerge.search.run import SearchRun
    from evomerge.search.study import StorageUnreachable, make_storage

    SearchRun(load_config(_config(tmp_path, tiny_zoo)))
    names = sorted(tiny_zoo.experts)
    swapped = {**{k: str(v) for k, v in tiny_zoo.experts.items()}, names[0]: str(tiny_zoo.experts[names[1]])}
    cfg = load_config(_config(tmp_path, tiny_zoo, models=swapped))
    with pytest.raises(ValueError, match=f"another config .*models.{names[0]}: study has files with hash"):
        SearchRun(cfg)
    assert not [t for t in _load(None, tmp_path / "run").trials  # only the enqueued start points: nothing ran
                if t.state != optuna.trial.TrialState.WAITING]

    with pytest.raises(ValueError, match="not a database URL"):
        make_storage("postgres-typo://x/y", tmp_path)
    monkeypatch.setattr("time.sleep", lambda s: None)
    with pytest.raises(StorageUnreachable, match=r"cannot reach .*postgresql://u:\*\*\*@127.0.0.1:1/db"):
        make_storage("postgresql://u:secret@127.0.0.1:1/db", tmp_path)


def test_cmaes_discarded_trials_are_counted_when_workers_outnumber_the_population():
    """Optuna's CMA-ES ignores trials that finish after their generation moved on: none with one worker,
    some with seven asynchronous workers and a population of four."""
    from evomerge.search.workers import cmaes_discarded

    def study(workers: int) -> optuna.Study:
        s = optuna.create_study(sampler=optuna.samplers.CmaEsSampler(seed=0, popsize=4, n_startup_trials=0,
                                                                     warn_independent_sampling=False))
        pending = []
        for _ in range(40):
            t = s.ask()
            t.suggest_float("x", 0, 1)
            t.suggest_float("y", 0, 1)
            pending.append(t)
            if len(pending) >= workers:  # the oldest running trial finishes
                done = pending.pop(0)
                s.tell(done, done.params["x"])
        for done in pending:
            s.tell(done, done.params["x"])
        return s

    assert cmaes_discarded(study(1).trials, 4) == 0
    many = study(7).trials
    gens = [t.system_attrs.get("cma:generation") for t in many]
    assert cmaes_discarded(many, 4) == sum(max(0, gens.count(g) - 4) for g in set(gens) - {None}) > 0
