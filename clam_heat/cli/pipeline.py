"""The run's own commands: ``validate``, ``list``, ``status``, ``run`` and ``merge``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ClamHeatError, ProcessListError, counted
from .app import (
    ConfigArg,
    ExecutorOpt,
    OverlapOpt,
    QuietOpt,
    RetryFailedOpt,
    SaveExpOpt,
    SchedulerFileOpt,
    SchedulerOpt,
    SetOpt,
    ShardOpt,
    WorkersOpt,
    app,
    load_cli_config,
)
from .output import counts_text, fail, missing_list_text
from .progress import run_with_progress


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
        cfg = load_cli_config(config, save_exp_code, overlap, set_)
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
    from ..process_list import build_process_list, status_summary

    try:
        cfg = load_cli_config(config, save_exp_code, None, set_)
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
    from ..list_status import read_status  # the standard library's csv: no pandas to import

    try:
        path = Path(target)
        if path.suffix.lower() in {".yaml", ".yml"}:
            path = load_cli_config(target, None, None, None).process_list_path
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

    from ..executors import make_executor
    from ..process_list import parse_shard
    from ..runner import run_pipeline

    try:
        cfg = load_cli_config(config, save_exp_code, overlap, set_)
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
    summary = run_with_progress(
        cfg, retry_failed=retry_failed, dry_run=dry_run, quiet=quiet, runner=runner
    )
    if not summary.ok:
        raise typer.Exit(1)


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
    from ..process_list import merge_process_list
    from ..process_list.lock import list_lock

    try:
        path, results = Path(target), None
        if path.suffix.lower() in {".yaml", ".yml"}:
            cfg = load_cli_config(target, None, None, None)
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
