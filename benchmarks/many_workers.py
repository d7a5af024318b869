"""Many `evomerge search` workers on one study, as real processes: a long soak, and repeated kill -9.

``soak``: ``--workers`` processes share one study of ``--trials`` trials on PostgreSQL (a private server,
or ``--postgres URL``) on the tiny zoo. Every worker's resident memory is sampled twice a second; per
window of trials (in order of completion) the table gives the median trial time (start to finish, as the
storage recorded it) and each worker's largest resident memory during the window. Flat rows mean no leak
and no slow-down as the study grows.

``kill``: ``--rounds`` times, start ``--workers`` processes, wait a random 2-8 s once trials run, and kill
every one with SIGKILL; then one last run to the end (with the finalize). Checked after every round:
every trial finished before the kill is unchanged, trial numbers are unique, no parameter set is
recorded twice; at the end: the budget is exact, nothing is left running, and the run's outputs are whole
(the recipe parses, the checkpoint loads) or absent.

    python benchmarks/many_workers.py soak [--workers 4] [--trials 2000] [--window 250]
    python benchmarks/many_workers.py kill [--workers 2] [--rounds 10] [--trials 60] [--storage journal|postgres]
    [--out results/bench/many_workers.md]  (each mode replaces its own section)
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import signal
import statistics
import subprocess
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


def write_config(work: Path, url: str | None, trials: int) -> Path:
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "zoo": {"size": "tiny"}, "search_space": str(ROOT / "search_spaces" / "task_arithmetic_per_layer.yaml"),
        "budget": {"trials": trials}, "sampler": {"name": "cmaes", "popsize": 8}, "pruner": {"name": "none"},
        "output_dir": str(work / "run"), "device": "cpu", "storage": url, "export_checkpoint": True,
        "workers": {"heartbeat_s": 1.0, "grace_s": 5.0}}))
    return path


def start_worker(cfg: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def load(url: str | None, work: Path) -> optuna.Study:
    from evomerge.search.study import make_storage

    return optuna.load_study(study_name="t", storage=make_storage(url, work / "run"))


def finished(url: str | None, work: Path) -> list:
    try:
        return [t for t in load(url, work).get_trials(deepcopy=False) if t.state.is_finished()]
    except KeyError:  # not created yet
        return []


# ------------------------------------------------------------------------------------------------- soak
def soak(url: str, workers: int, trials: int, window: int) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="evomerge-soak-"))
    cfg = write_config(work, url, trials)
    t0 = time.time()
    procs = [start_worker(cfg, "--no-finalize") for _ in range(workers)]
    samples: list[tuple[float, int, float]] = []  # (time, worker index, RSS MiB)
    while any(p.poll() is None for p in procs):
        now = time.time()
        for i, p in enumerate(procs):
            r = rss_mib(p.pid)
            if r is not None:
                samples.append((now, i, r))
        time.sleep(0.5)
    wall = time.time() - t0
    codes = [p.returncode for p in procs]
    done = sorted((t for t in load(url, work).get_trials(deepcopy=False) if t.state.is_finished()),
                  key=lambda t: t.datetime_complete)
    numbers = [t.number for t in done]
    params = [tuple(sorted(t.params.items())) for t in done]
    lines = [f"{workers} workers, exit codes {codes}, {len(done)} finished trials in {wall:.0f} s; duplicate "
             f"numbers {len(numbers) - len(set(numbers))}, duplicate parameter sets {len(params) - len(set(params))}.", "",
             "| trials | median trial ms | " + " | ".join(f"worker {i + 1} RSS MiB" for i in range(workers)) + " |",
             "|---:|---:|" + "---:|" * workers]
    for end in range(window, len(done) + 1, window):
        chunk = done[end - window:end]
        lo, hi = chunk[0].datetime_complete.timestamp(), chunk[-1].datetime_complete.timestamp()
        ms = statistics.median((t.datetime_complete - t.datetime_start).total_seconds() * 1e3 for t in chunk)
        rss = [max((r for s, i, r in samples if i == w and lo <= s <= hi), default=float("nan"))
               for w in range(workers)]
        lines.append(f"| {end} | {ms:.1f} | " + " | ".join(f"{r:.0f}" for r in rss) + " |")
        print(lines[-1], flush=True)
    return lines


# ------------------------------------------------------------------------------------------------- kill
def outputs_whole_or_absent(run_dir: Path) -> str:
    """'whole', 'absent', or what is broken, for the finalized outputs of ``run_dir``."""
    from evomerge.recipe import load_recipe

    recipe, merged = run_dir / "best_recipe.yaml", run_dir / "merged"
    if not recipe.exists() and not merged.exists():
        return "absent"
    try:
        load_recipe(recipe.read_text())
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(merged)
    except Exception as e:  # noqa: BLE001 - what is broken is the finding
        return f"broken: {type(e).__name__}: {e}"
    return "whole"


def kill_rounds(url: str | None, workers: int, rounds: int, trials: int, rng: random.Random) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="evomerge-kill-"))
    cfg = write_config(work, url, trials)
    rows = []
    for r in range(rounds):
        before = {t.number: t for t in finished(url, work)}
        procs = [start_worker(cfg, "--no-finalize") for _ in range(workers)]
        deadline = time.time() + 120
        while len(finished(url, work)) <= len(before) and time.time() < deadline:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.3)
        time.sleep(rng.uniform(2.0, 8.0))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        trials_now = load(url, work).get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials_now}
        changed = [n for n, t in before.items() if by_number.get(n) is None or by_number[n].state != t.state
                   or by_number[n].params != t.params]
        numbers = [t.number for t in trials_now]
        params = [tuple(sorted(t.params.items())) for t in trials_now if t.state.is_finished() and t.params]
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials_now)
        rows.append((r + 1, len(before), sum(t.state.is_finished() for t in trials_now), running, len(changed),
                     len(numbers) - len(set(numbers)), len(params) - len(set(params))))
        print("round %d: finished before %d, after %d, left running %d, changed %d, duplicate numbers %d, "
              "duplicate params %d" % rows[-1], flush=True)
    last = start_worker(cfg)
    code = last.wait(timeout=1200)
    from evomerge.search.run import counts

    study = load(url, work)
    all_trials = study.get_trials(deepcopy=False)
    counted = sum(counts(t) for t in all_trials)
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in all_trials)
    lost = sum(t.user_attrs.get("interrupted", False) for t in all_trials)
    outputs = outputs_whole_or_absent(work / "run")
    lines = ["| round | finished before | finished after kill | left RUNNING | finished trials changed | "
             "duplicate numbers | duplicate parameter sets |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    lines += ["", f"Then one run to the end: exit code {code}; {counted} counted trials for a budget of {trials}; "
                  f"{running} left running; {lost} trials marked interrupted (killed mid-trial: worker died or "
                  f"lost, their slots run again); outputs: {outputs}."]
    print("\n".join(lines[-1:]), flush=True)
    return lines


def replace_section(path: Path, title: str, body: list[str]) -> None:
    """Write ``body`` under ``## title`` in ``path``, replacing that section if present."""
    text = path.read_text() if path.exists() else "# Many workers on one study (benchmarks/many_workers.py)\n"
    parts = text.split("\n## ")
    head, sections = parts[0], {p.split("\n", 1)[0]: p for p in parts[1:]}
    sections[title] = title + "\n\n" + "\n".join(body) + "\n"
    path.write_text(head.rstrip() + "\n\n## " + "\n## ".join(s.rstrip() + "\n" for s in sections.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["soak", "kill"])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--window", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--storage", choices=["postgres", "journal"], default="postgres")
    ap.add_argument("--postgres", default=None, help="a server URL (default: a private server for the run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "many_workers.md"))
    args = ap.parse_args()
    server = None
    if args.storage == "postgres" and args.postgres is None:
        from evomerge.testing.postgres import PrivateServer

        server = PrivateServer()
        args.postgres = server.url
    try:
        url = None
        if args.storage == "postgres":
            from evomerge.testing.postgres import new_database

            url = new_database(args.postgres)
        where = "PostgreSQL on localhost" if args.storage == "postgres" else "the journal file"
        machine = f"Machine: {os.cpu_count()} CPU cores, no GPU. Date: {datetime.date.today()}."
        if args.mode == "soak":
            workers, trials = args.workers or 4, args.trials or 2000
            body = soak(url, workers, trials, args.window)
            title = f"Soak: {workers} workers, {trials} trials, {where}"
            cmd = f"python benchmarks/many_workers.py soak --workers {workers} --trials {trials} --window {args.window}"
        else:
            workers, trials = args.workers or 2, args.trials or 60
            body = kill_rounds(url, workers, args.rounds, trials, random.Random(args.seed))
            title = f"kill -9 of every worker, {args.rounds} times, {where}"
            cmd = (f"python benchmarks/many_workers.py kill --workers {workers} --rounds {args.rounds} "
                   f"--trials {trials} --storage {args.storage}")
        replace_section(Path(args.out), title, [f"{machine} Tiny zoo, `task_arithmetic_per_layer.yaml`, CMA-ES "
                                                f"(population 8), no pruner. Command: `{cmd}`.", "", *body])
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
