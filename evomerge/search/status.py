"""``evomerge status``: where a study stands, read while its workers run, without writing to it.

Per worker (``host:pid``): trials complete, pruned, failed and running, and how long ago its running
trial last beat; the best trial so far; trials counted against the budget; an ETA from the recent time
per trial and the workers active now; whether (and by whom) the study was finalized.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from evomerge.search.workers import last_beat


@dataclass
class WorkerRow:
    worker: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    silent_s: float | None = None  # seconds since its running trial's last heartbeat


@dataclass
class Status:
    study: str
    trials: int
    counted: int
    budget: int | None
    best: tuple[int, float] | None
    eta_s: float | None
    workers: list[WorkerRow] = field(default_factory=list)
    finalized: dict[str, Any] | None = None


def open_for_status(run_dir: Path | None, storage: str | None, study_name: str | None) -> tuple[optuna.Study, int | None]:
    """The study (loaded, never created) and its trial budget, from a run directory or a storage URL."""
    from evomerge.search.config import resolve_storage
    from evomerge.search.finish import CONFIG_ATTR
    from evomerge.search.study import make_storage

    saved: dict[str, Any] = {}
    if run_dir is not None:
        path = Path(run_dir) / "run_config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: not a search run directory (no run_config.yaml)")
        saved = yaml.safe_load(path.read_text()) or {}
    elif storage is None or study_name is None:
        raise ValueError("give a run directory, or --storage and --study-name")
    url = resolve_storage(storage, Path.cwd()) if storage else saved.get("storage")
    name = study_name or saved.get("study_name") or saved.get("name")
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url, Path(run_dir or ".")))
    except KeyError:
        raise KeyError(f"no study named {name!r} in that storage") from None
    if not saved and CONFIG_ATTR in study.user_attrs:
        saved = yaml.safe_load(study.user_attrs[CONFIG_ATTR]) or {}
    return study, (saved.get("budget") or {}).get("trials")


def study_status(study: optuna.Study, budget: int | None, now: float | None = None) -> Status:
    """Counts per worker, best so far and ETA of ``study`` (see the module docstring)."""
    from evomerge.search.run import counts, trial_score

    now = time.time() if now is None else now
    trials = study.get_trials(deepcopy=False)
    rows: dict[str, WorkerRow] = {}
    for t in trials:
        row = rows.setdefault(t.user_attrs.get("worker", "(untagged)"), WorkerRow(t.user_attrs.get("worker", "(untagged)")))
        if t.state == TrialState.COMPLETE:
            row.complete += 1
        elif t.state == TrialState.PRUNED:
            row.pruned += 1
        elif t.state == TrialState.FAIL:
            row.failed += 1
        elif t.state == TrialState.RUNNING:
            row.running += 1
            silent = now - last_beat(t)
            row.silent_s = silent if row.silent_s is None else min(row.silent_s, silent)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=trial_score, default=None)
    counted = sum(counts(t) for t in trials)
    return Status(study.study_name, len(trials), counted, budget,
                  None if best is None else (best.number, trial_score(best)),
                  _eta(trials, budget, counted, active=sum(1 for r in rows.values() if r.running)),
                  sorted(rows.values(), key=lambda r: r.worker), study.user_attrs.get("finalized"))


def _eta(trials: list[optuna.trial.FrozenTrial], budget: int | None, counted: int, active: int) -> float | None:
    """Seconds until the budget is taken: trials left x median duration of the last 20 finished trials,
    shared by the workers running now (at least one)."""
    if budget is None:
        return None
    finished = sorted((t for t in trials if t.state.is_finished() and t.datetime_complete and t.datetime_start),
                      key=lambda t: t.datetime_complete)[-20:]
    if not finished:
        return None
    durations = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)
    return max(0, budget - counted) * durations[len(durations) // 2] / max(active, 1)


def render(s: Status) -> str:
    """The status as plain text lines."""
    of = f"{s.counted}/{s.budget}" if s.budget else str(s.counted)
    best = "-" if s.best is None else f"{s.best[1]:.4f} (trial {s.best[0]})"
    eta = "-" if s.eta_s is None else str(datetime.timedelta(seconds=round(s.eta_s)))
    lines = [f"study {s.study}: {of} trials counted against the budget ({s.trials} in all); best so far {best}; "
             f"ETA {eta}", "", f"{'worker':<32} {'complete':>8} {'pruned':>6} {'failed':>6} {'running':>7}  last beat"]
    for r in s.workers:
        beat = "" if r.silent_s is None else f"{r.silent_s:.0f} s ago"
        lines.append(f"{r.worker:<32} {r.complete:>8} {r.pruned:>6} {r.failed:>6} {r.running:>7}  {beat}")
    if s.finalized:
        lines += ["", f"finalized by {s.finalized.get('by')} at {s.finalized.get('at')}: winner trial "
                      f"{s.finalized.get('winner_trial')}"]
    return "\n".join(lines)
