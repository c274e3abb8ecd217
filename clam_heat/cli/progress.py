"""A run on the terminal: the progress bar, each failed row as it happens, the summary."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import typer

from ..errors import ClamHeatError
from .app import setup_logging
from .output import fail, summary_text


def run_with_progress(
    cfg: Any, *, retry_failed: bool, dry_run: bool, quiet: bool, runner: Any
) -> Any:
    show = not quiet and sys.stderr.isatty()
    log_file = (
        Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code / "clam_heat.log"
    )
    if not dry_run:  # the log file lives under an output root: check them all first
        from ..preflight import check_output_roots, output_folders

        try:
            check_output_roots(output_folders(cfg))
        except ClamHeatError as err:
            fail(err)
    setup_logging(None if dry_run else log_file, quiet, cfg.runner_arguments.log_level)
    progress: Any = _progress_bar() if show else None  # rich only for a terminal (0.1 CPU s)
    task: dict[str, Any] = {}

    def on_start(total: int) -> None:
        if progress is not None:
            task["id"] = progress.add_task("", total=total)

    def on_row(outcome: Any) -> None:
        if "id" in task:
            progress.update(
                task["id"], advance=1, description=f"{outcome.slide_id} {outcome.status}"
            )
        if outcome.status == "failed":
            line = f"failed {outcome.slide_id}: {outcome.error}"
            if progress is not None:  # printed above the bar, one line however wide
                progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                typer.echo(line, err=True)

    from ..model_process import hosting

    try:  # the model process forks before the progress bar's thread starts (clean state)
        with hosting(), progress if progress is not None else contextlib.nullcontext():
            summary = runner(
                cfg, retry_failed=retry_failed, dry_run=dry_run, on_row=on_row, on_start=on_start
            )
    except ClamHeatError as err:
        fail(err)
    if getattr(summary, "stopped_by", None) is not None:  # SIGTERM/SIGINT: one line, 143/130
        from ..runner import stop_line

        typer.echo(stop_line(summary), err=True)
        raise typer.Exit(128 + summary.stopped_by)
    if dry_run:
        for slide_id, plan in summary.plans.items():
            parts = [
                f"{stage}: {why}" if why else f"{stage}: up to date" for stage, why in plan.items()
            ]
            typer.echo(f"{slide_id}: " + "; ".join(parts))
        if not summary.plans:
            typer.echo("nothing to run")
        return summary
    typer.echo(summary_text(summary))
    return summary


def _progress_bar() -> Any:
    """The run's progress bar on stderr (a row's error stays one line)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]clam-heat"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True, soft_wrap=True),
        transient=False,
    )
