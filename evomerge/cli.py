"""The ``evomerge`` command line: thin wrappers over the Python API, with rich progress output."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search for the best way to merge fine-tuned language models.")
zoo_app = typer.Typer(no_args_is_help=True, help="The built-in offline demo model zoo.")
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="mergekit-compatible recipe YAML"),
    out_dir: Path = typer.Argument(..., help="output model directory (created atomically)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(0, help="seed for DARE/DELLA random masks"),
    out_shard_size: str = typer.Option("2GB", help="maximum size of one safetensors shard"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
    allow_pickle: bool = typer.Option(False, help="allow pickled .bin checkpoints (loaded weights_only)"),
    dry_run: bool = typer.Option(False, help="print the plan without reading weights"),
    backend: str = typer.Option("auto", help="auto | reference | cpu | cuda: the task-arithmetic family's "
                                             "kernels (auto: compiled on the CPU; the same bits)"),
) -> None:
    """Merge models as RECIPE says and write the result to OUT_DIR."""
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from evomerge.checkpoint import CheckpointError
    from evomerge.engine import MergeError, plan_merge, run_merge
    from evomerge.recipe import RecipeError

    try:
        plan = plan_merge(recipe, allow_pickle=allow_pickle, where=str(recipe))
        if dry_run:
            out.print(f"# {len(plan.tasks)} output tensors, {plan.num_layers} layers, method "
                      f"{plan.method.name}, ~{plan.output_bytes / 1e6:.1f} MB", highlight=False)
            for task in plan.tasks:
                out.print(task.describe(), highlight=False, markup=False)
            return
        if out_dir.exists() and not overwrite:
            _fail(f"{out_dir} exists; pass --overwrite to replace it")
        total = plan.output_bytes
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      DownloadColumn(), TimeElapsedColumn(), console=console, transient=False) as bar:
            tensors = bar.add_task("tensors", total=len(plan.tasks))
            nbytes = bar.add_task("bytes", total=total)

            def progress(task, n):
                bar.advance(tensors)
                bar.advance(nbytes, n)

            path = run_merge(plan, out_dir, device=device, seed=seed, out_shard_size=out_shard_size,
                             overwrite=overwrite, progress=progress, backend=backend)
        console.print(f"[green]wrote[/] {path}")
    except (RecipeError, CheckpointError, MergeError, ValueError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; nothing was written[/]")
        raise typer.Exit(130)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters with defaults."""
    from evomerge.methods import METHODS

    table = Table(title="merge methods")
    for col in ("method", "base", "parameters (per model)", "parameters (global)", "in mergekit", "reference"):
        table.add_column(col)
    for m in METHODS.values():
        def fmt(p):
            return f"{p.name}" + ("" if p.default is None else f"={p.default}") + ("" if p.default is not None else " (required)")
        table.add_row(m.name, "required" if m.requires_base else "optional",
                      ", ".join(fmt(p) for p in m.params if p.per_model) or "-",
                      ", ".join(fmt(p) for p in m.params if not p.per_model) or "-",
                      ("yes" if m.in_mergekit else "no") + (" (needs calibration:)" if m.calibration else ""),
                      m.reference)
    out.print(table)


@app.command()
def evaluate(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory"),
    tasks: Path = typer.Option(..., "--tasks", help="task YAML"),
    split: str = typer.Option("test", help="search | validation | test"),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(32),
    out_json: Optional[Path] = typer.Option(None, "--out", help="write the scores as JSON here"),
) -> None:
    """Score MODEL_DIR on the tasks' SPLIT and print a per-task table with the aggregate."""
    from evomerge.evaluate import TaskError, evaluate_model_dir, render_table

    try:
        result = evaluate_model_dir(model_dir, tasks, split=split, device=None if device == "auto" else device,
                                    batch_size=batch_size, out_json=out_json)
    except (TaskError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    out.print(render_table(result))


@app.command()
def search(
    config: Path = typer.Argument(..., help="run config YAML (see configs/)"),
    trials: Optional[int] = typer.Option(None, help="total trial budget of the study (overrides the config)"),
    timeout: Optional[str] = typer.Option(None, help="wall-time budget of this invocation, e.g. 8h, 90m"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: a journal file in output_dir)"),
    study_name: Optional[str] = typer.Option(None, help="study name (default: the config's name)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:N]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="run directory (overrides the config)"),
    finalize: bool = typer.Option(True, help="re-rank, score on test and export when the budget is spent"),
) -> None:
    """Search merge parameters with Optuna, then export the winner and print the test table."""
    from evomerge.search.cli_search import run_search_command

    run_search_command(config, overrides={"trials": trials, "timeout": timeout, "storage": storage,
                                          "study_name": study_name, "device": device,
                                          "output_dir": str(output_dir) if output_dir else None},
                       finalize=finalize, console=console, out=out, fail=_fail)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a search's output directory"),
    out_dir: Path = typer.Argument(..., help="where to write the checkpoint"),
    trial: Optional[int] = typer.Option(None, help="trial number (default: the winner)"),
    storage: Optional[str] = typer.Option(None, help="storage URL, if not the run's own"),
    device: str = typer.Option("auto"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Re-export any recorded trial of a search as a merged checkpoint."""
    from evomerge.recipe import RecipeError
    from evomerge.search.export import export_trial

    try:
        path = export_trial(run_dir, out_dir, trial=trial, storage=storage, device=device, overwrite=overwrite)
    except (RecipeError, FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))
    console.print(f"[green]wrote[/] {path}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a search's output directory (finished or still running)"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="the page (default RUN_DIR/report.html)"),
) -> None:
    """Write one self-contained HTML page of a search: test table, history, per-layer winner, timing, recipe."""
    from evomerge.report import write_report

    try:
        path = write_report(run_dir, out_file)
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))
    console.print(f"[green]wrote[/] {path}")


@app.command("push")
def push_cmd(
    path: Path = typer.Argument(..., help="a search's run directory (merged/ and the report) or a model directory"),
    repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME on the Hugging Face Hub"),
    private: bool = typer.Option(False, help="create the repository as private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if needed)"),
    dry_run: bool = typer.Option(False, help="list the files that would be uploaded; no network, no token"),
) -> None:
    """Upload a checkpoint with its model card (and a search's report) to the Hugging Face Hub."""
    from evomerge.push import PushError, check_repo_id, plan_upload, push, require_hub_access

    try:
        if dry_run:
            check_repo_id(repo_id)
            for u in plan_upload(path):
                out.print(f"{u.path_in_repo}  <-  {u.local}", highlight=False, markup=False, soft_wrap=True)
            return
        token = require_hub_access()  # before reading anything: offline or logged out is a clear error
        url = push(path, repo_id, private=private, revision=revision, token=token)
    except PushError as e:
        _fail(str(e))
    except Exception as e:  # the Hub's answer (permissions, network): its message, not a traceback
        _fail(f"push to {repo_id} failed: {type(e).__name__}: {e}")
    console.print(f"[green]pushed[/] {url}")


@app.command("finalize")
def finalize_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="a search's output directory"),
    storage: Optional[str] = typer.Option(None, help="storage URL (with --study-name: no run directory needed)"),
    study_name: Optional[str] = typer.Option(None, help="study name (default: the run's)"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="where to write (default: the run's)"),
) -> None:
    """Finalize a search by hand: re-rank finalists, score on test, export the winner (idempotent)."""
    from evomerge.search.cli_search import run_finalize_command

    run_finalize_command(run_dir, storage=storage, study_name=study_name, output_dir=output_dir,
                         console=console, out=out, fail=_fail)


@app.command("status")
def status_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="a search's output directory"),
    storage: Optional[str] = typer.Option(None, help="storage URL (with --study-name: no run directory needed)"),
    study_name: Optional[str] = typer.Option(None, help="study name (default: the run's)"),
) -> None:
    """Where a search stands (read-only, while workers run): trials per worker, best so far, ETA."""
    from evomerge.search.status import open_for_status, render, study_status
    from evomerge.search.study import StorageUnreachable

    try:
        study, budget = open_for_status(run_dir, storage, study_name)
    except (FileNotFoundError, KeyError, ValueError, StorageUnreachable) as e:
        _fail(str(e).strip('"'))
    out.print(render(study_status(study, budget)), highlight=False, markup=False)


@app.command("finetune")
def finetune_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory (e.g. a search's merged/)"),
    tasks: Path = typer.Option(..., "--tasks", help="task YAML: trains on each task's train split (else search), reports test"),
    out_dir: Path = typer.Option(..., "--out", help="where to write the fine-tuned checkpoint"),
    steps: int = typer.Option(50),
    lr: float = typer.Option(1e-4),
    batch_size: int = typer.Option(16),
    train: list[str] = typer.Option(["*"], help="fnmatch patterns of trainable tensors (repeatable)"),
    layers: Optional[str] = typer.Option(None, help="only layers START:END (end exclusive)"),
    device: str = typer.Option("auto"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Briefly fine-tune selected tensors of MODEL_DIR; print test scores before and after."""
    from evomerge.evaluate import TaskError
    from evomerge.finetune import finetune_and_report
    from evomerge.search.config import Finetune

    try:
        layer_range = None
        if layers:
            a, b = layers.split(":")
            layer_range = (int(a), int(b))
        cfg = Finetune(steps=steps, lr=lr, batch_size=batch_size, train=train, layers=layer_range, data=str(tasks))
        if out_dir.exists() and not overwrite:
            _fail(f"{out_dir} exists; pass --overwrite to replace it")
        res = finetune_and_report(model_dir, out_dir, cfg, tasks=None, device=device, overwrite=overwrite,
                                  log=lambda m: console.print(m))
    except (TaskError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(f"[green]wrote[/] {res.out_dir} (report: {res.out_dir / 'finetune_report.md'})")


@zoo_app.command("build")
def zoo_build(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="where to build (default: the user cache)"),
    size: str = typer.Option("small", help="tiny | small"),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, help="rebuild even if a complete zoo is cached"),
    experts: Optional[int] = typer.Option(None, help="number of task experts, 2-8 (default: the size's)"),
    base_knows_tasks: bool = typer.Option(True, "--base-knows-tasks/--naive-base",
                                          help="whether the base sees a little of every task in pre-training"),
    overlap: bool = typer.Option(False, help="fine-tune each expert on two neighbouring tasks (shared skills)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16: the dtype the models are saved in"),
    adapters: bool = typer.Option(True, help="also train one LoRA adapter per expert (docs/adapters.md)"),
) -> None:
    """Build the offline demo zoo: base, experts, multi-task reference, task data, LoRA experts (docs/zoo.md)."""
    from evomerge.zoo import ZooVariant, build_zoo
    from evomerge.zoo_adapters import build_adapters

    variant = ZooVariant(experts=experts, base_knows_tasks=base_knows_tasks, overlap=overlap, dtype=dtype)
    try:
        zoo = build_zoo(out_dir, size=size, seed=seed, force=force, variant=variant)
        if adapters:
            build_adapters(zoo, force=force, log=lambda line: console.print(line, highlight=False))
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    console.print(f"[green]zoo ready[/] at {zoo.root}")


from evomerge.cli_moe import moe as _moe  # noqa: E402

app.command("moe")(_moe)


from evomerge.cli_lora import register as _register_lora  # noqa: E402

_register_lora(app)


def main() -> None:
    from evomerge.host import tune_host_allocator

    tune_host_allocator()  # keep freed tensor memory for reuse: 2-6x faster merges on the CPU
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:  # skip the collection at exit over every object torch and numba made (a few tenths of a second);
        if "triton" not in sys.modules:  # not with Triton loaded: its bindings report uncollected objects as leaks
            gc.freeze()


if __name__ == "__main__":
    main()
