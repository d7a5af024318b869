"""Soak test: a long search in one process, watching memory and time per trial as trials accumulate.

An overnight search runs thousands of trials in one process. This runs ``--trials`` of them on a
zoo (the journal storage in a temporary run directory, as `evomerge search` does) and reports, per
window of trials: the process's resident memory at the window's end, and the median time per trial
split into asking the sampler (with the storage round trips), building the candidate and scoring it.
Memory that keeps growing or a trial time that keeps rising would show here. Then, without a model,
what the storage costs per trial for 8, 64 and 192 searched dimensions (journal file, sqlite, memory),
and what resuming a long study costs.

    python benchmarks/soak.py [--size tiny] [--trials 2000] [--window 250] [--sampler cmaes]
        [--space search_spaces/task_arithmetic_per_layer.yaml] [--out results/bench/soak.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """This process's resident set size (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def storage_overhead(dims: tuple[int, ...] = (8, 64, 192), trials: int = 20) -> list[tuple[int, dict[str, float]]]:
    """Median ms per trial of Optuna's ask, one suggest_float per dimension and tell (CMA-ES), per storage.

    Optuna writes each parameter to the storage as it is suggested: one locked, fsync'ed append to
    the journal file, or one transaction in sqlite. So this overhead grows with the searched dimensions.
    """
    from evomerge.search.study import make_storage

    rows = []
    for n in dims:
        per: dict[str, float] = {}
        for kind in ("in memory", "journal file", "sqlite"):
            work = Path(tempfile.mkdtemp(prefix="evomerge-storage-"))
            storage = {"in memory": None, "journal file": make_storage(None, work),
                       "sqlite": make_storage(f"sqlite:///{work / 'study.db'}", work)}[kind]
            study = optuna.create_study(storage=storage, sampler=optuna.samplers.CmaEsSampler(seed=0))
            times = []
            for _ in range(trials):
                t0 = time.perf_counter()
                trial = study.ask()
                for k in range(n):
                    trial.suggest_float(f"x{k}", 0.0, 1.0)
                study.tell(trial, sum(trial.params.values()))
                times.append(time.perf_counter() - t0)
            per[kind] = statistics.median(times) * 1e3
        rows.append((n, per))
        print(f"{n:4d} dimensions: " + "  ".join(f"{k} {v:.1f} ms" for k, v in per.items()), flush=True)
    return rows


def resume_cost(shapes: tuple[tuple[int, int], ...] = ((2000, 8), (500, 192), (2000, 192))) -> list[tuple]:
    """What re-running a search costs before its first new trial: a journal file written as evomerge
    writes it (ask, one suggest per dimension, a recipe attribute, tell), reopened in a fresh storage
    object (Optuna replays the whole log), and the first ask with its suggestions (CMA-ES).

    Returns (trials, dimensions, journal MB, reopen s, first ask s) per shape.
    """
    from evomerge.search.study import make_storage

    rows = []
    for n_trials, dims in shapes:
        work = Path(tempfile.mkdtemp(prefix="evomerge-resume-"))
        study = optuna.create_study(storage=make_storage(None, work), study_name="s", direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(n_trials):
            trial = study.ask()
            values = [trial.suggest_float(f"x{k}", 0.0, 1.0) for k in range(dims)]
            trial.set_user_attr("recipe", {"weights": values})
            study.tell(trial, sum(values))
        size = (work / "study.journal").stat().st_size / 1e6
        t0 = time.perf_counter()
        reopened = optuna.load_study(study_name="s", storage=make_storage(None, work),
                                     sampler=optuna.samplers.CmaEsSampler(seed=0, n_startup_trials=0,
                                                                          warn_independent_sampling=False))
        reopened.get_trials(deepcopy=False)
        reopen = time.perf_counter() - t0
        t0 = time.perf_counter()
        trial = reopened.ask()
        for k in range(dims):
            trial.suggest_float(f"x{k}", 0.0, 1.0)
        first = time.perf_counter() - t0
        rows.append((n_trials, dims, size, reopen, first))
        print(f"{n_trials} trials x {dims} dimensions: journal {size:.1f} MB, reopen {reopen:.2f} s, "
              f"first ask {first:.2f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--window", type=int, default=250)
    ap.add_argument("--sampler", default="cmaes")
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "task_arithmetic_per_layer.yaml"))
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "soak.md"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from evomerge.search.config import load_config
    from evomerge.search.run import SearchRun

    work = Path(tempfile.mkdtemp(prefix="evomerge-soak-"))
    cfg_path = work / "run.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump({
        "name": "soak", "zoo": {"size": args.size}, "search_space": args.space, "budget": {"trials": args.trials},
        "sampler": {"name": args.sampler}, "pruner": {"name": "none"}, "output_dir": str(work / "run"),
        "device": "cpu"}))
    run = SearchRun(load_config(cfg_path))
    times: list[tuple[float, float, float]] = []  # (ask s, build s, eval s) per trial
    rows = []
    last = time.perf_counter()

    def on_event(kind: str, data: dict) -> None:
        nonlocal last
        if kind != "trial":
            return
        now = time.perf_counter()
        rec = data["record"]
        times.append((now - last - rec.build_s - rec.eval_s, rec.build_s, rec.eval_s))
        last = now
        if len(times) % args.window == 0:
            w = times[-args.window:]
            rows.append((len(times), rss_mib(), *(statistics.median(x[i] for x in w) * 1e3 for i in range(3))))
            print(f"{rows[-1][0]:6d} trials  RSS {rows[-1][1]:7.1f} MiB  ask+tell {rows[-1][2]:6.2f} ms  "
                  f"build {rows[-1][3]:6.2f} ms  eval {rows[-1][4]:6.2f} ms", flush=True)

    run.on_event = on_event
    started = time.perf_counter()
    run.run()
    wall = time.perf_counter() - started
    lines = ["# Soak: one long search in one process", "",
             f"Machine: {os.cpu_count()} CPU cores, no GPU. Date: {datetime.date.today()}. Zoo `{args.size}`, "
             f"space `{Path(args.space).name}`, sampler `{args.sampler}`, {args.trials} trials in {wall:.0f} s. "
             f"Command: `python benchmarks/soak.py --size {args.size} --trials {args.trials} --window {args.window} "
             f"--sampler {args.sampler}`.", "",
             "Per window of trials: resident memory at its end; median ms per trial of the rest of the loop "
             "(the sampler's ask with the storage round trips, tell, the display), the build and the scoring.", "",
             "| trials | RSS MiB | ask, tell, rest ms | build ms | eval ms |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r:.1f} | {a:.2f} | {b:.2f} | {e:.2f} |" for n, r, a, b, e in rows]
    lines += ["", "## Storage round trips per trial", "",
              "Median ms per trial of `ask`, one `suggest_float` per searched dimension and `tell` (CMA-ES, 20 "
              "trials; no model), by storage (`storage_overhead`). Optuna writes every parameter as it is "
              "suggested; with the journal file each write is a locked, fsync'ed append.", "",
              "| dimensions | in memory | journal file (default) | sqlite |", "|---:|---:|---:|---:|"]
    lines += [f"| {n} | {p['in memory']:.1f} | {p['journal file']:.1f} | {p['sqlite']:.1f} |"
              for n, p in storage_overhead()]
    lines += ["", "## Resuming", "",
              "A journal written as evomerge writes it, reopened by a new process (Optuna replays the whole log), "
              "and the first ask with its suggestions (CMA-ES) (`resume_cost`).", "",
              "| trials | dimensions | journal MB | reopen s | first ask s |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {d} | {mb:.1f} | {r:.2f} | {a:.2f} |" for n, d, mb, r, a in resume_cost()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
