"""Optuna plumbing: samplers, pruners and storages behind one small interface.

Storage: by default an embedded journal file inside the run's output directory (safe for several
worker processes on one machine); any Optuna storage URL is accepted (``sqlite:///``,
``postgresql://``, ``mysql://`` through RDBStorage, ``redis://`` through the journal's Redis
backend). The study is created once, ``load_if_exists``, so re-running a command resumes it and
several processes pointed at it cooperate as workers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from evomerge.search.config import Pruner, Sampler, journal_file

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(url: str | None, output_dir: Path) -> optuna.storages.BaseStorage:
    """The study storage: a journal file in ``output_dir`` by default, else the given URL."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url is None or journal_file(url) is not None:
        path = Path(journal_file(url) or output_dir / "study.journal")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("redis://"):
        from optuna.storages.journal import JournalRedisBackend

        return JournalStorage(JournalRedisBackend(url))
    # no heartbeat: Optuna only beats inside study.optimize(); workers' dead trials are found by pid (run.py)
    return _first_rdb_storage(url)


def _first_rdb_storage(url: str, attempts: int = 6) -> optuna.storages.BaseStorage:
    """``RDBStorage(url)``, retried when another worker is creating the same database's tables at the same
    moment (both then insert the schema version: one of them gets an IntegrityError, or SQLite's
    "database is locked"); by the next attempt the schema is there."""
    import time

    from optuna.storages import RDBStorage
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return RDBStorage(url)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def make_sampler(cfg: Sampler, *, seed: int, n_objectives: int, x0: dict[str, float] | None = None,
                 learn_from_pruned: bool = False) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a run.

    CMA-ES starts its mean at ``x0`` when given (the best anchor point of a run that starts from
    anchors), else at the middle of every range (in log space for log ranges): search spaces put their
    default point there (``SearchSpace.off_center`` names any that do not), and the default is also
    enqueued as the first trial. Other samplers ignore ``x0``: they learn from the anchors' trials.
    ``learn_from_pruned``: CMA-ES ranks a pruned trial by its last running score (Optuna's
    ``consider_pruned_trials``) instead of never seeing it, so pruning does not starve its generations.
    """
    name = cfg.name
    if n_objectives > 1 and name == "cmaes":
        raise ValueError("CMA-ES optimizes one objective; use nsga2 for per-task objectives")
    if name == "cmaes":
        kw: dict[str, Any] = {"seed": seed, "popsize": cfg.popsize, "n_startup_trials": 0,
                              "warn_independent_sampling": False}
        if cfg.sigma0 is not None:
            kw["sigma0"] = cfg.sigma0
        if x0 is not None:
            kw["x0"] = x0
        if learn_from_pruned:
            kw["consider_pruned_trials"] = True
        if cfg.separable:
            kw["use_separable_cma"] = True
        with warnings.catch_warnings():  # what the run config asks for, tested with the pinned Optuna versions:
            # sigma0 is deprecated since Optuna 4.9 (removal planned for 6.0) and sep-CMA-ES is "experimental"
            warnings.filterwarnings("ignore", message=".*(sigma0|x0).*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*(use_separable_cma|consider_pruned_trials).*",
                                    category=optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(**kw)
    if name == "tpe":
        kw = {"seed": seed, "multivariate": True}
        if cfg.n_startup_trials is not None:
            kw["n_startup_trials"] = cfg.n_startup_trials
        return optuna.samplers.TPESampler(**kw)
    if name == "gp":
        kw = {"seed": seed}
        if cfg.n_startup_trials is not None:
            kw["n_startup_trials"] = cfg.n_startup_trials
        return optuna.samplers.GPSampler(**kw)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.popsize or 16)
    raise ValueError(f"unknown sampler {name!r}")


def make_pruner(cfg: Pruner, n_objectives: int) -> optuna.pruners.BasePruner:
    """Early stopping on chunked scores; multi-objective studies cannot prune."""
    if cfg.name == "none" or n_objectives > 1:
        return optuna.pruners.NopPruner()
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps)
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, n_startup_trials=cfg.startup_trials,
                                               n_warmup_steps=cfg.warmup_steps)
    return optuna.pruners.SuccessiveHalvingPruner()


def open_study(*, storage: optuna.storages.BaseStorage, name: str, sampler, pruner,
               n_objectives: int) -> optuna.Study:
    """Create the study or load it (resume / join as a worker)."""
    directions = ["maximize"] * n_objectives
    try:
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                   directions=directions, load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it between our check and create
        return optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)

