"""Combined searches (Sakana's recipe, arXiv:2403.13187): parameter space first, then data flow over its winner.

A run config with a ``dataflow:`` section runs its search as usual; once finalized, its winner's checkpoint
(``output_dir/merged``) joins the base and the fine-tunes as one more source (named ``winner_name``) of a
data-flow search (``dataflow_space``) with its own study, written to ``output_dir/dataflow``. The second
stage's test table (its winner, the base's identity flow, the first stage's winner, every fine-tune, the
base) is appended to the first stage's ``summary.md`` and shown in its ``report.html``, so one report holds
both stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from evomerge.search.config import RunConfig

STAGE_DIR = "dataflow"  # the second stage's output directory, inside the run's


def dataflow_stage_config(run) -> RunConfig:
    """The second stage's run config: the data-flow space over the first stage's winner and the run's models."""
    cfg: RunConfig = run.cfg
    stage = cfg.dataflow
    winner = Path(cfg.output_dir) / "merged"
    if not (winner / "config.json").is_file():
        raise FileNotFoundError(f"dataflow: the first stage's winner {winner} is missing; finalize that run first")
    if stage.winner_name in run.inputs.models or stage.winner_name == "base":
        raise ValueError(f"dataflow.winner_name: '{stage.winner_name}' is already a model of the run; choose another")
    return cfg.model_copy(update={
        "name": f"{cfg.name}-{STAGE_DIR}", "study_name": f"{cfg.study_name or cfg.name}-{STAGE_DIR}",
        "zoo": None, "base_model": run.inputs.base_model, "tasks": run.inputs.tasks,
        "reference_model": run.inputs.reference,
        "models": {**run.inputs.models, stage.winner_name: str(winner)},
        "search_space": stage.search_space, "budget": stage.budget or cfg.budget,
        "sampler": stage.sampler or cfg.sampler, "output_dir": str(Path(cfg.output_dir) / STAGE_DIR),
        "dataflow": None, "finetune": None})


def stage_section(first, second, summary) -> str:
    """The markdown appended to the first stage's summary: the data-flow stage's test table and recipe."""
    from evomerge.search.export import render_summary

    body = render_summary(second, summary).split("\n", 1)[1]  # its own title dropped
    body = body.replace("\n## ", "\n### ")
    return (f"## Stage 2: data-flow search over this winner (`{STAGE_DIR}/`)\n\n"
            f"The first stage's winner is the source `{first.cfg.dataflow.winner_name}` of a data-flow search "
            f"(docs/dataflow.md); its row in the table below is `fine-tune: {first.cfg.dataflow.winner_name}`.\n"
            + body)


def run_dataflow_stage(first, *, on_event: Callable[[str, dict], None] | None = None, log=print):
    """Run the second stage of ``first`` (a ``SearchRun`` whose winner is exported) until its budget is spent,
    then, if this worker wins the finalize claim (``finish.claim_or_report``: one worker of a shared study),
    finalize it and append it to the first stage's summary and report. Re-running resumes the stage like any
    search. Returns (the second stage's run, its summary, or None when another worker finalizes it)."""
    from evomerge.search.export import append_section, finalize
    from evomerge.search.finish import claim_or_report, mark_finalized
    from evomerge.search.run import SearchRun

    second = SearchRun(dataflow_stage_config(first), on_event=on_event)
    second.run()
    if not claim_or_report(second, log=log):
        return second, None
    summary = finalize(second, export_checkpoint=True, log=log)
    mark_finalized(second, summary.winner_trial)
    append_section(first.out / "summary.md", stage_section(first, second, summary))
    try:
        from evomerge.report import write_report

        write_report(first.out)  # its page now shows stage 2's test table too
    except Exception as e:  # a convenience, as in ``export.finalize``
        log(f"warning: report.html failed: {type(e).__name__}: {e}")
    return second, summary
