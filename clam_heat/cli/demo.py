"""``clam-heat demo``: generate a demo project (slides, features, a checkpoint) and run it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ClamHeatError
from .app import QuietOpt, app
from .output import fail
from .progress import run_with_progress


@app.command()
def demo(
    folder: Annotated[
        Path, typer.Option("--folder", help="Where to write the demo project.")
    ] = Path("clam_heat_demo"),
    n_slides: Annotated[int, typer.Option("--slides", min=1, help="Number of demo slides.")] = 5,
    size: Annotated[str, typer.Option("--size", help="tiny, small or large.")] = "tiny",
    model: Annotated[
        str, typer.Option("--model", help="Model to train: clam_sb or a registered one (abmil).")
    ] = "clam_sb",
    quiet: QuietOpt = False,
) -> None:
    """Generate demo slides, features, a trained checkpoint (CLAM_SB by default) and a config,
    then run it."""
    from ..config import load_config
    from ..demo import make_demo_project
    from ..runner import run_pipeline

    if size not in ("tiny", "small", "large"):
        typer.echo(f"error: --size {size!r}: must be tiny, small or large", err=True)
        raise typer.Exit(2)
    try:
        project = make_demo_project(folder, n_slides=n_slides, size=size, model=model)  # type: ignore[arg-type]
        typer.echo(f"demo project: {project.folder} (config {project.config_path})")
        cfg = load_config(project.config_path)
    except ClamHeatError as err:
        fail(err)
    summary = run_with_progress(
        cfg, retry_failed=False, dry_run=False, quiet=quiet, runner=run_pipeline
    )
    typer.echo(
        f"heatmaps: {Path(cfg.exp_arguments.production_save_dir) / cfg.exp_arguments.save_exp_code}"
    )
    if not summary.ok:
        raise typer.Exit(1)
