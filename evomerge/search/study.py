"""Optuna plumbing: samplers, pruners and storages behind one small interface.

Storage: by default an embedded journal file inside the run's output directory (safe for several
worker processes on one machine); any Optuna storage URL is accepted (``sqlite:///``,
``postgresql://``, ``mysql://`` through RDBStorage, ``redis://`` through the journal's Redis
backend). The study is created once, ``load_if_exists``, so re-running a command resumes it and
several processes pointed at it cooperate as workers.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import optuna

from evomerge.search.config import Pruner, Sampler, journal_file
from evomerge.search.held_writes import HeldJournalStorage, holding

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(url: str | None, output_dir: Path, *, retry_s: float | None = None) -> optuna.storages.BaseStorage:
    """The study storage: a journal file in ``output_dir`` by default, else the given URL (a database is
    retried for ``retry_s`` seconds when its connection is lost; default ``STORAGE_RETRY_S``)."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url is None or journal_file(url) is not None:
        path = Path(journal_file(url) or output_dir / "study.journal")
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeldJournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("redis://"):
        from optuna.storages.journal import JournalRedisBackend

        return HeldJournalStorage(JournalRedisBackend(url))
    return first_rdb_storage(url, retry_s=STORAGE_RETRY_S if retry_s is None else retry_s)


# How long a worker keeps retrying a database it lost (a restart, a network blip) before it stops with an error.
STORAGE_RETRY_S = 120.0


def _retryable(e: BaseException) -> bool:
    """True for a lost or refused database connection (worth retrying), False for anything else (bad SQL, a
    constraint). The whole chain of causes is looked at: Optuna wraps commit errors in StorageInternalError,
    and a query on a connection that just dropped surfaces as SQLAlchemy's PendingRollbackError, whose
    context is the disconnect."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, PendingRollbackError

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OperationalError, InterfaceError, PendingRollbackError)):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        e = e.__cause__ or e.__context__
    return False


def _with_retries(method):
    """``method`` of a storage, retried with back-off while the database is unreachable."""
    import time

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline, delay = time.monotonic() + self.retry_s, 0.2
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not _retryable(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StorageUnreachable(f"the study's database ({redact_url(self.url)}) stayed unreachable for "
                                             f"{self.retry_s:.0f} s: {_first_line(e)}") from e
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return call


class StorageUnreachable(RuntimeError):
    """The database stayed unreachable longer than the retry window."""


def _first_line(e: BaseException) -> str:
    text = str(e.__cause__ or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def redact_url(url: str) -> str:
    """A database URL without its password (for messages and logs)."""
    import re

    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


@functools.cache
def _retrying_rdb_class():
    """RDBStorage whose every storage call rides out a database restart: stale pooled connections are
    replaced (``pool_pre_ping``) and a refused or dropped connection is retried for ``retry_s`` seconds.
    A subclass, so that Optuna still puts its cache (``_CachedStorage``) in front of it. Writes held by
    ``held_writes`` go in one transaction (``send_held``)."""
    from optuna.storages import RDBStorage

    names = [n for n in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
                         "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
                         "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
                         "_create_new_trial", "set_trial_param", "_set_trial_param", "set_trial_state_values",
                         "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
                         "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
                         "_get_best_trial_id", "get_trial_user_attrs", "get_trial_system_attrs", "get_trial_param")
             if hasattr(RDBStorage, n)]

    def __init__(self, url: str, retry_s: float = STORAGE_RETRY_S):
        RDBStorage.__init__(self, url, engine_kwargs={"pool_pre_ping": True})
        self.retry_s, self.retries = retry_s, 0

    def __setstate__(self, state):  # pickled with the storage (Optuna does for some samplers' state)
        RDBStorage.__setstate__(self, state)

    retried = {n: _with_retries(getattr(RDBStorage, n)) for n in names}

    def _set_trial_param(self, trial_id, param_name, param_value_internal, distribution, previous_distribution):
        held = holding(self)  # Optuna's cache in front calls this for every suggest_*
        if held is None:
            return retried["_set_trial_param"](self, trial_id, param_name, param_value_internal, distribution,
                                               previous_distribution)
        held.append(("param", trial_id, (param_name, param_value_internal, distribution, previous_distribution)))

    def set_trial_user_attr(self, trial_id, key, value):
        held = holding(self)
        if held is None:
            return retried["set_trial_user_attr"](self, trial_id, key, value)
        held.append(("user_attr", trial_id, (key, value)))

    @_with_retries
    def send_held(self, held: list) -> None:
        """The held parameter and user-attribute writes (``held_writes``) in one transaction; each trial is
        looked up once, and parameters whose distribution Optuna's cache already knows are inserted together."""
        from optuna.distributions import check_distribution_compatibility, distribution_to_json
        from optuna.storages._rdb.models import TrialModel, TrialParamModel, TrialUserAttributeModel

        session = self.scoped_session()
        try:
            checked = set()
            for kind, trial_id, args in held:
                if trial_id not in checked:
                    self.check_trial_is_updatable(trial_id, TrialModel.find_or_raise_by_id(trial_id, session).state)
                    checked.add(trial_id)
                if kind == "param" and args[3] is not None:
                    name, value, distribution, previous = args
                    check_distribution_compatibility(previous, distribution)
                    session.add(TrialParamModel(trial_id=trial_id, param_name=name, param_value=value,
                                                distribution_json=distribution_to_json(distribution)))
                elif kind == "param":  # the study's first sight of this parameter: Optuna checks it
                    self._set_trial_param_without_commit(session, trial_id, *args)
                else:
                    self._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial_id, *args)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    return type("RetryingRDBStorage", (RDBStorage,), {
        **retried, "__init__": __init__, "__setstate__": __setstate__, "_set_trial_param": _set_trial_param,
        "set_trial_user_attr": set_trial_user_attr, "send_held": send_held})


def open_rdb_storage(url: str, retry_s: float) -> optuna.storages.RDBStorage:
    """An RDBStorage on ``url`` that retries lost connections for ``retry_s`` seconds."""
    return _retrying_rdb_class()(url, retry_s=retry_s)


def first_rdb_storage(url: str, attempts: int = 6, retry_s: float = STORAGE_RETRY_S) -> optuna.storages.BaseStorage:
    """The study's database, retried when another worker is creating the same database's tables at the same
    moment (both then insert the schema version: one of them gets an IntegrityError, or SQLite's
    "database is locked"); by the next attempt the schema is there. A database that cannot be reached at
    all is a ``StorageUnreachable`` naming it (no password)."""
    import time

    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    for attempt in range(attempts):
        try:
            return open_rdb_storage(url, retry_s)
        except ImportError as e:
            raise ValueError(f"storage {redact_url(url)}: {e} (for postgresql:// install psycopg: "
                             f"pip install 'psycopg[binary]')") from None
        except ArgumentError as e:
            raise ValueError(f"storage URL {redact_url(url)!r} is not a database URL Optuna can open ({e}); use "
                             f"postgresql://USER@HOST/DB, sqlite:///FILE, journal:FILE or redis://") from None
        except SQLAlchemyError as e:
            if attempt == attempts - 1:
                if _retryable(e):
                    raise StorageUnreachable(f"cannot reach the study's database {redact_url(url)}: "
                                             f"{_first_line(e)}") from None
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def make_sampler(cfg: Sampler, *, seed: int, n_objectives: int, x0: dict[str, float] | None = None,
                 learn_from_pruned: bool = False, budget: int | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a run.

    CMA-ES starts its mean at ``x0`` when given (the best anchor point of a run that starts from
    anchors), else at the middle of every range (in log space for log ranges): search spaces put their
    default point there (``SearchSpace.off_center`` names any that do not), and the default is also
    enqueued as the first trial. Other samplers ignore ``x0``: they learn from the anchors' trials.
    ``learn_from_pruned``: CMA-ES ranks a pruned trial by its last running score (Optuna's
    ``consider_pruned_trials``) instead of never seeing it, so pruning does not starve its generations
    (NGOpt likewise). ``budget``: the run's trial budget, from which NGOpt picks its algorithm.
    """
    name = cfg.name
    if n_objectives > 1 and name in ("cmaes", "ngopt"):
        raise ValueError(f"{name} optimizes one objective; use nsga2 for per-task objectives")
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
        if cfg.lr_adapt:
            kw["lr_adapt"] = True
        with warnings.catch_warnings():  # what the run config asks for, tested with the pinned Optuna versions:
            # sigma0 is deprecated since Optuna 4.9 (removal planned for 6.0) and sep-CMA-ES is "experimental"
            warnings.filterwarnings("ignore", message=".*(sigma0|x0).*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*(use_separable_cma|consider_pruned_trials|lr_adapt).*",
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
    if name == "ngopt":
        from evomerge.search.ngopt_sampler import NGOptSampler

        return NGOptSampler(seed=seed, budget=budget, learn_from_pruned=learn_from_pruned)
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

