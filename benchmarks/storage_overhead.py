"""What the study's storage costs per trial: journal file, sqlite and PostgreSQL on localhost.

Two measurements, per storage:

1. ``loop``: the real search loop (``SearchRun.run`` on the demo zoo, CMA-ES, no pruner), the time of each
   trial that is neither merging nor scoring (the sampler, every storage read and write, the budget and
   lost-worker checks), as a median in ms and as a share of the whole trial;
2. ``calls``: without a model, the storage calls one trial of ``run.py`` makes (ask, the worker tag, one
   ``suggest_float`` per dimension, the recipe, build/eval/scores attributes, tell, the loop's reads), for
   8 and 64 searched dimensions, median ms per trial.

PostgreSQL: ``--postgres URL``, else a private server started for the run (Debian's postgresql package,
as in the tests).

    python benchmarks/storage_overhead.py [--trials 60] [--out results/bench/storage.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


MEMORY = "in memory"  # no storage at all: the sampler's own time, the baseline of the calls table


def storages(pg_server: str) -> dict[str, callable]:
    """A fresh storage URL per name (None: the default journal file in the run directory)."""
    from evomerge.testing.postgres import new_database

    return {"journal file": lambda work: None,
            "sqlite": lambda work: f"sqlite:///{work / 'study.db'}",
            "postgresql": lambda work: new_database(pg_server)}


def loop_overhead(url: str | None, work: Path, trials: int, space: str) -> tuple[float, float, float]:
    """(median ms of the non-merge, non-scoring part of a trial, its share of trial time, median trial ms)."""
    from evomerge.search.config import load_config
    from evomerge.search.run import SearchRun

    cfg_path = work / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "bench", "zoo": {"size": "tiny"}, "search_space": space, "budget": {"trials": trials},
        "sampler": {"name": "cmaes"}, "pruner": {"name": "none"}, "output_dir": str(work / "run"),
        "device": "cpu", "storage": url}))
    run = SearchRun(load_config(cfg_path))
    rows, last = [], [time.perf_counter()]

    def on_event(kind: str, data: dict) -> None:
        if kind != "trial":
            return
        now, rec = time.perf_counter(), data["record"]
        rows.append((now - last[0] - rec.build_s - rec.eval_s, now - last[0]))
        last[0] = now

    run.on_event = on_event
    last[0] = time.perf_counter()
    run.run()
    rows = rows[5:]  # the first trials pay one-off costs (first CMA-ES generation, connections)
    other = statistics.median(r[0] for r in rows)
    total = statistics.median(r[1] for r in rows)
    return other * 1e3, sum(r[0] for r in rows) / sum(r[1] for r in rows), total * 1e3


def count_writes(storage) -> list[int]:
    """A counter (one-element list) of the writes ``storage`` makes: journal appends, or database
    transactions that insert, update or delete."""
    backend = getattr(storage, "_backend", storage)
    n = [0]
    if hasattr(backend, "engine"):
        from sqlalchemy import event

        def statement(conn, cursor, sql, *args):
            if sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                conn.info["wrote"] = True

        def commit(conn):
            n[0] += conn.info.pop("wrote", False)

        event.listen(backend.engine, "before_cursor_execute", statement)
        event.listen(backend.engine, "commit", commit)
    elif hasattr(backend, "append_logs"):
        append = backend.append_logs
        backend.append_logs = lambda logs: (n.__setitem__(0, n[0] + 1), append(logs))[1]
    return n


def call_overhead(url: str | None, work: Path, dims: int, held: bool, trials: int = 30) -> tuple[float, float]:
    """(median ms per trial, storage writes per trial) of the storage calls ``run.py`` makes for one trial,
    without a model. ``held``: as ``run.py`` makes them (the parameters in one write, the
    outcome's attributes in another); else each call on its own, as plain Optuna code does."""
    from contextlib import nullcontext

    from optuna.trial import TrialState

    from evomerge.search.held_writes import held_writes
    from evomerge.search.run import counts
    from evomerge.search.study import make_storage

    storage = optuna.storages.InMemoryStorage() if url == MEMORY else make_storage(url, work)
    study = optuna.create_study(storage=storage, study_name="calls", direction="maximize",
                                sampler=optuna.samplers.CmaEsSampler(seed=0, n_startup_trials=0,
                                                                     warn_independent_sampling=False))
    writes = count_writes(study._storage)
    batch = (lambda: held_writes(study._storage)) if held else nullcontext
    recipe = "x" * 1500  # about the size of a per-layer recipe's YAML
    times = []
    for i in range(trials):
        if i == 3:
            writes[0] = 0
        t0 = time.perf_counter()
        study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # lost-worker check
        sum(counts(t) for t in study.get_trials(deepcopy=False))  # budget
        trial = study.ask()
        trial.set_user_attr("worker", "host:1")
        with batch():
            values = [trial.suggest_float(f"x{k}", 0.0, 1.0) for k in range(dims)]
        with batch():
            trial.set_user_attr("recipe", recipe)
            for k in ("build_s", "eval_s"):
                trial.set_user_attr(k, 0.01)
            trial.set_user_attr("scores", {"a": 0.5, "b": 0.5})
        study.tell(trial, sum(values))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e3, writes[0] / (trials - 3)


def fsync_ms(work: Path, n: int = 50) -> float:
    """Median ms of one small append + fsync in ``work`` (what each journal write pays on this disk)."""
    times = []
    with open(work / "fsync.probe", "ab") as f:
        for _ in range(n):
            t0 = time.perf_counter()
            f.write(b"x" * 200)
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--postgres", default=None, help="a server URL (default: a private server for the run)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "storage.md"))
    args = ap.parse_args()
    server = None
    if args.postgres is None:
        from evomerge.testing.postgres import PrivateServer

        server = PrivateServer()
        args.postgres = server.url
    spaces = {"ties_per_model": 6, "task_arithmetic_per_layer": None}
    try:
        loop, calls = {}, {}
        for name, make in storages(args.postgres).items():
            for space in spaces:
                work = Path(tempfile.mkdtemp(prefix="evomerge-storage-"))
                loop[name, space] = loop_overhead(make(work), work, args.trials,
                                                  str(ROOT / "search_spaces" / f"{space}.yaml"))
                print(name, space, "loop: %.2f ms other (%.1f%% of %.2f ms per trial)"
                      % (loop[name, space][0], 100 * loop[name, space][1], loop[name, space][2]), flush=True)
            for dims in (8, 64):
                for held in (False, True):
                    work = Path(tempfile.mkdtemp(prefix="evomerge-storage-"))
                    calls[name, dims, held] = call_overhead(make(work), work, dims, held)
                    print(name, dims, "dims", "held" if held else "one write per call",
                          "calls: %.2f ms, %.1f writes" % calls[name, dims, held], flush=True)
        for dims in (8, 64):
            calls[MEMORY, dims, False] = calls[MEMORY, dims, True] = call_overhead(
                MEMORY, Path(tempfile.mkdtemp()), dims, False)
        fsync = fsync_ms(Path(tempfile.mkdtemp(prefix="evomerge-storage-")))
    finally:
        if server is not None:
            server.close()
    names = [MEMORY, *storages(args.postgres)]
    lines = ["# Storage overhead per trial", "",
             f"Machine: {os.cpu_count()} CPU cores (shared with other jobs), no GPU. Date: {datetime.date.today()}. "
             f"PostgreSQL {'on localhost (a private server, fsync off)' if server else 'at the given URL'}. "
             f"Command: `python benchmarks/storage_overhead.py --trials {args.trials}`.", "",
             "## In the search loop (demo zoo `tiny`, CMA-ES, one worker)", "",
             "Median ms per trial that is neither merging nor scoring (sampler, storage reads and writes, budget "
             "and lost-worker checks), and its share of all trial time.", "",
             "| storage | space | other ms | share of trial time | trial ms |", "|---|---|---:|---:|---:|"]
    for (name, space), (other, share, total) in loop.items():
        lines.append(f"| {name} | {space} | {other:.2f} | {100 * share:.1f}% | {total:.2f} |")
    lines += ["", "## Storage calls of one trial, without a model", "",
              "Median ms per trial of the calls `run.py` makes (ask, worker tag, one `suggest_float` per dimension, "
              "recipe, build/eval/scores, tell, the loop's two reads), CMA-ES, and the storage writes they make "
              "(journal appends, or database transactions that write); `in memory` is the sampler alone. "
              "*One write per call*: each call commits on its own, as in plain Optuna code. *Held*: as `run.py` "
              "makes them, the parameters in one write and the outcome's attributes in another "
              f"(`evomerge/search/held_writes.py`). An fsync took {fsync:.2f} ms on this disk during the run.", "",
              "| dimensions | writes | " + " | ".join(names) + " |", "|---:|---|" + "---:|" * len(names)]
    for dims in (8, 64):
        for held in (False, True):
            cells = [f"{calls[n, dims, held][0]:.2f}" + ("" if n == MEMORY else f" ({calls[n, dims, held][1]:.1f} w)")
                     for n in names]
            lines.append(f"| {dims} | {'held' if held else 'one per call'} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
