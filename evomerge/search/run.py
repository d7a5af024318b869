"""The search loop: ask Optuna for parameters, build the candidate in memory, score it, tell Optuna.

One :class:`SearchRun` per process. Several processes pointed at the same storage and study act as
workers of one search (on one host or many: ``workers.py``); re-running the same command resumes it
and finishes the budget. Ctrl-C (or SIGTERM) marks the running trial as failed with reason
"interrupted" and stops; nothing else is lost. A trial left RUNNING by a process that died (SIGKILL,
power loss) is marked failed by the next process to start on its host, or by any worker once its
heartbeat has been silent for the grace period, and its budget slot is run again. A worker whose
share of the budget is spent waits while other workers' trials run, so that a lost one is re-run.
A failed candidate (NaN weights, out of memory, an evaluation error) is recorded as failed with its
reason and the search goes on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from evomerge.search.builder import CandidateBuilder
from evomerge.search.config import RunConfig, parse_duration
from evomerge.search.space import SearchSpace, load_space
from evomerge.search.study import StorageUnreachable, make_pruner, make_sampler, make_storage, open_study
from evomerge.search.finish import CONFIG_ATTR, stored_config
from evomerge.search.fingerprint import differences, fingerprint
from evomerge.search.held_writes import held_writes
from evomerge.search.workers import Heartbeat, fail_dead_here, fail_lost, worker_id, worker_seed


@dataclass
class Inputs:
    """The resolved models and tasks of a run (from the config, or from the demo zoo)."""

    base_model: str
    models: dict[str, str]
    tasks: Any
    reference: str | None = None  # the zoo's multi-task reference (reported beside the winner)


def resolve_inputs(cfg: RunConfig, progress: Callable[[str], None] = print) -> Inputs:
    """Base, fine-tunes and tasks of a run; builds the demo zoo first when the config asks for it."""
    reference = cfg.reference_model
    base, models, tasks = cfg.base_model, cfg.models, cfg.tasks
    if cfg.zoo is not None:
        from evomerge.zoo import build_zoo

        zoo = build_zoo(cfg.zoo.dir, size=cfg.zoo.size, seed=cfg.zoo.seed, progress=True, variant=cfg.zoo.variant())
        base = base or str(zoo.base)
        if cfg.zoo.adapters and not models:
            from evomerge.zoo_adapters import build_adapters

            models = {name: str(p) for name, p in build_adapters(zoo, log=progress).items()}
        models = models or {name: str(p) for name, p in zoo.experts.items()}
        tasks = tasks or str(zoo.tasks_yaml)
        reference = reference or str(zoo.multitask)
    if isinstance(models, list):
        models = {Path(m).name: m for m in models}
    return Inputs(base_model=str(base), models=dict(models), tasks=tasks, reference=reference)


@dataclass
class TrialRecord:
    number: int
    state: str
    value: float | None
    scores: dict[str, float]
    build_s: float
    eval_s: float
    reason: str = ""
    first_build: bool = False  # this process's first build: one-off compiling (numba, Triton) and planning


@dataclass
class LoopStats:
    """Where this process's search time went."""

    build_s: float = 0.0  # merging candidates, without the first build (``first_build_s``)
    first_build_s: float = 0.0  # this process's first build: one-off compile and planning
    eval_s: float = 0.0
    plan_s: float = 0.0
    setup_s: float = 0.0
    trials: list[TrialRecord] = field(default_factory=list)


class SearchRun:
    """Everything one search process needs: config, space, resident candidate builder, evaluators, study."""

    def __init__(self, cfg: RunConfig, *, on_event: Callable[[str, dict], None] | None = None):
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        self.cfg = cfg
        self.on_event = on_event or (lambda kind, data: None)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.inputs = resolve_inputs(cfg)
        where = cfg.search_space if isinstance(cfg.search_space, str) else "search_space"
        # the space checks itself against the models' headers, then makes the builder of its candidates
        self.space: SearchSpace = load_space(cfg.search_space, where=where).bind(
            self.inputs.base_model, self.inputs.models, where)
        from evomerge.evaluate import load_tasks
        from evomerge.search.gradient_start import resolve_start

        self.task_specs = load_tasks(self.inputs.tasks)
        self.start = resolve_start(cfg.start, self.space, self.task_specs, cfg.lora_scalings)  # before heavy work
        self.builder = self.space.make_builder(self.inputs, cfg, self.out)
        self.tokenizer = AutoTokenizer.from_pretrained(self.inputs.base_model)
        self.num_layers = self.builder.num_layers
        self.model_names = list(self.inputs.models)
        self.space = self.space.with_calibration_tasks(  # data-aware methods
            self.inputs.tasks, self.inputs.models, [t.name for t in self.task_specs])
        self._evaluators: dict[str, Any] = {}
        self.n_objectives = len(self.task_specs) if cfg.objectives == "per_task" else 1
        self.distributions = self.space.distributions(self.model_names, self.num_layers)
        self.default_point = self.space.default_point(self.model_names, self.num_layers)
        self.study = self._open_study()
        _save_config(cfg, self.out)  # only now: a config refused above leaves a previous run's file alone
        self.stats = LoopStats()
        self._current: optuna.Trial | None = None  # the trial this process is running, if any
        self._built = False  # whether this process has built a candidate yet (the first one compiles)
        self._scored: dict[str, tuple] = {}  # recipe_key -> (trial, values, aggregate, per task) of this process
        self.heartbeat: Heartbeat | None = None  # beats for the running trial while ``run`` runs
        self.stats.setup_s = time.perf_counter() - t0 + self.builder.precompute()

    # -- pieces -----------------------------------------------------------------------------------
    def evaluator(self, split: str, proxy: bool = False):
        """The evaluator of ``split`` by the tasks' metrics, or by their smooth proxies."""
        from evomerge.evaluate import Evaluator

        if (split, proxy) not in self._evaluators:
            self._evaluators[split, proxy] = Evaluator(
                self.task_specs, self.tokenizer, split=split, batch_size=self.cfg.batch_size,
                device=self.builder.device, bootstrap_iters=1000 if split == "test" else 0, seed=self.cfg.seed,
                proxy=proxy)
        return self._evaluators[split, proxy]

    def search_evaluators(self) -> list:
        """What scores the search split: the metric, its proxy, or both (``search_metric: mix``, averaged)."""
        kinds = {"task": [False], "proxy": [True], "mix": [False, True]}[self.cfg.search_metric]
        return [self.evaluator("search", proxy) for proxy in kinds]

    def recipe_for(self, point: dict[str, float], name: str | None = None):
        """The complete recipe of a point in the search space."""
        return self.space.to_recipe(point, base_model=self.inputs.base_model, models=self.inputs.models,
                                    num_layers=self.num_layers, dtype=self.cfg.dtype, name=name)

    def study_name(self) -> str:
        return self.cfg.study_name or self.cfg.name

    def _open_study(self) -> optuna.Study:
        storage = make_storage(self.cfg.storage, self.out, retry_s=self.cfg.workers.storage_retry_s)
        pruner = make_pruner(self.cfg.pruner, self.n_objectives)
        self._seed = self.cfg.seed  # a joining worker's own below
        with file_lock(self.out / ".study.lock"):  # one creator; the start points enqueued once
            study = open_study(storage=storage, name=self.study_name(), sampler=self._sampler(None),
                               pruner=pruner, n_objectives=self.n_objectives)
            mine = fingerprint(self)
            if not study.get_trials(deepcopy=False):
                study.set_user_attr("distributions", sorted(self.distributions))
                study.set_user_attr("method", self.space.method)
                study.set_user_attr("fingerprint", mine)
                study.set_user_attr(CONFIG_ATTR, stored_config(self.cfg))
                starts = (self.space.anchor_points(self.model_names, self.num_layers)
                          if self.start != "default" else [self.default_point])
                if self.start == "gradient":
                    starts += self._fitted_start(study, starts)
                study.set_user_attr("anchors", len(starts))
                for i, point in enumerate(starts):
                    study.enqueue_trial(point, user_attrs={"default": True} if i == 0 else {"anchor": i})
            else:
                known = study.user_attrs.get("distributions")
                if known is not None and known != sorted(self.distributions):
                    raise ValueError(f"study '{self.study_name()}' in this storage was created with a different "
                                     f"search space; use another --study-name or output_dir")
                diff = differences(study.user_attrs.get("fingerprint", mine), mine)
                if diff:
                    raise ValueError(f"study '{self.study_name()}' was created with another config than this "
                                     f"worker's: " + "; ".join(diff))
                # a joining worker samples its own points (the same seed would repeat the first worker's)
                self._seed = worker_seed(self.cfg.seed)
                study.sampler = self._sampler(study.user_attrs.get("start_point"))
            fail_dead_here(study, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        return study

    def _fitted_start(self, study: optuna.Study, anchors: list[dict[str, float]]) -> list[dict[str, float]]:
        """The ``start: gradient`` point (a list of one), fitted from the anchor of lowest search-split loss; its
        summary is kept in the study's ``gradient_start`` attribute."""
        from evomerge.engine import STATISTICS_CACHE_NAME
        from evomerge.search.gradient_start import GradientStartError, fit_start

        try:
            point, summary = fit_start(
                recipe_for=self.recipe_for, distributions=self.distributions, starts=anchors, model=self.builder.model,
                evaluator=self.evaluator("search", proxy=True), plan_of=self.builder.plan,
                statistics_cache=self.out / STATISTICS_CACHE_NAME,
                progress=lambda text: self.on_event("note", {"text": text}))
        except GradientStartError as e:  # e.g. memory; start: auto goes on from the anchors alone
            if self.cfg.start != "auto":
                raise
            self.on_event("note", {"text": f"{e}; starting from the anchors alone"})
            return []
        study.set_user_attr("gradient_start", summary)
        self.on_event("note", {"text": f"gradient start: search-split loss {summary['start_loss']:.4f} -> "
                                       f"{summary['fitted_loss']:.4f} in {summary['seconds']:.0f} s"})
        return [point]

    # -- the loop ---------------------------------------------------------------------------------
    def _budget_left(self, started: float, taken: int) -> bool:
        """Whether a trial may start: fewer than ``budget.trials`` taken, and this invocation's timeout not up."""
        b = self.cfg.budget
        if b.trials is not None and taken >= b.trials:
            return False
        timeout = parse_duration(b.timeout)
        return timeout is None or time.perf_counter() - started < timeout

    def _next_step(self, started: float) -> str:
        """"trial" (a budget slot is free), "wait" (the budget is taken but trials of other workers still
        run: one may be lost and its slot freed) or "done". Marks dead and lost workers' trials first."""
        trials = self.study.get_trials(deepcopy=False)  # one read for the checks below
        running = [t for t in trials if t.state == TrialState.RUNNING]
        gone = fail_dead_here(self.study, running) + fail_lost(self.study, running, self.cfg.workers.grace_s)
        if gone:
            self.on_event("note", {"text": f"trial{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))}: "
                                           f"worker lost; marked failed, the slot is run again"})
        taken = sum(counts(t) for t in trials) - len(gone)
        if not self._budget_left(started, taken):
            timeout = parse_duration(self.cfg.budget.timeout)
            if timeout is not None and time.perf_counter() - started >= timeout:
                return "done"  # this invocation's time is up
            others = len(running) - len(gone)
            return "wait" if others > 0 else "done"
        return "trial"

    def run(self) -> LoopStats:
        """Run trials until the budget is spent and no other worker's trial still runs; returns this
        process's statistics."""
        started = time.perf_counter()
        self.heartbeat = Heartbeat(self.study._storage, self.cfg.workers.heartbeat_s)
        waiting = False
        try:
            with _sigterm_as_interrupt():
                while True:
                    self._current = None
                    try:
                        step = self._next_step(started)
                        if step == "done":
                            break
                        if step == "wait":
                            if not waiting:
                                self.on_event("note", {"text": "budget taken; waiting for the trials other workers "
                                                               "are running"})
                            waiting = True
                            time.sleep(min(1.0, self.cfg.workers.heartbeat_s))
                            continue
                        waiting = False
                        trial = self._ask()
                        if self._over_budget(trial):
                            # other workers took the last slots between our budget check and ask()
                            _fail(trial, "over budget (another worker took the last slot)")
                            self.heartbeat.set(None)
                            continue
                        record = self.run_trial(trial)
                    except KeyboardInterrupt:
                        if self._current is not None and _fail(self._current, "interrupted"):
                            self.on_event("interrupted", {"number": self._current.number})
                        raise
                    self.stats.trials.append(record)
                    self.on_event("trial", {"record": record, "study": self.study, "started": started})
        finally:
            self.heartbeat.close()
            self.heartbeat = None
        return self.stats

    def _sampler(self, x0: dict[str, float] | None) -> optuna.samplers.BaseSampler:
        """The run's sampler; while a CMA-ES run's anchors are still being scored, a random sampler
        (anchors are enqueued, so it samples nothing) that leaves no CMA-ES state behind."""
        if self.start != "default" and self.cfg.sampler.name == "cmaes" and x0 is None:
            return optuna.samplers.RandomSampler(seed=self._seed)
        return make_sampler(self.cfg.sampler, seed=self._seed, n_objectives=self.n_objectives, x0=x0,
                            learn_from_pruned=self.cfg.pruner.name != "none", budget=self.cfg.budget.trials)

    def _start_sampler(self) -> None:
        """Hand over to CMA-ES once every anchor has finished, its mean at the best anchor by search score.

        The start point is stored in the study the first time, so resumed runs and other workers start
        the same CMA-ES (which then restores its state from the trials)."""
        if not isinstance(self.study.sampler, optuna.samplers.RandomSampler) or self.cfg.sampler.name != "cmaes":
            return
        x0 = self.study.user_attrs.get("start_point")
        if x0 is None:
            anchors = [t for t in self.study.get_trials(deepcopy=False)
                       if t.user_attrs.get("default") or t.user_attrs.get("anchor")]
            if any(not t.state.is_finished() for t in anchors):
                return  # some still queued or running: they come first
            done = [t for t in anchors if t.state == TrialState.COMPLETE]
            best = max(done, key=trial_score) if done else None
            x0 = dict(best.params) if best else dict(self.default_point)
            self.study.set_user_attr("start_point", x0)
        self.study.sampler = self._sampler(x0)

    def running_trials(self) -> list[optuna.trial.FrozenTrial]:
        """The study's trials running now (on any worker)."""
        return self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def worker_warnings(self) -> list[str]:
        """What a worker joining a busy study should know: CMA-ES with more workers than its population
        wastes trials (Optuna's CmaEsSampler ignores trials that finish after their generation moved on)."""
        if self.cfg.sampler.name != "cmaes":
            return []
        from evomerge.search.workers import active_workers, cmaes_popsize

        workers = len(active_workers(self.running_trials()) | {worker_id()})
        popsize = cmaes_popsize(self.cfg.sampler.popsize, len(self.distributions))
        if workers <= popsize:
            return []
        return [f"{workers} workers share this study but CMA-ES's population is {popsize}: trials finishing after "
                f"their generation moved on are discarded; set sampler.popsize to at least {workers}, or use "
                f"tpe for wide runs (docs/distributed.md)"]

    def wait_for_running(self) -> None:
        """Block until no trial of the study is running (marking lost workers' trials on the way)."""
        while True:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            gone = fail_dead_here(self.study, running) + fail_lost(self.study, running, self.cfg.workers.grace_s)
            if len(running) == len(gone):
                return
            time.sleep(min(1.0, self.cfg.workers.heartbeat_s))

    def _over_budget(self, trial: optuna.Trial) -> bool:
        """True when ``trial`` is not among the first ``budget`` counted trials by number: trial numbers are
        handed out atomically, so of workers racing for the last slots exactly the earliest win."""
        if self.cfg.budget.trials is None:
            return False
        ahead = [t for t in self.study.get_trials(deepcopy=False) if t.number <= trial.number and counts(t)]
        return len(ahead) > self.cfg.budget.trials

    def _ask(self) -> optuna.Trial:
        """A new trial tagged with this worker, then its sampled parameters in one storage write
        (``held_writes``).

        Tagging on its own write, first, keeps the window in which a killed process leaves an untagged
        RUNNING trial (one the next start cannot recognise as orphaned) down to two storage writes.
        """
        self._start_sampler()
        with _interrupts_deferred():  # created and tagged, or neither
            trial = self._current = self.study.ask()  # from here on, Ctrl-C marks it (``run``)
            trial.set_user_attr("worker", worker_id())
        if self.heartbeat is not None:
            self.heartbeat.set(trial._trial_id)
        with held_writes(self.study._storage):
            for name, dist in self.distributions.items():
                trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        return trial

    def run_trial(self, trial: optuna.Trial) -> TrialRecord:
        """Build, score and tell one trial; failures are recorded, not raised. A trial another worker marked
        lost meanwhile (this worker was silent past the grace period) keeps that verdict: its result is dropped."""
        try:
            return self._run_trial(trial)
        except StorageUnreachable:
            raise
        except (RuntimeError, ValueError):
            frozen = self.study._storage.get_trial(trial._trial_id)
            if not (frozen.state.is_finished() and frozen.user_attrs.get("interrupted")):
                raise
            return TrialRecord(trial.number, "FAIL", None, {}, 0.0, 0.0, frozen.user_attrs.get("fail_reason", ""))
        finally:
            if self.heartbeat is not None:
                self.heartbeat.set(None)

    def _run_trial(self, trial: optuna.Trial) -> TrialRecord:
        recipe = self.recipe_for(trial.params, name=f"{self.cfg.name}-trial-{trial.number}")
        text = recipe.to_yaml()
        attrs: dict[str, Any] = {"recipe": text}  # written with the outcome, in one write
        if recipe_key(text) in self._scored:  # a recipe this process scored already (data-flow points often
            return self._rescore(trial, attrs, *self._scored[recipe_key(text)])  # decode to the same flow)
        build_s = eval_s = 0.0
        first_build = False
        try:
            t0 = time.perf_counter()
            bstats = self.builder.build(recipe)
            build_s = time.perf_counter() - t0
            first_build = not self._built
            self._built = True
            if first_build:
                attrs["first_build"] = True
                self.stats.first_build_s += build_s
            else:
                self.stats.build_s += build_s
            self.stats.plan_s += bstats.plan
            _check_finite(self.builder)
            t1 = time.perf_counter()
            result, pruned_at = self._score(trial)
            eval_s = time.perf_counter() - t1
            self.stats.eval_s += eval_s
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failed candidate must not stop an overnight search
            if isinstance(e, torch.OutOfMemoryError) and self.builder.device.type == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(e).__name__}: {e}"
            self._record(trial, {**attrs, "build_s": round(build_s, 4), "eval_s": round(eval_s, 4),
                                 "fail_reason": reason[:2000], "traceback": traceback.format_exc()[-4000:]})
            self.study.tell(trial, state=TrialState.FAIL)
            return TrialRecord(trial.number, "FAIL", None, {}, build_s, eval_s, reason, first_build)
        attrs.update(build_s=round(build_s, 4), eval_s=round(eval_s, 4), scores=result.per_task if result else {})
        if pruned_at is not None:
            self._record(trial, {**attrs, "pruned_at": pruned_at})
            self.study.tell(trial, state=TrialState.PRUNED)
            return TrialRecord(trial.number, "PRUNED", None, {}, build_s, eval_s, "pruned", first_build)
        self._record(trial, attrs)
        values = ([result.per_task[t.name] for t in self.task_specs] if self.n_objectives > 1
                  else result.aggregate - self.weight_penalty(trial.params))
        self.study.tell(trial, values)
        self._scored[recipe_key(text)] = (trial.number, values, result.aggregate, dict(result.per_task))
        value = result.aggregate
        return TrialRecord(trial.number, "COMPLETE", value, dict(result.per_task), build_s, eval_s,
                           first_build=first_build)

    def _record(self, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        """A trial's user attributes (recipe, timings, scores, ...) in one storage write."""
        with held_writes(self.study._storage):
            for key, value in attrs.items():
                trial.set_user_attr(key, value)

    def _rescore(self, trial: optuna.Trial, attrs: dict[str, Any], same_as: int, values, aggregate: float,
                 per_task: dict) -> TrialRecord:
        """Tell a trial whose recipe equals trial ``same_as``'s the same scores, without building or scoring it
        (scoring is deterministic: it would get them again)."""
        self._record(trial, {**attrs, "same_as": same_as, "build_s": 0.0, "eval_s": 0.0, "scores": per_task})
        self.study.tell(trial, values)
        return TrialRecord(trial.number, "COMPLETE", aggregate, dict(per_task), 0.0, 0.0, reason=f"same as #{same_as}")

    def weight_penalty(self, params: dict[str, float]) -> float:
        """LoraHub's L1 regulariser (Huang et al., 2023, "LoraHub"): ``weight_l1`` · Σ|w| over the searched
        model weights (parameters named ``weight``), subtracted from the search score."""
        if not self.cfg.weight_l1:
            return 0.0
        return self.cfg.weight_l1 * sum(abs(v) for k, v in params.items() if k.split("[", 1)[0] == "weight")

    def _score(self, trial: optuna.Trial):
        """Score on the search split, reporting running scores chunk by chunk to the pruner. Returns the
        result and, for a pruned trial, where it was stopped (the result is then None)."""
        evs = self.search_evaluators()
        if self.cfg.pruner.name == "none" or self.n_objectives > 1:
            return mean_result([ev.evaluate(self.builder.model) for ev in evs]), None
        streams = [ev.evaluate_chunks(self.builder.model, self.cfg.pruner.chunk_size) for ev in evs]
        for step, running in enumerate(zip(*streams)):  # every evaluator chunks its split the same way
            score = sum(r.aggregate for r in running) / len(running) - self.weight_penalty(trial.params)
            trial.report(score, step)
            if trial.should_prune():
                return None, {"examples": running[0].examples_seen, "score": score}
        for stream in streams[1:]:  # zip stopped at the first one's end: let the others finish theirs
            for _ in stream:
                pass
        return mean_result([ev.last_result for ev in evs]), None


# ---------------------------------------------------------------------------------------------------
def mean_result(results: list):
    """One search-split result from several scorings of it (``search_metric: mix``): the mean aggregate and
    per-task values (the first result when there is one)."""
    if len(results) == 1:
        return results[0]
    n = len(results)
    per_task = {t: sum(r.per_task[t] for r in results) / n for t in results[0].per_task}
    return dataclasses.replace(results[0], aggregate=sum(r.aggregate for r in results) / n, per_task=per_task,
                               tasks={}, seconds=sum(r.seconds for r in results))


def _save_config(cfg: RunConfig, out: Path) -> None:
    """The resolved config, next to the study (``evomerge export`` reads storage and seed from it)."""
    import yaml

    tmp = out / f"run_config.yaml.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(out / "run_config.yaml")


def counts(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against the budget: finished or running, and not interrupted (Ctrl-C, a dead or
    lost worker, over budget)."""
    if t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
        return False
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def budget_count(study: optuna.Study) -> int:
    """Trials that count against the budget (``counts``)."""
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def _fail(trial: optuna.Trial, reason: str) -> bool:
    """Tell ``trial`` FAIL with ``reason``, not counted against the budget; False if it had already finished
    (a Ctrl-C that lands after its ``tell``)."""
    try:
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("interrupted", True)
        trial.study.tell(trial, state=TrialState.FAIL)
    except (RuntimeError, ValueError):  # optuna: "has already finished and can not be updated" / "Cannot tell"
        return False
    return True


def _check_finite(builder: CandidateBuilder) -> None:
    name = builder.nonfinite_tensor()
    if name is not None:
        raise FloatingPointError(f"candidate has NaN or infinite values in {name}")


@contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` for the block (one creator, one finalizer per run directory)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _signal_handlers(handlers: dict):
    """``handlers`` ({signal number: handler}) installed for the block; in a thread other than the main one,
    where Python allows no signal handlers, the block runs without them."""
    try:
        previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """SIGTERM stops the search like Ctrl-C (the running trial is marked interrupted)."""
    return _signal_handlers({signal.SIGTERM: _raise_interrupt})


@contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM that arrive inside the block take effect (as KeyboardInterrupt) when it ends, so a
    trial is never left RUNNING without its worker tag; a second signal inside the block stops at once."""
    pending: list[int] = []

    def hold(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    with _signal_handlers({signal.SIGINT: hold, signal.SIGTERM: hold}):
        yield
    if pending:
        raise KeyboardInterrupt


def best_trials(study: optuna.Study, k: int, within: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """The top-k complete trials by search-split aggregate (per-task studies: mean of objectives), among
    the first ``within`` trials of the study when given (what a run of that budget would have finalized);
    of trials with the same recipe (``recipe_key``), only the first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if within is None or t.number < within]

    def score(t):
        return t.value if len(t.values) == 1 else sum(t.values) / len(t.values)

    out, seen = [], set()
    for t in sorted(done, key=score, reverse=True):  # stable: the earliest of equal scores first
        key = recipe_key(t.user_attrs.get("recipe") or str(t.number))
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) == k:
            break
    return out


def recipe_key(recipe_yaml: str) -> str:
    """A recipe's text without its ``name:`` line: two trials with the same key merge the same model."""
    return "\n".join(line for line in recipe_yaml.splitlines() if not line.startswith("name: "))


def trial_score(t: optuna.trial.FrozenTrial) -> float:
    return t.values[0] if len(t.values) == 1 else sum(t.values) / len(t.values)
