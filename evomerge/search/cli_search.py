"""`evomerge search`: run a search with a live display, then finalize and print the test table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from evomerge.search.config import parse_duration


def eta_seconds(budget: int | None, done: int, per_trial_s: float, timeout_s: float | None,
                elapsed_s: float) -> float | None:
    """Seconds until the budget is spent: the trials left at the recent time per trial, or the time left
    of the timeout, whichever comes first; None with neither a trial budget nor a timeout."""
    left = [max(0, budget - done) * per_trial_s] if budget else []
    if timeout_s:
        left.append(max(0.0, timeout_s - elapsed_s))
    return min(left) if left else None


def status_line(record, *, done: int, budget: int | None, best: tuple[float, int] | None, per_trial_s: float,
                eta_s: float | None, pruned: int, failed: int) -> str:
    """The search's one-line status: trial i/N, best so far (trial), last score, merge vs eval, ETA, counts.

    A process's first build compiles (or loads from the cache) the merge kernels and plans: it is
    labelled as the one-off it is, not as the time a merge takes."""
    of = f"{done}/{budget}" if budget else f"{done}"
    best_s = f"{best[0]:.4f} (#{best[1]})" if best else "-"
    last = f"{record.value:.4f}" if record.value is not None else record.state.lower()
    if record.state == "FAIL":
        last += f" ({record.reason[:60]})"
    merge = (f"first build {record.build_s:.1f}s (one-off: compile, plan)" if record.first_build
             else f"merge {record.build_s:.2f}s")
    eta = "-" if eta_s is None else f"{eta_s / 60:.1f} min"
    return (f"trial {of} | best {best_s} | last #{record.number} {last} | {merge} + eval {record.eval_s:.2f}s "
            f"| {per_trial_s:.2f}s/trial | ETA {eta} | pruned {pruned}, failed {failed}")


class Display:
    """Live status on one line (``status_line``), redrawn in a terminal; a plain line per trial otherwise.

    The time per trial is the wall time between this process's finished trials (merge, evaluation,
    sampler and storage), averaged over the last ten, leaving out the first build's one-off compile."""

    def __init__(self, console: Console, budget_trials: int | None, timeout_s: float | None):
        self.console, self.budget, self.timeout = console, budget_trials, timeout_s
        self.live: Live | None = None
        self.times: list[float] = []  # seconds between finished trials, without first builds
        self.first_build_times: list[float] = []
        self.last_event: float | None = None

    def __enter__(self):
        if self.console.is_terminal:
            self.live = Live(Text("waiting for the first trial"), console=self.console, refresh_per_second=4,
                             transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "note":
            self.console.print(data["text"], highlight=False)
            return
        if kind == "interrupted":
            self.console.print(f"[yellow]interrupted during trial {data['number']}: marked as failed "
                               f"('interrupted'); finished trials are kept in the study[/]")
            return
        rec, study = data["record"], data["study"]
        now = time.perf_counter()
        self.times.append(now - (self.last_event if self.last_event is not None else data["started"]))
        self.last_event = now
        from optuna.trial import TrialState

        from evomerge.search.run import _budget_count, best_trials, trial_score

        done = _budget_count(study)
        best = best_trials(study, 1)
        if rec.first_build:  # a one-off compile would inflate the ETA of the next ten trials
            self.first_build_times.append(self.times.pop())
        recent = self.times[-10:] or self.first_build_times[-1:]
        per = sum(recent) / len(recent)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        line = status_line(rec, done=done, budget=self.budget,
                           best=(trial_score(best[0]), best[0].number) if best else None, per_trial_s=per,
                           eta_s=eta_seconds(self.budget, done, per, self.timeout, now - data["started"]),
                           pruned=states.count(TrialState.PRUNED), failed=states.count(TrialState.FAIL))
        if self.live:
            self.live.update(Text(line, no_wrap=True, overflow="ellipsis"))
        else:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)  # a log line: never wrapped


def run_search_command(config: Path, *, overrides: dict[str, Any], finalize: bool, console: Console,
                       out: Console, fail: Callable[[str], None]) -> None:
    """``evomerge search``: set up, run the budget, finalize. Ctrl-C at any point exits with status 130 and
    no traceback: finished trials are in the study (the running one marked), and finalizing writes each
    file whole or not at all, so re-running the same command resumes."""
    try:
        _search(config, overrides=overrides, finalize=finalize, console=console, out=out, fail=fail)
    except KeyboardInterrupt:
        console.print("[yellow]stopped; re-run the same command to resume[/]")
        raise SystemExit(130) from None


def _search(config: Path, *, overrides: dict[str, Any], finalize: bool, console: Console,
            out: Console, fail: Callable[[str], None]) -> None:
    from evomerge.engine import MergeError
    from evomerge.evaluate import TaskError
    from evomerge.recipe import RecipeError
    from evomerge.search.config import ConfigError, load_config, parse_duration
    from evomerge.search.run import SearchRun
    from evomerge.search.space import SpaceError
    from evomerge.search.study import StorageUnreachable

    try:
        cfg = load_config(config, overrides)
        console.print(f"[bold]evomerge search[/] {cfg.name}: output in {cfg.output_dir}")
        run = SearchRun(cfg)
    except (ConfigError, SpaceError, RecipeError, TaskError, MergeError, FileNotFoundError, ValueError,
            StorageUnreachable) as e:
        fail(str(e))
    if cfg.sampler.name == "cmaes" and run.space.off_center():
        console.print("[yellow]note:[/] CMA-ES starts at the middle of each range, not at the default of "
                      + ", ".join(run.space.off_center()) + "; the default is still the first trial")
    for warning in run.worker_warnings():
        console.print(f"[yellow]note:[/] {warning}")
    console.print(f"{len(run.distributions)} searched dimensions ({run.space.method}, {run.space.granularity}); "
                  f"setup {run.stats.setup_s:.1f} s; {len(run.study.trials)} trials already in the study")
    with Display(console, cfg.budget.trials, parse_duration(cfg.budget.timeout)) as display:
        run.on_event = display.event
        try:
            run.run()
        except StorageUnreachable as e:
            fail(f"{e}; re-run the same command when it is back: finished trials are kept")
    if not finalize:
        return
    from evomerge.search.finish import claim_or_report

    if not claim_or_report(run, log=lambda m: console.print(m, highlight=False)):
        if cfg.dataflow and (run.out / "merged" / "config.json").is_file():  # stage 1 done: resume stage 2
            _dataflow_stage(run, console=console, out=out)
        return
    _finalize_and_print(run, console=console, out=out)


def _finalize_and_print(run, *, console: Console, out: Console) -> None:
    """Finalize ``run`` (re-rank, test table, export), print the table, fine-tune the winner if asked."""
    from evomerge.search.export import finalize as do_finalize
    from evomerge.search.finish import mark_finalized
    from evomerge.search.run import _file_lock

    cfg = run.cfg
    with _file_lock(run.out / ".finalize.lock"):  # one worker finalizes at a time
        summary = do_finalize(run, export_checkpoint=cfg.export_checkpoint, log=lambda m: console.print(m))
        mark_finalized(run, summary.winner_trial)
    out.print(_table(summary))
    for k, v in summary.files.items():
        console.print(f"  {k}: {v}")
    if cfg.finetune:
        from evomerge.finetune import REPORT_NAME, finetune_and_report
        from evomerge.search.export import append_section

        res = finetune_and_report(Path(summary.files["checkpoint"]), run.out / "finetuned", cfg.finetune,
                                  tasks=run.task_specs, device=cfg.device, log=lambda m: console.print(m))
        report = (res.out_dir / REPORT_NAME).read_text()
        append_section(run.out / "summary.md", "## Fine-tune of the winner (`finetuned/`)\n"
                       + report.split("\n", 1)[1].replace("\n## ", "\n### "))
        console.print(f"  finetuned: {res.out_dir}")
    if cfg.dataflow:
        _dataflow_stage(run, console=console, out=out)


def _dataflow_stage(run, *, console: Console, out: Console) -> None:
    """The second stage of a combined search (``search.combined``): a data-flow search over the winner."""
    from evomerge.search.combined import STAGE_DIR, run_dataflow_stage

    console.print(f"[bold]stage 2[/]: data-flow search over the winner and the sources, in {run.out / STAGE_DIR}")
    stage = run.cfg.dataflow
    budget = stage.budget or run.cfg.budget
    with Display(console, budget.trials, parse_duration(budget.timeout)) as display:
        second, summary = run_dataflow_stage(run, on_event=display.event, log=lambda m: console.print(m))
    if summary is None:
        return
    out.print(_table(summary))
    for k, v in summary.files.items():
        console.print(f"  {k}: {v}")


def run_finalize_command(run_dir: Path | None, *, storage: str | None, study_name: str | None,
                         output_dir: Path | None, console: Console, out: Console, fail: Callable[[str], None]) -> None:
    """``evomerge finalize``: finalize a study by hand (again: the files are rewritten whole, the same way)."""
    from evomerge.search.finish import run_for_finalize
    from evomerge.search.study import StorageUnreachable

    try:
        run = run_for_finalize(run_dir, storage=storage, study_name=study_name, output_dir=output_dir)
    except (FileNotFoundError, KeyError, ValueError, StorageUnreachable) as e:
        fail(str(e))
    running = run.running_trials()
    if running:
        console.print(f"[yellow]note:[/] {len(running)} trial(s) still running; finalizing what has finished")
    try:
        _finalize_and_print(run, console=console, out=out)
    except RuntimeError as e:
        fail(str(e))


def _table(summary) -> Table:
    tasks = list(summary.rows[0].per_task)
    t = Table(title="test split")
    for c in ("model", "aggregate", "95% CI", *tasks):
        t.add_column(c)
    for r in summary.rows:
        ci = "" if r.ci is None else f"[{r.ci[0]:.3f}, {r.ci[1]:.3f}]"
        t.add_row(r.label, f"{r.aggregate:.3f}", ci, *[f"{r.per_task[k]:.3f}" for k in tasks])
    return t
