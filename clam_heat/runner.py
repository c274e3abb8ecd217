"""The driver behind ``clam-heat run``: list -> executor -> recorder.

It builds the process list and one :class:`~clam_heat.rows.RowContext` per pending row, resolves
the stages once (:func:`~clam_heat.stages.registry.stages_for`), hands the rows to an executor
(:mod:`clam_heat.executors`; each row runs under the ledger protocol of
:func:`~clam_heat.stages.row.process_row`) and gives every outcome to the one
:class:`~clam_heat.process_list.Recorder`, which writes status, last completed stage, error and
results back to the CSVs. A row's failure never stops the others.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import sweep_temp_files, sweep_temp_files_of, write_text_atomic
from .config import HeatmapConfig
from .executors import LocalExecutor, SerialExecutor
from .phases import map_rows
from .process_list import Recorder, build_process_list, shard_frame, shard_path
from .rows import (
    RowContext,
    build_contexts,
    output_roots,
    resolved_config_path,
    results_csv_path,
)
from .stages.registry import stages_for
from .stages.row import RowOutcome, plan_row
from .tracking_hook import RunTracking

log = logging.getLogger(__name__)

__all__ = ["RunSummary", "check_writable", "clean_outputs", "run_pipeline"]


@dataclass
class RunSummary:
    """End-of-run numbers for the CLI summary."""

    counts: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    slowest: list[tuple[str, float]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    plans: dict[str, dict[str, str | None]] = field(default_factory=dict)
    process_list: Path | None = None
    results_csv: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1

    def add(self, outcome: RowOutcome) -> None:
        """One finished row's numbers."""
        self.count(outcome.status)
        for name, secs in outcome.ran.items():
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + secs
        self.slowest.append((outcome.slide_id, outcome.seconds))
        if outcome.status == "failed":
            self.failed.append((outcome.slide_id, outcome.error))


def _save_resolved_config(cfg: HeatmapConfig) -> Path:
    import yaml

    path = resolved_config_path(cfg)
    text = yaml.safe_dump(cfg.to_yaml_dict(), default_flow_style=False, sort_keys=True)
    write_text_atomic(path, text)
    return path


def check_writable(path: Path) -> None:
    """Fail early, naming the folder, if an output root cannot be created or written."""
    from .errors import OutputError

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".clam_heat_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(
            f"{path}: output folder is not writable ({err.strerror or err}); "
            "fix its permissions or set exp_arguments.raw_save_dir/production_save_dir elsewhere"
        ) from None


def run_pipeline(
    cfg: HeatmapConfig,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
    stages: Sequence[str] | None = None,
    executor: Any = None,
    on_row: Callable[[RowOutcome], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> RunSummary:
    """Run (or, with ``dry_run``, plan) every pending row; the library call behind ``run``.

    ``stages`` names the stages to run (default: every registered stage the config enables).
    ``executor`` (see :mod:`clam_heat.executors`) runs rows elsewhere; None runs them here, or
    in ``runner_arguments.workers`` local processes when that is > 1; the run holds it open
    (``with executor``), so a pool it starts is stopped at the end. ``shard=(i, n)`` runs only
    shard i of n and records into ``<list>.shard-i-of-n.csv`` (``clam-heat merge`` folds it back).
    """
    start = time.perf_counter()
    plan = stages_for(cfg, stages)
    summary = RunSummary()
    df, list_path = build_process_list(cfg, write=not dry_run)
    results_csv = results_csv_path(cfg)
    if shard is not None:
        df = shard_frame(df, list_path, *shard)
        list_path = shard_path(list_path, *shard)
        results_csv = shard_path(results_csv, *shard)
    summary.process_list = list_path
    pending, vanished = _pending_rows(cfg, df, retry_failed, summary)

    if dry_run:
        for ctx in pending:
            reasons = plan_row(ctx, plan)
            summary.plans[ctx.slide_id] = {k: (str(v) if v else None) for k, v in reasons.items()}
            ctx.close()
        summary.seconds = time.perf_counter() - start
        return summary

    if executor is None:
        workers = cfg.runner_arguments.workers
        executor = LocalExecutor(workers) if workers > 1 else SerialExecutor()
    with executor:  # a local pool loads its libraries now
        _prepare_outputs(cfg, list_path, results_csv, sweep_roots=shard is None)
        summary.results_csv = results_csv
        tracking = RunTracking(cfg, pending, results_csv=results_csv, shard=shard)
        with (
            tracking,
            Recorder(df, list_path, results_csv, n_classes=cfg.exp_arguments.n_classes) as recorder,
        ):
            # say why on the row; the next `list`/`run` picks it up once the file is back
            recorder.skipped(
                {
                    ctx.slide_id: f"slide file not found: {ctx.slide_path} "
                    "(restore it, or set process to 0 for this row)"
                    for ctx in vanished
                }
            )
            if on_start:
                on_start(len(pending))

            def started(rows: Sequence[RowContext]) -> None:
                recorder.start(ctx.slide_id for ctx in rows)

            for outcome in map_rows(executor, cfg, df, pending, plan, started):
                recorder.record(outcome)
                tracking.on_row(outcome)
                summary.add(outcome)
                if on_row:
                    on_row(outcome)

    summary.slowest = sorted(summary.slowest, key=lambda item: -item[1])[:5]
    summary.seconds = time.perf_counter() - start
    return summary


def _pending_rows(
    cfg: HeatmapConfig, df: Any, retry_failed: bool, summary: RunSummary
) -> tuple[list[RowContext], list[RowContext]]:
    """The rows to run and the rows whose slide file vanished; failed rows wait for
    ``retry_failed`` (both skips are counted in ``summary``)."""
    status = dict(zip(df["slide_id"].astype(str), df["status"].astype(str), strict=False))
    missing = (
        dict(zip(df["slide_id"].astype(str), df["missing"].astype(bool), strict=False))
        if "missing" in df.columns
        else {}
    )
    pending: list[RowContext] = []
    vanished: list[RowContext] = []
    for ctx in build_contexts(cfg, df):
        if status.get(ctx.slide_id) == "failed" and not retry_failed:
            summary.count("failed")
        elif missing.get(ctx.slide_id):
            summary.count("skipped")
            vanished.append(ctx)
        else:
            pending.append(ctx)
    return pending, vanished


def _prepare_outputs(
    cfg: HeatmapConfig, list_path: Path, results_csv: Path, *, sweep_roots: bool
) -> None:
    """Check the output roots, sweep a killed run's temp files, save the resolved config.

    ``sweep_roots`` False (a shard of a job array) leaves the shared output roots alone: another
    shard's live temp files may be there. This run is the only writer of its list and results
    CSV (or of its own shard files), so their temp files are always swept.
    """
    raw_root, production_root = output_roots(cfg)
    check_writable(raw_root.parent)
    check_writable(production_root.parent)
    swept = sweep_temp_files(raw_root, production_root) if sweep_roots else 0
    swept += sweep_temp_files_of(list_path, results_csv)
    if swept:
        log.info("removed %d temp files left by an interrupted run", swept)
    _save_resolved_config(cfg)


def clean_outputs(paths: Iterable[Path]) -> None:
    """Remove files/folders (used by tests and ``--force``)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
