"""nevergrad's NGOpt as an Optuna sampler (``sampler: {name: ngopt}``).

NGOpt (Rapin & Teytaud, "Nevergrad: a gradient-free optimization platform", and the wizard of Meunier et
al. 2021, "Black-box optimization revisited") picks an optimizer from the dimension and the budget; it is
what Sakana's evolutionary model merge and LoraHub search with. Here it proposes a point for every trial
through Optuna's relative sampling, so it has everything an Optuna sampler has: storages, resume and
several workers.

The sampler keeps no state that the study does not: each process rebuilds the optimizer from the study.
Every finished trial it has not yet told the optimizer (its own, an anchor, another worker's, a resumed
run's) is told before the next point is asked; a trial this optimizer asked for is told as that
candidate, any other as a new point at its parameters (nevergrad's "tell not asked"). The optimizer
starts at the best finished trial, if any (the best anchor of a ``start: anchors`` run). Scores are
maximised (nevergrad minimises the negated value). Parameters are searched in [0, 1] per dimension,
mapped to each float distribution's range (log-uniform where the distribution is log).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState


def to_unit(value: float, dist: FloatDistribution) -> float:
    """A parameter's value as a position in [0, 1] of its range (log scale for a log distribution)."""
    if dist.high == dist.low:
        return 0.5
    if dist.log:
        return (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    return (value - dist.low) / (dist.high - dist.low)


def from_unit(u: float, dist: FloatDistribution) -> float:
    """The inverse of ``to_unit``, clipped to the range."""
    u = min(max(float(u), 0.0), 1.0)
    if dist.log:
        v = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    else:
        v = dist.low + u * (dist.high - dist.low)
    return min(max(v, dist.low), dist.high)


class NGOptSampler(optuna.samplers.BaseSampler):
    """Optuna sampler that asks nevergrad's NGOpt for each trial's float parameters.

    ``budget``: the run's trial budget (NGOpt chooses its algorithm from it); ``learn_from_pruned``: a
    pruned trial is told its last running score, as ``consider_pruned_trials`` does for CMA-ES.
    Distributions other than floats, and the first trial (no search space known yet), are sampled by
    ``optuna.samplers.RandomSampler``.
    """

    def __init__(self, *, seed: int = 0, budget: int | None = None, learn_from_pruned: bool = False):
        try:
            import nevergrad  # noqa: F401
        except ImportError:
            raise ValueError("sampler 'ngopt' needs nevergrad: pip install 'evomerge[ngopt]'") from None
        self._seed = seed
        self._budget = budget
        self._learn_from_pruned = learn_from_pruned
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._space = optuna.search_space.IntersectionSearchSpace()
        self._names: tuple[str, ...] = ()
        self._optimizer = None
        self._asked: dict[int, Any] = {}  # trial number -> the nevergrad candidate it was given
        self._told: set[int] = set()
        self._scores: dict[tuple, float] = {}  # unit point -> the loss told for it

    @property
    def n_told(self) -> int:
        """How many finished trials the optimizer has been told."""
        return len(self._told)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = self._space.calculate(study)
        return {k: d for k, d in space.items() if isinstance(d, FloatDistribution) and not d.single()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:  # an enqueued trial (an anchor) asks nothing
            return {}
        names = tuple(sorted(search_space))
        if names != self._names:
            self._start(names, _best_point(study, names, search_space))

        def ask():
            with warnings.catch_warnings():  # scipy's COBYLA under NGOpt warns about its own tolerances
                warnings.simplefilter("ignore", UserWarning)
                self._tell_finished(study, search_space)
                for _ in range(MAX_REPEATS):  # a point already scored is told its score, not run again
                    candidate = self._optimizer.ask()
                    known = self._scores.get(_key(candidate.value))
                    if known is None:
                        return candidate
                    self._optimizer.tell(candidate, known)
                return candidate

        candidate = in_daemon_thread(ask)
        self._asked[trial.number] = candidate
        return {n: from_unit(u, search_space[n]) for n, u in zip(names, candidate.value)}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- the optimizer -----------------------------------------------------------------------------------
    def _start(self, names: tuple[str, ...], init: list[float] | None) -> None:
        """A fresh NGOpt over ``names`` starting at ``init`` (unit coordinates; None: the middle). A changed
        search space starts over, and every trial is told again."""
        import nevergrad as ng

        param = ng.p.Array(init=np.full(len(names), 0.5) if init is None else np.clip(init, 0.0, 1.0),
                           lower=0.0, upper=1.0)
        param.random_state = np.random.RandomState(self._seed)
        self._optimizer = ng.optimizers.NGOpt(parametrization=param, budget=self._budget, num_workers=1)
        self._names, self._asked, self._told, self._scores = names, {}, set(), {}

    def _tell_finished(self, study: optuna.Study, search_space: dict[str, BaseDistribution]) -> None:
        """Tell the optimizer every finished trial with all of the search space's parameters not told yet."""
        direction = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        states = (TrialState.COMPLETE, TrialState.PRUNED) if self._learn_from_pruned else (TrialState.COMPLETE,)
        for t in study.get_trials(deepcopy=False, states=states):
            if t.number in self._told or not all(n in t.params for n in self._names):
                continue
            value = t.value if t.state == TrialState.COMPLETE else _last_intermediate(t)
            if value is None or not math.isfinite(value):
                continue
            candidate = self._asked.pop(t.number, None)
            if candidate is None:
                unit = [to_unit(t.params[n], search_space[n]) for n in self._names]
                candidate = self._optimizer.parametrization.spawn_child(new_value=np.clip(unit, 0.0, 1.0))
            self._optimizer.tell(candidate, direction * float(value))
            self._told.add(t.number)
            self._scores[_key(candidate.value)] = direction * float(value)


MAX_REPEATS = 20  # asks in a row that may return points already scored before one is run anyway


def _key(unit) -> tuple:
    return tuple(np.round(np.asarray(unit, dtype=float), 9))


def in_daemon_thread(fn):
    """``fn()`` run in a daemon thread (and waited for). NGOpt's scipy-based choices (COBYLA, ...) run the
    scipy loop in a thread of their own, created at the first ask and stopped only when the optimizer is
    garbage-collected; a thread inherits its creator's daemon flag, so created here it cannot keep the
    interpreter from exiting."""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="ngopt-ask", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _best_point(study: optuna.Study, names: tuple[str, ...], space: dict[str, BaseDistribution]
                ) -> list[float] | None:
    """The unit coordinates of the study's best finished trial (e.g. the best anchor), None without one."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value) and all(n in t.params for n in names)]
    if not done:
        return None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    best = pick(done, key=lambda t: t.value)
    return [to_unit(best.params[n], space[n]) for n in names]


def _last_intermediate(t: FrozenTrial) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
