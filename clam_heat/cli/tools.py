"""The tools around a run: ``doctor``, ``compare`` and ``video``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ClamHeatError
from .app import ConfigArg, app
from .output import fail


@app.command()
def doctor(
    config: Annotated[
        str | None,
        typer.Argument(
            help="Optional YAML config: also check its slides, features, checkpoint and outputs."
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "--output_dir", help="Also check this output folder (writable, space)."
        ),
    ] = None,
    sample_rows: Annotated[
        int, typer.Option("--sample-rows", min=0, help="Rows timed for the run estimate.")
    ] = 3,
    ascii_only: Annotated[
        bool, typer.Option("--ascii", help="Marks ok/FAIL/warn instead of ✓ ✗ !.")
    ] = False,
) -> None:
    """Check the setup: packages, OpenSlide, torch devices, output folder, browser; with CONFIG
    also the config, every listed slide and H5, the checkpoint, and a rough time/disk estimate.
    Exit 1 when a required check fails."""
    from ..doctor import exit_code, format_report, run_doctor

    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗".encode(encoding)
    except (LookupError, UnicodeEncodeError):
        ascii_only = True
    report = run_doctor(config, output_dir=output_dir, sample_rows=sample_rows)
    for line in format_report(report, ascii_only=ascii_only):
        typer.echo(line)
    raise typer.Exit(exit_code(report))


@app.command()
def compare(
    config_a: Annotated[str, typer.Argument(help="First run's YAML config (A).")],
    config_b: Annotated[str, typer.Argument(help="Second run's YAML config (B).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the comparison.")],
    topk: Annotated[
        int | None,
        typer.Option("--topk", min=1, help="Patches per slide in the top-k overlap (default 10%)."),
    ] = None,
    no_pictures: Annotated[
        bool, typer.Option("--no-pictures", help="Only comparison.csv and summary.json.")
    ] = False,
    method_a: Annotated[
        str, typer.Option("--method-a", help="Map of run A: attention or an explain method.")
    ] = "attention",
    method_b: Annotated[
        str, typer.Option("--method-b", help="Map of run B (same config twice: two methods).")
    ] = "attention",
) -> None:
    """Compare two finished runs slide by slide: rank agreement, top-k overlap, predictions."""
    from ..compare import compare_runs

    try:
        summary = compare_runs(
            config_a,
            config_b,
            out,
            topk=topk,
            pictures=not no_pictures,
            methods=(method_a, method_b),
        )
    except ClamHeatError as err:
        fail(err)
    means = summary.means
    typer.echo(
        f"{summary.csv_path}: {len(summary.rows)} slides; mean spearman "
        f"{means['spearman']:.3f}, top-k jaccard {means['topk_jaccard']:.3f}, "
        f"predictions agree on {means['agree']:.0%}"
    )
    if summary.only_in_a or summary.only_in_b:
        typer.echo(
            f"  finished in one run only: {len(summary.only_in_a)} in A, "
            f"{len(summary.only_in_b)} in B (not compared)"
        )
    if summary.class_note:
        typer.echo(f"  {summary.class_note}")
    if summary.most_disagreeing:
        typer.echo("  most disagreeing: " + ", ".join(summary.most_disagreeing))
    typer.echo(f"{summary.summary_path}")


@app.command()
def video(
    config: ConfigArg,
    slide: Annotated[str, typer.Option("--slide", help="Slide id (a finished row of the run).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="MP4 to write (default <slide>_flythrough.mp4)."),
    ] = None,
    seconds: Annotated[float, typer.Option("--seconds", min=0.1)] = 20.0,
    fps: Annotated[float, typer.Option("--fps", min=1.0)] = 25.0,
    size: Annotated[
        str, typer.Option("--size", help="Frame WIDTHxHEIGHT (even numbers).")
    ] = "1280x720",
    topk: Annotated[int, typer.Option("--topk", min=0, help="Regions to visit.")] = 5,
    zoom_patches: Annotated[
        float, typer.Option("--zoom-patches", min=1.0, help="Close-up width in patches.")
    ] = 8.0,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0)] = 0.5,
) -> None:
    """Fly-through MP4: the whole slide, the heatmap fading in, then the top-k regions."""
    from ..errors import ConfigError
    from ..video import make_flythrough

    try:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--size must look like 1280x720, got {size!r}") from None
        info = make_flythrough(
            config,
            slide,
            out or Path(f"{slide}_flythrough.mp4"),
            seconds=seconds,
            fps=fps,
            size=(width, height),
            topk=topk,
            zoom_patches=zoom_patches,
            alpha=alpha,
        )
    except ClamHeatError as err:
        fail(err)
    typer.echo(
        f"{info.path}: {info.n_frames} frames, {info.seconds:g} s at {info.fps:g} fps, "
        f"{info.size[0]}x{info.size[1]}, {len(info.regions)} regions "
        f"(rendered in {info.render_seconds:.1f} s)"
    )
