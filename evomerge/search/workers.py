"""Many workers on one study: who a worker is, its heartbeat, lost trials, and the one finalize.

Every ``evomerge search`` process pointed at the same storage and study is a worker. While a worker runs
a trial, a background thread writes the time into the trial's ``heartbeat`` user attribute every
``heartbeat_s`` seconds (Optuna's own heartbeat only runs inside ``study.optimize``, which evomerge does
not use). Any worker that sees a RUNNING trial whose last beat (or, before the first beat, its start) is
older than ``grace_s`` marks it failed, "worker lost", whatever host it ran on; like an interrupted
trial it does not count against the budget, so its slot is run again. The hosts' clocks must agree to
well under ``grace_s`` (NTP). On the same host a dead worker's trial is recognised at once by its pid.

The end of a study is finalized once: after the budget is spent and no trial is running, workers race to
create a claim (a tiny side study named ``<study>:finalize:<trials>``: creating a study with a taken name
fails atomically on every Optuna storage); the winner finalizes, the others exit naming it.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import threading
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

# The name a worker gives its host (default: the hostname). Set it where hostnames are not unique
# (containers) or to simulate another host in a test.
HOST_ENV = "EVOMERGE_WORKER_HOST"


def host_name() -> str:
    """This worker's host name: ``$EVOMERGE_WORKER_HOST`` or the hostname."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def worker_id() -> str:
    """``host:pid``: the tag each trial carries in its ``worker`` user attribute."""
    return f"{host_name()}:{os.getpid()}"


def worker_seed(seed: int) -> int:
    """The sampler seed of a worker joining a study: ``seed`` mixed with ``worker_id()``, so that workers do not
    draw the same points (the study's creator keeps ``seed`` itself: a one-process run stays reproducible)."""
    import hashlib

    return int(hashlib.sha256(f"{seed}:{worker_id()}".encode()).hexdigest()[:8], 16)


class Heartbeat:
    """A background thread that stamps the current trial's ``heartbeat`` user attribute every ``interval_s``.

    A trial's start counts as its first beat (``last_beat``), so a trial shorter than the interval costs no
    write at all; beats run off the main thread, so merging and scoring never wait for the storage; a
    trial that finished meanwhile is left alone."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval_s: float):
        self.storage, self.interval_s = storage, interval_s
        self._trial_id: int | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.beats = 0
        self._thread = threading.Thread(target=self._loop, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def set(self, trial_id: int | None) -> None:
        """Beat for ``trial_id`` from now on (None: no trial running)."""
        with self._lock:
            self._trial_id = trial_id

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            with self._lock:  # the main thread waits here before telling, so no beat lands after a tell
                trial_id = self._trial_id
                if trial_id is None or self._stop:
                    continue
                try:
                    self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
                    self.beats += 1
                except Exception:  # the trial finished (or was marked lost); a storage error: the next beat
                    pass


def last_beat(t: FrozenTrial) -> float:
    """When ``t``'s worker last showed it was alive: its last heartbeat, else the trial's start (epoch s)."""
    beat = t.user_attrs.get("heartbeat")
    if beat is not None:
        return float(beat)
    start = t.datetime_start or datetime.datetime.now()
    return start.timestamp()


def fail_trial(study: optuna.Study, t: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial of another worker failed with ``reason``, not counted against the budget; False
    when it finished meanwhile (its worker, or another worker marking it, came first)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        return storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    except (RuntimeError, ValueError):  # UpdateFinishedTrialError and friends
        return False


def fail_lost(study: optuna.Study, running: list[FrozenTrial], grace_s: float, now: float | None = None) -> list[int]:
    """Mark RUNNING trials whose worker went silent for ``grace_s`` seconds as failed ("worker lost");
    returns their numbers. Dead workers on this host are found sooner by ``fail_dead_here``."""
    now = time.time() if now is None else now
    lost = []
    for t in running:
        silent = now - last_beat(t)
        if silent > grace_s:
            where = t.user_attrs.get("worker", "an unknown worker")
            if fail_trial(study, t, f"worker lost ({where} sent no heartbeat for {silent:.0f} s)"):
                lost.append(t.number)
    return lost


def fail_dead_here(study: optuna.Study, running: list[FrozenTrial]) -> list[int]:
    """Mark RUNNING trials of dead processes on this host as failed ("worker died"): their pid is gone."""
    host, dead = host_name(), []
    for t in running:
        worker = t.user_attrs.get("worker", "")
        if not worker.startswith(host + ":"):
            continue
        pid = int(worker.rsplit(":", 1)[1])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if fail_trial(study, t, "worker died (process ended while running)"):
            dead.append(t.number)
    return dead


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is alive (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------- finalize
def claim_name(study_name: str, trials: int) -> str:
    """The claim study's name for finalizing ``study_name`` once it holds ``trials`` counted trials (a budget
    extended later and spent again is finalized again)."""
    return f"{study_name}:finalize:{trials}"


def claim_finalize(study: optuna.Study, trials: int, who: str | None = None) -> str | None:
    """Try to become the one worker that finalizes; None if this worker won, else who holds the claim."""
    storage, name = study._storage, claim_name(study.study_name, trials)
    who = who or worker_id()
    try:
        claim_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], study_name=name)
    except optuna.exceptions.DuplicatedStudyError:
        holder = storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get("worker")
        return holder or "another worker"
    storage.set_study_user_attr(claim_id, "worker", who)
    storage.set_study_user_attr(claim_id, "claimed_at", datetime.datetime.now(datetime.timezone.utc).isoformat())
    return None


# --------------------------------------------------------------------------------------------- CMA-ES
def cmaes_popsize(popsize: int | None, n_dims: int) -> int:
    """The population CMA-ES uses: the configured one, else Hansen's default 4 + floor(3 ln n)."""
    return popsize or 4 + math.floor(3 * math.log(max(n_dims, 1)))


def cmaes_discarded(trials: list[FrozenTrial], popsize: int) -> int:
    """Complete trials CMA-ES never learned from: Optuna's CmaEsSampler updates a generation with the first
    ``popsize`` of its trials to complete and ignores any that complete after it moved on (asynchronous
    workers), so a generation with more complete trials than ``popsize`` wasted the rest."""
    per_gen: dict[int, int] = {}
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        gen = next((v for k, v in t.system_attrs.items() if k.endswith("cma:generation")), None)
        if gen is not None:
            per_gen[gen] = per_gen.get(gen, 0) + 1
    return sum(max(0, n - popsize) for n in per_gen.values())


def active_workers(running: list[FrozenTrial]) -> set[str]:
    """The workers running a trial right now."""
    return {t.user_attrs["worker"] for t in running if "worker" in t.user_attrs}
