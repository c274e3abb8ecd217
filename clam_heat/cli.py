"""``clam-heat`` command line: each command parses options and calls one library function.

Errors print one line and exit 2 (bad input before work, a list another run holds) or 1;
tracebacks go to the run log (:mod:`.cli_output`). A run stopped by SIGTERM/SIGINT exits 143/130.
Progress goes to stderr, results to stdout; ``--quiet`` (or a non-TTY stderr) turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import cli_tools
from .cli_output import counts_text, exit_now, fail, missing_list_text, run_app, summary_text
from .cli_tools import ConfigArg
from .errors import ClamHeatError, ProcessListError, counted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # plain help: rich's boxed table cuts option names (--model_name ...) at 80 columns
    rich_markup_mode=None,
    help="Resumable, CLAM-compatible attention heatmaps for MIL models on whole-slide images.",
)

SaveExpOpt = Annotated[
    str | None,
    typer.Option(
        "--save_exp_code", "--save-exp-code", help="Override exp_arguments.save_exp_code."
    ),
]
OverlapOpt = Annotated[
    float | None,
    typer.Option("--overlap", help="Override patching_arguments.overlap."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any key: --set heatmap_arguments.alpha=0.5 (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
RetryFailedOpt = Annotated[bool, typer.Option("--retry-failed", help="Rerun rows marked failed.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Local worker processes (default: the config's, or 1)."),
]
# Where `run` sends its rows (clam_heat.executors).
ExecutorOpt = Annotated[
    str | None, typer.Option("--executor", help="local (default), dask or serial.")
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786 (implies dask)."
    ),
]
SchedulerFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--scheduler-file", help="Dask scheduler JSON file on shared storage (implies dask)."
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard", help="Run shard i of n (i/n, from 0) into <list>.shard-i-of-n.csv; see `merge`."
    ),
]


def _load(
    config: str, save_exp_code: str | None, overlap: float | None, sets: list[str] | None
) -> Any:
    from .config import find_config, load_config

    return load_config(
        find_config(config), overrides=sets or [], save_exp_code=save_exp_code, overlap=overlap
    )


def _setup_logging(log_file: Path | None, quiet: bool, level: str = "INFO") -> None:
    root = logging.getLogger("clam_heat")
    root.setLevel(getattr(logging, level, logging.INFO))
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.propagate = False


@app.command()
def validate(
    config: ConfigArg,
    save_exp_code: SaveExpOpt = None,
    overlap: OverlapOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a config: print the resolved config, or every error (exit 2)."""
    import yaml

    try:
        cfg = _load(config, save_exp_code, overlap, set_)
    except ClamHeatError as err:
        fail(err)
    typer.echo(f"# {cfg.source_path}: valid")
    typer.echo(yaml.safe_dump(cfg.to_yaml_dict(), default_flow_style=False, sort_keys=False))


@app.command("list")
def list_(
    config: ConfigArg,
    save_exp_code: SaveExpOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build or update the process list (CSV with CLAM's columns plus status columns)."""
    from .process_list import build_process_list, status_summary

    try:
        cfg = _load(config, save_exp_code, None, set_)
        df, path = build_process_list(cfg, write=True)
    except ClamHeatError as err:
        fail(err)
    counts = status_summary(df)
    missing = int(df["missing"].astype(bool).sum()) if "missing" in df.columns else 0
    typer.echo(
        f"{path}: {counted(len(df), 'slide')} ({counts_text(counts)})"
        + (f"; {missing} missing on disk" if missing else "")
    )


@app.command()
def status(
    target: Annotated[str, typer.Argument(help="A process-list CSV, or a YAML config.")],
) -> None:
    """Counts per status and each failed row with its error."""
    from .list_status import read_status  # the standard library's csv: no pandas to import

    try:
        path = Path(target)
        if path.suffix.lower() in {".yaml", ".yml"}:
            path = _load(target, None, None, None).process_list_path
        if not path.exists():
            raise ProcessListError(missing_list_text(path))
        report = read_status(path)
    except ClamHeatError as err:
        fail(err)
    typer.echo(f"{path}: {counted(report.rows, 'row')} ({counts_text(report.counts)})")
    for slide_id, error in report.failed:
        typer.echo(f"  failed {slide_id}: {error}")


@app.command()
def run(
    config: ConfigArg,
    save_exp_code: SaveExpOpt = None,
    overlap: OverlapOpt = None,
    set_: SetOpt = None,
    retry_failed: RetryFailedOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run and why.")
    ] = False,
    quiet: QuietOpt = False,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Run segment -> infer -> heatmap -> sample for every pending row (resumable)."""
    import functools

    from .executors import make_executor
    from .process_list import parse_shard
    from .runner import run_pipeline

    try:
        cfg = _load(config, save_exp_code, overlap, set_)
        pool = make_executor(
            executor,  # type: ignore[arg-type]
            workers=workers or cfg.runner_arguments.workers,
            scheduler=scheduler,
            scheduler_file=scheduler_file,
        )
        shard_ids = parse_shard(shard) if shard else None
    except ClamHeatError as err:
        fail(err)
    runner = functools.partial(run_pipeline, executor=pool, shard=shard_ids)
    summary = _run_with_progress(
        cfg, retry_failed=retry_failed, dry_run=dry_run, quiet=quiet, runner=runner
    )
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def quick(
    ckpt: Annotated[
        Path,
        typer.Option(
            "--ckpt",
            "--checkpoint",
            help="Trained model: CLAM s_<fold>_checkpoint.pt, model.safetensors or a MIL-Lab "
            "save_pretrained folder.",
        ),
    ],
    h5_dir: Annotated[
        Path,
        typer.Option("--h5-dir", "--h5_dir", help="Feature files <slide_id>.h5 (TRIDENT or CLAM)."),
    ],
    slide_dir: Annotated[
        Path, typer.Option("--slide-dir", "--slide_dir", help="Folder of the slides.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "--output_dir",
            "--output-dir",
            help="Output folder (config.yaml, process list, heatmaps, heatmap_results.csv).",
        ),
    ],
    model_type: Annotated[
        str,
        typer.Option(
            "--model-type",
            "--model_type",
            "--model_name",
            "--model-name",
            help="clam_sb, clam_mb, abmil, a MIL-Lab name (abmil.base.uni_v2.pc108-24k), ...",
        ),
    ] = "clam_sb",
    model_size: Annotated[str, typer.Option("--model-size", help="small or big.")] = "small",
    n_classes: Annotated[
        int | None,
        typer.Option(
            "--n-classes",
            "--num_classes",
            "--num-classes",
            min=2,
            help="Classes (default: read from the checkpoint).",
        ),
    ] = None,
    embed_dim: Annotated[
        int | None,
        typer.Option(
            "--embed-dim", "--embed_dim", min=1, help="Feature width (default: read from the H5s)."
        ),
    ] = None,
    slide_ext: Annotated[
        str | None,
        typer.Option(
            "--slide-ext",
            "--slide_ext",
            help="Slide extension (default: the one the slides share).",
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="CSV slide_id,label (default: no labels).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Only the first N slides, in sorted order."),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Only the slide ids in this CSV's slide_id column (its label column, "
            "if any, sets labels).",
        ),
    ] = None,
    cmap: Annotated[str, typer.Option("--cmap", help="Matplotlib colormap.")] = "jet",
    alpha: Annotated[
        float,
        typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap weight over the slide."),
    ] = 0.5,
    vis_level: Annotated[
        int,
        typer.Option(
            "--vis-level", "--vis_level", min=-1, help="Slide level of the image; -1: auto."
        ),
    ] = -1,
    segment: Annotated[
        bool,
        typer.Option(
            "--segment/--no-segment",
            " /--no_segment",
            help="Mask the heatmap to detected tissue (off, as MIL-Lab's script).",
        ),
    ] = False,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Attribution method(s): attention, contribution, gradient_x_input, "
            "integrated_gradients, occlusion, instance; repeat or comma-separate.",
        ),
    ] = None,
    workers: WorkersOpt = None,
    set_: SetOpt = None,
    retry_failed: RetryFailedOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Write config.yaml and the list; print what would run."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run without YAML: infer the config from the files, save it as OUT/config.yaml, run it.

    Takes MIL-Lab generate_heatmaps.py's flags too, and writes its outputs
    (OUT/<slide_id>_heatmap.png, OUT/heatmap_results.csv) beside CLAM's layout.
    """  # fmt: skip
    from .quick import QuickOptions

    options = QuickOptions(
        ckpt=ckpt,
        h5_dir=h5_dir,
        slide_dir=slide_dir,
        out=out,
        model_type=model_type,
        model_size=model_size,
        n_classes=n_classes,
        embed_dim=embed_dim,
        slide_ext=slide_ext,
        labels=labels,
        workers=workers or 1,
        sets=set_ or [],
        limit=limit,
        csv=csv,
        cmap=cmap,
        alpha=alpha,
        vis_level=vis_level,
        segment=segment,
        method=[m.strip() for value in method or [] for m in value.split(",") if m.strip()],
    )
    plan, pool = _quick_plan(options)
    summary = _quick_run(plan, pool, retry_failed=retry_failed, dry_run=dry_run, quiet=quiet)
    if not dry_run:
        _quick_mil_lab_outputs(plan)
    if not summary.ok:
        raise typer.Exit(1)


def _quick_plan(options: Any) -> tuple[Any, Any]:
    """Step 1: config and process list written (nothing when refused), warnings shown."""
    from .executors import make_executor
    from .quick import prepare_quick

    try:
        plan = prepare_quick(options)
        pool = make_executor(workers=plan.config.runner_arguments.workers)
    except ClamHeatError as err:
        fail(err)
    for line in plan.warnings:
        typer.echo(f"warning: {line}", err=True)
    typer.echo(f"config: {plan.config_path} (same run: clam-heat run {plan.config_path})")
    return plan, pool


def _quick_run(plan: Any, pool: Any, *, retry_failed: bool, dry_run: bool, quiet: bool) -> Any:
    """Step 2: the ordinary run of that config."""
    import functools

    from .runner import run_pipeline

    runner = functools.partial(run_pipeline, executor=pool)
    return _run_with_progress(
        plan.config, retry_failed=retry_failed, dry_run=dry_run, quiet=quiet, runner=runner
    )


def _quick_mil_lab_outputs(plan: Any) -> None:
    """Step 3: MIL-Lab's files (OUT/<id>_heatmap.png, OUT/heatmap_results.csv)."""
    from .quick import write_mil_lab_outputs

    try:
        written = write_mil_lab_outputs(plan.config, plan.config_path.parent, plan.slide_ids)
    except ClamHeatError as err:
        fail(err)
    typer.echo(f"MIL-Lab results: {written.csv_path} ({counted(written.rows, 'slide')})")


def _run_with_progress(
    cfg: Any, *, retry_failed: bool, dry_run: bool, quiet: bool, runner: Any
) -> Any:
    show = not quiet and sys.stderr.isatty()
    log_file = (
        Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code / "clam_heat.log"
    )
    if not dry_run:  # the log file lives under an output root: check them all first
        from .preflight import check_output_roots, output_folders

        try:
            check_output_roots(output_folders(cfg))
        except ClamHeatError as err:
            fail(err)
    _setup_logging(None if dry_run else log_file, quiet, cfg.runner_arguments.log_level)
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

    from .model_process import hosting

    try:  # the model process forks before the progress bar's thread starts (clean state)
        with hosting(), progress if progress is not None else contextlib.nullcontext():
            summary = runner(
                cfg, retry_failed=retry_failed, dry_run=dry_run, on_row=on_row, on_start=on_start
            )
    except ClamHeatError as err:
        fail(err)
    if getattr(summary, "stopped_by", None) is not None:  # SIGTERM/SIGINT: one line, 143/130
        from .runner import stop_line

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


@app.command()
def merge(
    target: Annotated[str, typer.Argument(help="The process-list CSV, or a YAML config.")],
    shard_files: Annotated[
        list[Path] | None,
        typer.Option(
            "--shard-file", help="Shard CSVs to merge (default: all <list>.shard-*-of-*.csv)."
        ),
    ] = None,
    remove: Annotated[
        bool, typer.Option("--remove-shards", help="Delete the shard files once merged.")
    ] = False,
) -> None:
    """Fold `run --shard i/n` results back into the process list (and, given a config, the
    results CSV); status columns of newer shard rows win, user columns are never touched."""
    from .process_list import merge_process_list
    from .process_list.lock import list_lock

    try:
        path, results = Path(target), None
        if path.suffix.lower() in {".yaml", ".yml"}:
            cfg = _load(target, None, None, None)
            path, results = cfg.process_list_path, cfg.results_csv_path
        with list_lock(path):  # never under a live run of the list or of one of its shards
            report = merge_process_list(path, shard_files, results_csv=results, remove=remove)
    except ClamHeatError as err:
        fail(err)
    typer.echo(
        f"{path}: merged {counted(len(report.shards), 'shard file')}, "
        f"{counted(report.rows_taken, 'row')} updated"
        + (f"; {len(report.unknown)} shard rows not in the list, ignored" if report.unknown else "")
    )
    if report.results_csv:
        typer.echo(f"results: {report.results_csv}")


@app.command()
def view(
    config: Annotated[
        str | None,
        typer.Argument(help="YAML config of a run (omit with --slide FILE --heatmap IMAGE)."),
    ] = None,
    save_exp_code: SaveExpOpt = None,
    set_: SetOpt = None,
    slide: Annotated[
        str | None,
        typer.Option(
            "--slide", help="Open this slide_id first; with --heatmap, the slide file to view."
        ),
    ] = None,
    heatmap: Annotated[
        Path | None,
        typer.Option(
            "--heatmap", help="A heatmap image (PNG, JPEG, TIFF, pyramid) to view beside --slide."
        ),
    ] = None,
    cmap: Annotated[
        str | None,
        typer.Option(
            "--cmap", help="With --heatmap: its colormap, when the image does not record it."
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option("--compare", help="A second run's config: show A | B | A - B panes."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 to share on a network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, help="Port; 0 picks a free one.")] = 8765,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the page in the default web browser.")
    ] = False,
) -> None:
    """Serve the run's slides and heatmaps side by side, panning and zooming together; or one
    slide beside one heatmap image (--slide FILE --heatmap IMAGE); or two runs (--compare)."""
    from urllib.parse import quote

    from .viewer import open_viewer

    try:
        server, slide, entries = open_viewer(
            config, slide=slide, heatmap=heatmap, cmap=cmap, compare=compare, host=host,
            port=port, load=lambda name, exp=None, sets=None: _load(name, exp, None, sets),
            save_exp_code=save_exp_code, sets=set_,
        )  # fmt: skip
    except ClamHeatError as err:
        fail(err)
    url = server.url + (f"view/{quote(slide)}" if slide else "")
    drawn = sum(bool(e.maps) or e.image is not None for e in entries)
    typer.echo(f"viewer: {url} ({len(entries)} slides, {drawn} with heatmaps; Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


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
    from .config import load_config
    from .demo import make_demo_project
    from .runner import run_pipeline

    if size not in ("tiny", "small", "large"):
        typer.echo(f"error: --size {size!r}: must be tiny, small or large", err=True)
        raise typer.Exit(2)
    try:
        project = make_demo_project(folder, n_slides=n_slides, size=size, model=model)  # type: ignore[arg-type]
        typer.echo(f"demo project: {project.folder} (config {project.config_path})")
        cfg = load_config(project.config_path)
    except ClamHeatError as err:
        fail(err)
    summary = _run_with_progress(
        cfg, retry_failed=False, dry_run=False, quiet=quiet, runner=run_pipeline
    )
    typer.echo(
        f"heatmaps: {Path(cfg.exp_arguments.production_save_dir) / cfg.exp_arguments.save_exp_code}"
    )
    if not summary.ok:
        raise typer.Exit(1)


# the tools around a run (doctor, compare, video, render) live in cli_tools
for _command in (cli_tools.doctor, cli_tools.compare, cli_tools.video, cli_tools.render):
    app.command()(_command)


def cli_main(argv: list[str] | None = None) -> int:
    """The command line's exit code for ``argv`` (:func:`clam_heat.cli_output.run_app`)."""
    return run_app(app, argv)


def main() -> None:  # pragma: no cover - console entry
    exit_now(cli_main())  # no interpreter teardown: 0.15-0.2 CPU s per command
