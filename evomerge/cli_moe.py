"""``evomerge moe CONFIG OUT_DIR``: build a mixture of experts from dense fine-tunes (docs/moe.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def moe(
    config: Path = typer.Argument(..., help="MoE config YAML (mergekit-moe's format plus evomerge keys)"),
    out_dir: Path = typer.Argument(..., help="output model directory (created atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Assemble an MoE from dense experts, initialise its routers and write it to OUT_DIR."""
    from evomerge.calibration import CalibrationError
    from evomerge.checkpoint import CheckpointError
    from evomerge.cli import console, out
    from evomerge.moe import MoeError, build_moe

    try:
        path = build_moe(config, out_dir, overwrite=overwrite, log=lambda m: console.print(m, highlight=False))
    except (MoeError, CheckpointError, CalibrationError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2)
    console.print(f"[green]wrote[/] {path}")
    report = json.loads((path / "moe_report.json").read_text())
    if report.get("comparison_table"):
        out.print(report["comparison_table"], highlight=False, markup=False, soft_wrap=True)
