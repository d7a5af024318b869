"""``evomerge merge-lora`` and ``evomerge extract-lora``: LoRA adapters in and out (docs/adapters.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(2)


def merge_lora(
    recipe: Path = typer.Argument(..., help="recipe YAML over LoRA adapters of one base"),
    out_dir: Path = typer.Argument(..., help="output adapter directory (created atomically)"),
    rank: Optional[int] = typer.Option(None, help="factorise every module to this rank (linear merges: default "
                                                  "exact cat; other methods: required)"),
    seed: int = typer.Option(0, help="seed for DARE/DELLA random masks"),
    device: str = typer.Option("cpu", help="where sparse merges are computed: cpu | cuda | auto"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Merge the LoRA adapters of RECIPE into one PEFT adapter in OUT_DIR, without dense matrices."""
    from evomerge.lora import AdapterError
    from evomerge.lora.export import DISCARDED_WARNING, merge_to_adapter
    from evomerge.recipe import RecipeError

    from evomerge.lora.peft_compat import is_peft_recipe, load_peft_recipe, peft_merge
    from evomerge.yamlfile import read_yaml_mapping

    try:
        data = read_yaml_mapping(recipe, where=str(recipe), what="recipe", error=AdapterError)
        if is_peft_recipe(data):  # PEFT compatibility mode: PEFT's add_weighted_adapter, its options in the recipe
            if rank is not None:
                raise AdapterError(f"{recipe}: merge_method peft takes its rank from parameters.svd_rank, not --rank")
            written = peft_merge(load_peft_recipe(data, str(recipe), recipe.parent), out_dir, overwrite=overwrite)
            console.print(f"[green]wrote[/] {written} (PEFT add_weighted_adapter)")
            return
        report = merge_to_adapter(recipe, out_dir, rank=rank, overwrite=overwrite, where=str(recipe),
                                  device=device, seed=seed)
    except (RecipeError, AdapterError, ValueError) as e:
        _fail(str(e))
    ranks = sorted(set(report.ranks.values()))
    worst = max(report.discarded.values(), default=0.0)
    out.print(f"{len(report.ranks)} modules, ranks {ranks}, largest discarded energy fraction {worst:.3g}",
              highlight=False)
    flagged = report.flagged()
    if flagged:
        console.print(f"[yellow]warning:[/] {len(flagged)} module(s) lost more than {DISCARDED_WARNING:.0%} of their "
                      f"update's energy (worst: {max(flagged, key=flagged.get)} {worst:.1%}); see "
                      f"{report.path / 'evomerge_lora_report.json'}", highlight=False)
    console.print(f"[green]wrote[/] {report.path}")


def extract_lora(
    finetune: Path = typer.Argument(..., help="the fully fine-tuned model directory"),
    base: Path = typer.Argument(..., help="the base model it was fine-tuned from"),
    out_dir: Path = typer.Argument(..., help="output adapter directory (created atomically)"),
    rank: int = typer.Option(..., help="LoRA rank of every decomposed module"),
    niter: int = typer.Option(2, help="power iterations of the randomised SVD"),
    lora_only: bool = typer.Option(False, help="leave out changed modules LoRA cannot carry (norms), listed as dropped"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Extract a PEFT LoRA adapter of rank RANK that turns BASE into (approximately) FINETUNE."""
    from evomerge.checkpoint import CheckpointError
    from evomerge.lora import AdapterError
    from evomerge.lora.extract import extract_lora as run

    try:
        report = run(finetune, base, out_dir, rank, niter=niter, overwrite=overwrite, lora_only=lora_only)
    except (CheckpointError, AdapterError, ValueError) as e:
        _fail(str(e))
    kept = report.energy_kept
    worst = min(kept, key=kept.get) if kept else None
    out.print(f"{len(kept)} modules at rank {rank}: mean energy kept {report.overall_kept:.4f}"
              + (f", lowest {kept[worst]:.4f} ({worst})" if worst else "")
              + f"; {len(report.saved_whole)} module(s) saved whole"
              + (f"; {len(report.dropped)} changed module(s) DROPPED (--lora-only)" if report.dropped else ""),
              highlight=False)
    console.print(f"[green]wrote[/] {report.path}")


def register(app: typer.Typer) -> None:
    """Add the LoRA commands to the ``evomerge`` application."""
    app.command("merge-lora")(merge_lora)
    app.command("extract-lora")(extract_lora)
