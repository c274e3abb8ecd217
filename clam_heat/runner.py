"""The driver behind ``clam-heat run``: list -> executor -> recorder.

It builds the process list and one :class:`~clam_heat.rows.RowContext` per pending row, resolves
the stages once (:func:`~clam_heat.stages.registry.stages_for`), hands the rows to an executor
(:mod:`clam_heat.executors`; each row runs under the ledger protocol of
:func:`~clam_heat.stages.row.process_row`) and gives every outcome to the one
:class:`~clam_heat.process_list.Recorder`, which writes status, last completed stage, error and
results back to the CSVs. A row's failure never stops the others.

One run per list: the driver holds the list's lock (:mod:`clam_heat.process_list.lock`) from
before it replays a killed run's journal until its last CSV write, so the start-up temp sweep
never meets a live run's files. SIGTERM/SIGINT stop it cleanly (:class:`StopSignals`): no more
rows are handed out, unfinished rows go back to their old status, both CSVs are flushed, the
workers are stopped, and :attr:`RunSummary.stopped_by` tells the CLI to say so and exit
128 + signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import model_process
from .atomic import sweep_probe_files, sweep_temp_files, sweep_temp_files_of, write_text_atomic
from .config import HeatmapConfig
from .errors import OutputError
from .executors import LocalExecutor, SerialExecutor
from .phases import map_rows
from .preflight import OutputRootError, output_folders, preflight
from .process_list import Recorder, build_process_list, shard_frame, shard_path
from .process_list.build import missing_slide_reason
from .process_list.csvfile import write_csv_atomic
from .process_list.lock import list_lock
from .process_list.record import replay_journal
from .rows import (
    RowContext,
    build_contexts,
    output_roots,
    resolved_config_path,
    results_csv_path,
)
from .stages.registry import stages_for
from .stages.row import RowOutcome, failed_row_changed, plan_row
from .tracking_hook import RunTracking

log = logging.getLogger(__name__)
#: Lines for the user's terminal (the CLI shows this logger's warnings as ``warning: ...``).
_notice = logging.getLogger("clam_heat.notice")

__all__ = [
    "RunSummary",
    "StopRequested",
    "StopSignals",
    "cap_workers",
    "run_pipeline",
    "stop_line",
]


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
    #: set when SIGTERM/SIGINT stopped the run: the signal, rows finished, rows put back
    stopped_by: int | None = None
    finished: int = 0
    returned: int = 0
    #: failed rows left alone: nothing they depend on changed since they failed
    waiting: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1

    def add(self, outcome: RowOutcome) -> None:
        """One finished row's numbers."""
        self.finished += 1
        self.count(outcome.status)
        for name, secs in outcome.ran.items():
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + secs
        self.slowest.append((outcome.slide_id, outcome.seconds))
        if outcome.status == "failed":
            self.failed.append((outcome.slide_id, outcome.error))


class StopRequested(BaseException):
    """Raised by :class:`StopSignals` into the waiting driver (a BaseException, so the
    ``except Exception`` that keeps a bad row from stopping the run does not swallow it)."""


class StopSignals:
    """SIGTERM/SIGINT -> a clean stop of the driver; a second signal forces the exit.

    The handler only records the signal while the driver records an outcome (``held``), and
    raises :class:`StopRequested` while it waits for the executor, builds the list or starts
    workers, so a stop is prompt and never lands inside a CSV or journal write. Installed only
    in the main thread (Python delivers signals there).

    A signal that arrives while a finalizer runs (``__del__``, e.g. OpenSlide closing a slide
    handle; a generator or weakref callback the garbage collector finishes) must not be raised
    there: Python prints an exception from a finalizer as "Exception ignored" and drops it, so
    the stop would be lost behind a traceback. The handler does not raise inside ``__del__``,
    and a :class:`StopRequested` that a finalizer dropped all the same is caught by
    ``sys.unraisablehook``, silently; either way the stop is raised again a few milliseconds
    later (``SIGALRM``), outside the finalizer.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    #: seconds before a stop that arrived inside a finalizer is raised again
    RETRY_SECONDS = 0.005

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopping = False
        self._armed = True
        self._old: dict[int, Any] = {}
        self._old_unraisable_hook: Callable[[Any], Any] = sys.unraisablehook

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
            self._old[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._retry)
            self._old_unraisable_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.unraisablehook = self._old_unraisable_hook
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and self.stopping:
            name = signal.Signals(signum).name
            os.write(2, f"stopped by {name} again: forced exit\n".encode())
            os._exit(128 + signum)
        if self.signum is None:
            self.signum = signum
        self._raise_unless_in_finalizer(frame)

    def _retry(self, _signum: int, frame: Any) -> None:
        if self.signum is not None and not self.stopping:
            self._raise_unless_in_finalizer(frame)

    def _raise_unless_in_finalizer(self, frame: Any) -> None:
        if not self._armed:
            return
        if _in_finalizer(frame):
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_SECONDS)
            return
        self._armed = False
        raise StopRequested

    def _unraisable(self, info: Any) -> None:
        """A stop a finalizer dropped: arm again and retry shortly (other reports pass on)."""
        if not isinstance(info.exc_value, StopRequested):
            self._old_unraisable_hook(info)
            return
        if not self.stopping:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_SECONDS)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block a signal must not interrupt (a signal that came during it stops the run as
        the block ends)."""
        self._armed = False
        try:
            yield
        except BaseException:
            self._armed = not self.stopping
            raise
        self._armed = not self.stopping
        if self.signum is not None and not self.stopping:
            self._armed = False
            raise StopRequested

    def begin_stop(self) -> None:
        """From now on: no raising; a second signal forces the exit."""
        self._armed = False
        self.stopping = True


def _in_finalizer(frame: Any) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` (where a raised exception is dropped)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def stop_line(summary: RunSummary) -> str:
    """The one line a stopped run prints.

    >>> stop_line(RunSummary(stopped_by=15, finished=812, returned=3))
    'stopped by SIGTERM: 812 done, 3 back to pending; run the same command to resume'
    """
    name = signal.Signals(summary.stopped_by or signal.SIGTERM).name
    return (
        f"stopped by {name}: {summary.finished} done, {summary.returned} back to pending; "
        "run the same command to resume"
    )


def _save_resolved_config(cfg: HeatmapConfig) -> Path:
    import yaml

    path = resolved_config_path(cfg)
    text = yaml.safe_dump(cfg.to_yaml_dict(), default_flow_style=False, sort_keys=True)
    write_text_atomic(path, text)
    return path


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
    if dry_run:
        preflight(cfg, plan, dry_run=True)  # global inputs only: a dry run writes nothing
        df, list_path = build_process_list(cfg, write=False)
        if shard is not None:
            df = shard_frame(df, list_path, *shard)
            list_path = shard_path(list_path, *shard)
        summary.process_list = list_path
        pending, _vanished = _pending_rows(cfg, df, retry_failed, summary, plan)
        for ctx in pending:
            reasons = plan_row(ctx, plan)
            summary.plans[ctx.slide_id] = {k: (str(v) if v else None) for k, v in reasons.items()}
            ctx.close()
        summary.seconds = time.perf_counter() - start
        return summary

    list_path, results_csv = Path(cfg.process_list_path), results_csv_path(cfg)
    run_list, run_results = list_path, results_csv
    if shard is not None:
        run_list, run_results = shard_path(list_path, *shard), shard_path(results_csv, *shard)
    if executor is None:
        workers = cfg.runner_arguments.workers
        executor = LocalExecutor(workers) if workers > 1 else SerialExecutor()
    if not isinstance(executor, SerialExecutor):
        model_process.release()  # workers run their own model stages (preflight used it)
    with contextlib.ExitStack() as held, StopSignals() as stop:
        try:
            # the lock first: a second run is refused at once, before the start-up checks
            try:
                if shard is not None:  # shards side by side; never under a whole-list run
                    held.enter_context(list_lock(list_path, shared=True))
                held.enter_context(list_lock(run_list))
            except OutputError as err:  # no lock file can be made: an unwritable list folder
                raise OutputRootError(str(err)) from None
            # output roots and global inputs, exit 2 if bad
            preflight(cfg, plan, in_process=isinstance(executor, SerialExecutor))
            replay_journal(run_list, run_results)  # a killed run's finished rows first
            _run_locked(cfg, plan, executor, summary, stop, shard, retry_failed, on_row, on_start)
        except StopRequested:
            pass
        if stop.signum is not None:
            summary.stopped_by = stop.signum
    summary.slowest = sorted(summary.slowest, key=lambda item: -item[1])[:5]
    summary.seconds = time.perf_counter() - start
    return summary


def _run_locked(
    cfg: HeatmapConfig,
    plan: Sequence[Any],
    executor: Any,
    summary: RunSummary,
    stop: StopSignals,
    shard: tuple[int, int] | None,
    retry_failed: bool,
    on_row: Callable[[RowOutcome], None] | None,
    on_start: Callable[[int], None] | None,
) -> None:
    """The run proper, holding the list's lock; a stop ends it through :func:`_stop`."""
    df, list_path = build_process_list(cfg, write=True)
    results_csv = results_csv_path(cfg)
    if shard is not None:
        df = shard_frame(df, list_path, *shard)
        list_path = shard_path(list_path, *shard)
        results_csv = shard_path(results_csv, *shard)
        if len(df):  # the recorder merges into the file on disk (an empty shard writes none)
            with stop.held():
                write_csv_atomic(df, list_path)
    summary.process_list = list_path
    pending, vanished = _pending_rows(cfg, df, retry_failed, summary, plan)
    cap_workers(executor, len(pending), force=cfg.runner_arguments.force_workers)
    with executor:  # a local pool loads its libraries now
        _prepare_outputs(cfg, list_path, results_csv, sweep_roots=shard is None)
        summary.results_csv = results_csv
        tracking = RunTracking(cfg, pending, results_csv=results_csv, shard=shard)
        recorder = Recorder(
            df,
            list_path,
            results_csv,
            n_classes=cfg.exp_arguments.n_classes,
            flush_seconds=cfg.runner_arguments.flush_seconds,
        )
        outcomes: Iterator[RowOutcome] | None = None
        # the tracker closes after the recorder: the results CSV it logs is complete
        with tracking:
            try:
                with stop.held():
                    recorder.journal.open()
                    # say why on the row; the next `list`/`run` picks it up once the file is back
                    recorder.skipped(
                        {ctx.slide_id: missing_slide_reason(ctx.slide_path) for ctx in vanished}
                    )
                if on_start:
                    on_start(len(pending))

                def started(rows: Sequence[RowContext]) -> None:
                    with stop.held():
                        recorder.start(ctx.slide_id for ctx in rows)

                outcomes = map_rows(executor, cfg, df, pending, plan, started)
                for outcome in outcomes:
                    with stop.held():
                        recorder.record(outcome)
                        tracking.on_row(outcome)
                        summary.add(outcome)
                        if on_row:
                            on_row(outcome)
                    if stop.signum is not None:
                        raise StopRequested
            except StopRequested:
                _stop(stop, summary, recorder, executor, outcomes)
                raise
            finally:
                with stop.held():
                    recorder.close()
            _faithfulness_summary(cfg, df, results_csv, tracking)


def _faithfulness_summary(
    cfg: HeatmapConfig, df: Any, results_csv: Path, tracking: RunTracking
) -> None:
    """``<results>/<list>_faithfulness.json`` and ``.png`` from the rows' curves
    (docs/explanations.md), logged to the tracker; nothing unless the faithfulness stage is on."""
    if not cfg.heatmap_arguments.faithfulness_on():
        return
    from .explain.report import write_faithfulness_summary
    from .rows import faithfulness_json_path

    files = [(ctx.slide_id, faithfulness_json_path(ctx)) for ctx in build_contexts(cfg, df)]
    stem = results_csv.stem
    json_out = results_csv.with_name(f"{stem}_faithfulness.json")
    png_out = results_csv.with_name(f"{stem}_faithfulness.png")
    if write_faithfulness_summary(files, json_out, png_out) is not None:
        tracking.tracker.log_artifact(json_out)
        tracking.tracker.log_artifact(png_out)


def cap_workers(executor: Any, pending: int, *, force: bool = False) -> None:
    """Start no more local workers than there are pending rows, nor (unless ``force``) than
    the cores this process may use: each idle worker still loads the model and the encoder.
    Said in one line on stderr when it lowers the count."""
    if not isinstance(executor, LocalExecutor) or executor.pids:
        return  # another executor, or a pool the caller already started
    from .executors.base import available_cores

    asked = executor.workers
    cores = available_cores()
    cap = max(1, min(asked, pending, asked if force else cores))
    if cap < asked:
        why = [f"{pending} pending rows"] + ([] if force else [f"{cores} cores"])
        _notice.warning(
            "--workers %d lowered to %d (%s)%s",
            asked,
            cap,
            ", ".join(why),
            "" if force or cap < cores else "; set runner_arguments.force_workers to go past it",
        )
        executor.workers = cap


def _stop(
    stop: StopSignals,
    summary: RunSummary,
    recorder: Recorder,
    executor: Any,
    outcomes: Iterator[RowOutcome] | None,
) -> None:
    """A clean stop: unfinished rows back to pending, both CSVs written, workers stopped."""
    stop.begin_stop()
    summary.returned = recorder.release()
    recorder.close()
    if outcomes is not None and hasattr(outcomes, "close"):
        outcomes.close()  # a Dask run cancels its tasks here
    abort = getattr(executor, "abort", None)
    if abort is not None:
        abort()
    log.warning(
        "stopped by signal %s: %d rows finished, %d back to pending",
        stop.signum,
        summary.finished,
        summary.returned,
    )


def _pending_rows(
    cfg: HeatmapConfig, df: Any, retry_failed: bool, summary: RunSummary, plan: Sequence[Any]
) -> tuple[list[RowContext], list[RowContext]]:
    """The rows to run and the rows whose slide file vanished. A failed row runs again when
    something it depends on changed since it failed (the same fingerprints as a done row's
    stages); an unchanged one waits for ``retry_failed`` (both skips are counted in
    ``summary``)."""
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
            why = failed_row_changed(ctx, plan)
            if why is None:
                summary.count("failed")
                summary.waiting += 1
                continue
            log.info("%s: failed before; runs again, %s", ctx.slide_id, why)
        if missing.get(ctx.slide_id):
            summary.count("skipped")
            vanished.append(ctx)
        else:
            pending.append(ctx)
    return pending, vanished


def _prepare_outputs(
    cfg: HeatmapConfig, list_path: Path, results_csv: Path, *, sweep_roots: bool
) -> None:
    """Sweep a killed run's temp files and save the resolved config (the output roots were
    checked by :func:`~clam_heat.preflight.preflight`).

    ``sweep_roots`` False (a shard of a job array) leaves the shared output roots alone: another
    shard's live temp files may be there. This run is the only writer of its list and results
    CSV (or of its own shard files), so their temp files are always swept.
    """
    raw_root, production_root = output_roots(cfg)  # writable: checked by preflight
    swept = sweep_temp_files(raw_root, production_root) if sweep_roots else 0
    swept += sweep_temp_files_of(list_path, results_csv)
    swept += sweep_probe_files(folder for _key, folder in output_folders(cfg))
    if swept:
        log.info("removed %d temp files left by an interrupted run", swept)
    _save_resolved_config(cfg)
