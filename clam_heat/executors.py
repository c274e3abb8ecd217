"""Where process-list rows run: in this process, in a local process pool, or on a Dask cluster.

One-writer contract (why outputs are the same whatever the executor):

* The **driver** (:func:`clam_heat.runner.run_pipeline`) is the only writer of the process-list
  CSV and the results CSV. An executor only *returns* :class:`~clam_heat.runner.RowOutcome`
  objects; the driver records them as they arrive.
* A **worker** runs one row at a time with :func:`~clam_heat.runner.process_row`, and so writes
  only that slide's JSON ledger and that slide's outputs, each through a temp file +
  ``os.replace``. No two workers ever hold the same row, so every file has one writer.
* A worker that dies mid-row leaves the ledger's stage marked *started* and no half-written
  output; the executor reruns the row once more (``max_attempts``) and then reports it failed with
  the reason, so a run always finishes every row.
* A sharded run (``--shard i/n``) is a driver of its own: it writes only its shard CSV
  (:func:`shard_path`); :func:`merge_process_list` folds shards back into the list.

Nothing heavy is imported at module level: a spawned worker sets its thread limits before numpy,
torch or OpenCV load.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import ClamHeatError, ConfigError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    import pandas as pd

    from .runner import RowContext, RowOutcome

log = logging.getLogger(__name__)

__all__ = [
    "FAULT_ENV",
    "DaskExecutor",
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "MergeReport",
    "SerialExecutor",
    "available_cores",
    "find_shards",
    "make_executor",
    "merge_process_list",
    "merge_shards",
    "parse_shard",
    "pin_device",
    "select_shard",
    "shard_frame",
    "shard_of",
    "shard_path",
    "threads_per_worker",
]

#: Environment variables that size the BLAS/OpenMP thread pools of numpy, torch and OpenCV.
THREAD_ENV: tuple[str, ...] = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

#: Fault injection for tests only: ``slide_id:stage[:marker_file]``, or ``@PATH`` of a file holding
#: that text (read per row, so a test can arm it after workers started; no file, no fault). A
#: worker running that stage of that slide exits at once (``os._exit``) after the ledger marked the
#: stage started. With a marker file it does so only the first time (the marker is created
#: exclusively).
FAULT_ENV = "CLAM_HEAT_FAULT_EXIT"
FAULT_EXIT_CODE = 86

#: Environment a local worker takes from the driver when the worker starts (not when the fork
#: server did): thread limits and the test-only fault switch.
_FORWARDED_ENV: tuple[str, ...] = (*THREAD_ENV, FAULT_ENV)


class ExecutorError(ClamHeatError):
    """An executor cannot run at all (missing optional package, unreachable scheduler, ...)."""


class Executor(Protocol):
    """What :func:`~clam_heat.runner.run_pipeline` needs: outcomes as rows finish, any order."""

    def map_rows(
        self, pending: list[RowContext], stages: Sequence[str]
    ) -> Iterable[RowOutcome]: ...


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may use (CPU affinity: honours Slurm/cgroup pinning, unlike cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def threads_per_worker(cores: int, workers: int) -> int:
    """Compute threads for each of ``workers`` processes so they do not oversubscribe ``cores``.

    >>> threads_per_worker(16, 4), threads_per_worker(2, 2), threads_per_worker(2, 8)
    (4, 1, 1)
    """
    return max(1, cores // max(1, workers))


def pin_device(device: str, index: int, n_gpus: int) -> str:
    """The device worker ``index`` uses: GPUs round-robin for ``auto``/``cuda`` when there are any.

    An explicit ``cuda:N`` or ``cpu`` is kept; ``auto`` without GPUs stays ``auto`` (-> CPU).

    >>> [pin_device("auto", i, 2) for i in range(3)]
    ['cuda:0', 'cuda:1', 'cuda:0']
    >>> pin_device("cuda", 3, 4), pin_device("cuda:1", 0, 4), pin_device("auto", 1, 0)
    ('cuda:3', 'cuda:1', 'auto')
    """
    if device in ("auto", "cuda") and n_gpus > 0:
        return f"cuda:{index % n_gpus}"
    return device


def _exit_reason(exitcode: int | None) -> str:
    """Human words for a dead process' exit code.

    >>> _exit_reason(-9), _exit_reason(3), _exit_reason(None)
    ('killed by SIGKILL', 'exit code 3', 'connection lost')
    """
    if exitcode is None:
        return "connection lost"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# --------------------------------------------------------------------------------------------
# Worker side (runs in spawned processes and on Dask workers)
# --------------------------------------------------------------------------------------------

_CONFIGURED = False


def _configure_process(
    threads: int, log_files: Sequence[str] = (), level: int = logging.INFO
) -> None:
    """Limit this process' CPU threads and log to the driver's log file(s); once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work
        torch.set_num_interop_threads(1)
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(threads)
    root = logging.getLogger("clam_heat")
    root.setLevel(level)
    for path in log_files:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s")
        )
        root.addHandler(handler)
    if log_files:
        root.propagate = False


#: Modules a worker needs: the stages and what they import lazily (colormaps, codecs, OpenSlide,
#: HDF5). Imported once in the fork server (see :func:`_start_method`).
_STAGE_MODULES: tuple[str, ...] = (
    *(
        f"{__package__}.{name}"
        for name in ("runner", "slide", "segmentation", "features", "models", "heatmap", "sampling")
    ),
    "matplotlib",
    "imagecodecs",
    "tifffile",
    "openslide",
    "h5py",
    "PIL.Image",
    "yaml",
)


def _preload() -> None:
    """Import the stage modules now, so "ready" means ready and the first row is not slower."""
    import importlib

    for name in _STAGE_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _start_method() -> str:
    """``forkserver`` on Linux, else ``spawn``; never plain ``fork``.

    Why: importing torch and the stage modules costs ~1.5 CPU seconds per process. A fork server
    imports them once (before any thread pool or CUDA context exists, so forking it is safe) and
    every worker is forked from it with the modules already loaded, instead of each spawned worker
    importing them again. On 2 cores that start-up was a third of an 8-slide run.
    """
    import multiprocessing
    import sys

    # macOS system frameworks are not safe to use in a forked child; Windows has no fork at all
    if not sys.platform.startswith("linux"):  # pragma: no cover - Linux CI
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(_STAGE_MODULES))
    return "forkserver"


def _thread_settings() -> dict[str, Any]:
    """What this process really runs with (the driver shows it; tests check it)."""
    import torch

    from .threads import helper_threads

    settings: dict[str, Any] = {"torch": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        import cv2

        settings["opencv"] = cv2.getNumThreads()
    settings["helper_threads"] = helper_threads()
    settings.update({name: os.environ.get(name) for name in THREAD_ENV})
    return settings


def _with_device(ctx: RowContext, device: str | None) -> RowContext:
    """``ctx`` with ``runner_arguments.device`` replaced (the per-worker GPU pin)."""
    if device is None or device == ctx.cfg.runner_arguments.device:
        return ctx
    runner = ctx.cfg.runner_arguments.model_copy(update={"device": device})
    return replace(ctx, cfg=ctx.cfg.model_copy(update={"runner_arguments": runner}))


def _maybe_inject_fault(ctx: RowContext, stages: Sequence[str]) -> Any:
    """Tests only (see :data:`FAULT_ENV`): make this process die inside a chosen stage."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("@"):
        try:
            spec = Path(spec[1:]).read_text("utf-8").strip()
        except OSError:
            return None
    if not spec:
        return None
    slide_id, _, rest = spec.partition(":")
    stage, _, marker = rest.partition(":")
    if slide_id != ctx.slide_id or stage not in stages:
        return None
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return None
    from . import runner

    original = runner.STAGE_TABLE[stage]

    def die(_ctx: RowContext) -> Any:
        os._exit(FAULT_EXIT_CODE)

    runner.STAGE_TABLE[stage] = replace(original, run=die)
    return original


def _run_row(ctx: RowContext, stages: Sequence[str], device: str | None = None) -> RowOutcome:
    """One row in this process; a failed outcome, never an exception, whatever goes wrong."""
    from .runner import STAGE_TABLE, RowOutcome, process_row

    ctx = _with_device(ctx, device)
    original = _maybe_inject_fault(ctx, stages)
    try:
        return process_row(ctx, stages)
    except Exception as err:  # noqa: BLE001 - process_row itself should not raise
        log.exception("%s: unexpected error outside the stages", ctx.slide_id)
        return RowOutcome(ctx.slide_id, "failed", error=f"{type(err).__name__}: {err}")
    finally:
        if original is not None:
            STAGE_TABLE[original.name] = original


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_worker_main(
    conn: Connection,
    index: int,
    threads: int,
    n_gpus: int | None,
    log_files: Sequence[str],
    level: int,
    environ: dict[str, str],
) -> None:
    """Entry point of local pool worker ``index``: configure, say ready, then run rows until told
    to stop. ``n_gpus`` None counts the visible GPUs here (the driver never imports torch).

    Ctrl-C is left to the driver, which terminates the workers (outputs are atomic, so an
    interrupted row simply reruns next time).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a forked worker inherits the fork server's environment, not the driver's current one
    os.environ.update(environ)
    for name in set(_FORWARDED_ENV) - environ.keys():
        os.environ.pop(name, None)
    _configure_process(threads, log_files, level)
    _preload()
    gpus = _visible_gpus() if n_gpus is None else n_gpus
    conn.send(("ready", os.getpid(), _thread_settings()))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the driver went away
            return
        if message is None:
            return
        token, ctx, stages = message
        device = pin_device(ctx.cfg.runner_arguments.device, index, gpus)
        conn.send((token, _run_row(ctx, stages, device)))


def _dask_run_row(ctx: RowContext, stages: Sequence[str]) -> RowOutcome:
    """Task run on a Dask worker: thread limits once per worker process, then the row."""
    if not _CONFIGURED:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            try:
                from distributed import get_worker

                nthreads = get_worker().state.nthreads
            except (ImportError, ValueError, AttributeError):
                nthreads = 1
            threads = threads_per_worker(available_cores(), nthreads)
        _configure_process(threads)
    return _run_row(ctx, stages)


# --------------------------------------------------------------------------------------------
# Shared driver-side pieces
# --------------------------------------------------------------------------------------------


def _shippable(ctx: RowContext) -> RowContext:
    """A copy safe to pickle to another process (no open slide handle)."""
    return replace(ctx, _slide=None)


def _lost_row(ctx: RowContext, attempts: int, why: str) -> RowOutcome:
    """The failed outcome of a row whose worker died on every attempt; names the stage it was in."""
    from .ledger import Ledger
    from .runner import STAGES, RowOutcome

    ledger = Ledger.load(ctx.ledger_path)  # read only: the worker was its writer
    done = [s for s in STAGES if (ledger.record(s) or {}).get("state") == "done"]
    running = [s for s in STAGES if (ledger.record(s) or {}).get("state") == "started"]
    where = f" in stage {running[0]}" if running else ""
    times = "once" if attempts == 1 else f"{attempts} times"
    error = (
        f"slide {ctx.slide_path}: worker process died{where} {times} ({why}); often out of "
        "memory: check the worker's memory limit and log, then rerun with --retry-failed"
    )
    return RowOutcome(ctx.slide_id, "failed", stage=done[-1] if done else "", error=error)


def _driver_log_files() -> list[str]:
    """The driver's clam_heat log files, so local workers append to the same run log."""
    root = logging.getLogger("clam_heat")
    return [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (a spawned child copies them at start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------


class SerialExecutor:
    """Rows one after another in this process (what ``run_pipeline(executor=None)`` does)."""

    def map_rows(self, pending: list[RowContext], stages: Sequence[str]) -> Iterator[RowOutcome]:
        for ctx in pending:
            yield _run_row(ctx, stages)


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    ready: bool = False
    task: tuple[RowContext, int] | None = None  # (row, attempt number)
    settings: dict[str, Any] = field(default_factory=dict)  # thread limits it reported


class LocalExecutor:
    """``--workers N``: rows run in N spawned processes on this machine.

    Never a plain fork of the driver (torch and OpenSlide are not fork-safe once used): workers come
    from a fork server that has imported the stage modules and nothing else (:func:`_start_method`),
    or are spawned where there is none. Each worker loads the model once
    (``runner._MODEL_CACHE`` lives per process), runs ``threads_per_worker(cores, N)`` CPU threads
    and, when GPUs are visible and a row's device is ``auto``/``cuda``, worker i runs it on
    ``cuda:(i % n_gpus)`` (:func:`pin_device`; ``n_gpus`` overrides the count). A worker that dies
    is replaced; its row is rerun until ``max_attempts`` attempts, then reported failed.

    Use as a context manager to keep the pool (and loaded models) across several runs; otherwise
    each :meth:`map_rows` call starts and stops its own pool.
    """

    def __init__(
        self,
        workers: int,
        *,
        cores: int | None = None,
        max_attempts: int = 2,
        n_gpus: int | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        self.workers = workers
        self.cores = cores if cores is not None else available_cores()
        self.max_attempts = max_attempts
        self.n_gpus = n_gpus
        self._pool: list[_Worker] = []
        self._started_by_context = False
        self._failed_starts = 0

    @property
    def threads(self) -> int:
        return threads_per_worker(self.cores, self.workers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        return [w.process.pid for w in self._pool if w.process.pid is not None]

    @property
    def worker_settings(self) -> list[dict[str, Any]]:
        """Thread settings each ready worker reported (torch, OpenCV, the BLAS variables)."""
        return [w.settings for w in self._pool if w.ready]

    # lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> LocalExecutor:
        try:
            self.start(wait=True)
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self._started_by_context = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._started_by_context = False
        self.shutdown(graceful=exc[0] is None)

    def start(self, *, wait: bool = False, timeout: float = 300.0) -> None:
        """Start the workers; with ``wait``, block until each has loaded its libraries."""
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn(len(self._pool)))
        if wait:
            from multiprocessing.connection import wait as wait_for

            deadline = time.monotonic() + timeout
            while not all(w.ready for w in self._pool):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExecutorError(f"local workers not ready after {timeout:.0f}s")
                pending = [w for w in self._pool if not w.ready]
                handles = [w.conn for w in pending] + [w.process.sentinel for w in pending]
                wait_for(handles, timeout=left)
                for worker in pending:
                    self._poll(worker)
                    if not worker.ready and not worker.process.is_alive():
                        self._replace_dead(worker)  # raises once they keep dying

    def _spawn(self, index: int) -> _Worker:
        import multiprocessing

        mp = multiprocessing.get_context(_start_method())
        parent, child = mp.Pipe(duplex=True)
        environ = {name: str(self.threads) for name in THREAD_ENV}
        environ.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
        process = mp.Process(
            target=_local_worker_main,
            args=(
                child,
                index,
                self.threads,
                self.n_gpus,
                _driver_log_files(),
                logging.getLogger("clam_heat").level,
                environ,
            ),
            name=f"clam-heat-worker-{index}",
            daemon=True,
        )
        # thread limits must be in the environment before numpy/torch load (in the fork server,
        # which starts with the first worker, or in a spawned child)
        with _environ({name: str(self.threads) for name in THREAD_ENV}):
            process.start()
        child.close()
        return _Worker(index, process, parent)

    def shutdown(self, *, graceful: bool = True, timeout: float = 10.0) -> None:
        """Stop the workers: ask politely after a normal run, terminate after an error/Ctrl-C."""
        for worker in self._pool:
            if graceful and worker.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send(None)
            else:
                worker.process.terminate()
        deadline = time.monotonic() + timeout
        for worker in self._pool:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1.0)
            worker.conn.close()
        self._pool = []

    # scheduling ------------------------------------------------------------------------------

    def _poll(self, worker: _Worker) -> Any:
        """Read one message if there is one; returns an outcome, or None."""
        try:
            if not worker.conn.poll():
                return None
            message = worker.conn.recv()
        except (EOFError, OSError):
            return None
        if message[0] == "ready":
            worker.ready = True
            worker.settings = message[2]
            self._failed_starts = 0
            return None
        _token, outcome = message
        worker.task = None
        return outcome

    def _replace_dead(self, worker: _Worker) -> _Worker:
        worker.conn.close()
        worker.process.join(1.0)
        if not worker.ready:
            self._failed_starts += 1
            if self._failed_starts > 2 * self.workers + 1:
                raise ExecutorError(
                    f"local workers keep dying before they start "
                    f"({_exit_reason(worker.process.exitcode)}); run with --workers 1 to see why"
                )
        fresh = self._spawn(worker.index)
        self._pool[self._pool.index(worker)] = fresh
        return fresh

    def _dispatch(self, queue: deque[tuple[RowContext, int]], stages: Sequence[str]) -> None:
        """Give each idle, ready worker the next row."""
        for worker in self._pool:
            if worker.ready and worker.task is None and queue and worker.process.is_alive():
                ctx, attempt = queue.popleft()
                worker.task = (ctx, attempt)
                with contextlib.suppress(OSError):  # died just now: its sentinel requeues the row
                    worker.conn.send((uuid.uuid4().hex, ctx, list(stages)))

    def map_rows(self, pending: list[RowContext], stages: Sequence[str]) -> Iterator[RowOutcome]:
        """Yield each row's outcome as it finishes (any order)."""
        from multiprocessing.connection import wait as wait_for

        if not pending:
            return
        own_pool = not self._pool
        self.start()
        queue: deque[tuple[RowContext, int]] = deque((_shippable(c), 1) for c in pending)
        remaining = len(queue)
        graceful = False
        try:
            while remaining:
                self._dispatch(queue, stages)
                handles: list[Any] = [w.conn for w in self._pool]
                handles += [w.process.sentinel for w in self._pool]
                wait_for(handles, timeout=5.0)
                finished: list[RowOutcome] = []
                for worker in list(self._pool):
                    outcome = self._poll(worker)
                    if outcome is not None:
                        finished.append(outcome)
                        continue
                    if worker.process.is_alive():
                        continue
                    while (outcome := self._poll(worker)) is not None:  # sent just before dying
                        finished.append(outcome)
                    lost, why = worker.task, _exit_reason(worker.process.exitcode)
                    self._replace_dead(worker)
                    if lost is None:
                        continue
                    ctx, attempt = lost
                    log.warning("%s: worker died (%s) on attempt %d", ctx.slide_id, why, attempt)
                    if attempt < self.max_attempts:
                        queue.append((ctx, attempt + 1))
                    else:
                        finished.append(_lost_row(ctx, attempt, why))
                self._dispatch(queue, stages)  # workers stay busy while the driver records
                for outcome in finished:
                    remaining -= 1
                    yield outcome
            graceful = True
        finally:
            if own_pool and not self._started_by_context:
                self.shutdown(graceful=graceful)


class DaskExecutor:
    """``--executor dask``: rows run as tasks on an existing Dask distributed cluster.

    Workers need the same shared-filesystem paths as the driver and ``clam-heat`` installed. A
    worker dying mid-task is rescheduled by Dask itself (up to
    ``distributed.scheduler.allowed-failures`` times); when Dask gives up with ``KilledWorker``
    the row is resubmitted until ``max_attempts``, then reported failed. Each worker process
    loads the model once and keeps the nanny's thread limits (``OMP_NUM_THREADS=1`` by default).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        scheduler_file: Path | str | None = None,
        client: Any = None,
        max_attempts: int = 2,
        connect_timeout: float = 30.0,
    ) -> None:
        if client is None and not address and not scheduler_file:
            raise ConfigError(
                "--executor dask needs --scheduler tcp://HOST:8786 or --scheduler-file PATH"
            )
        if address and scheduler_file:
            raise ConfigError("give either --scheduler or --scheduler-file, not both")
        self.address = address
        self.scheduler_file = Path(scheduler_file) if scheduler_file else None
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self._client = client

    def _connect(self) -> Any:
        distributed = _import_distributed()
        where = str(self.scheduler_file or self.address)
        if self.scheduler_file is not None and not self.scheduler_file.is_file():
            raise ExecutorError(
                f"{self.scheduler_file}: scheduler file not found (start the scheduler with "
                "--scheduler-file on a shared filesystem, or pass --scheduler tcp://HOST:8786)"
            )
        try:
            if self.scheduler_file is not None:
                return distributed.Client(
                    scheduler_file=str(self.scheduler_file), timeout=self.connect_timeout
                )
            return distributed.Client(self.address, timeout=self.connect_timeout)
        except (OSError, TimeoutError) as err:
            raise ExecutorError(
                f"dask scheduler {where} not reachable ({' '.join(str(err).split())}); start the "
                "cluster first or check --scheduler/--scheduler-file"
            ) from None

    def map_rows(self, pending: list[RowContext], stages: Sequence[str]) -> Iterator[RowOutcome]:
        """Submit every row, then yield outcomes as tasks finish (any order)."""
        if not pending:
            return
        distributed = _import_distributed()
        client = self._client if self._client is not None else self._connect()
        tasks: dict[Any, tuple[RowContext, int]] = {}

        def submit(ctx: RowContext, attempt: int) -> Any:
            future = client.submit(
                _dask_run_row,
                ctx,
                list(stages),
                key=f"clam-heat-row-{ctx.slide_id}-{uuid.uuid4().hex[:8]}",
                pure=False,
            )
            tasks[future] = (ctx, attempt)
            return future

        try:
            done = distributed.as_completed([submit(_shippable(c), 1) for c in pending])
            for future in done:
                ctx, attempt = tasks.pop(future)
                try:
                    outcome = future.result()
                except distributed.KilledWorker as err:
                    why = f"dask KilledWorker: {' '.join(str(err).split())[:200]}"
                    log.warning("%s: %s (attempt %d)", ctx.slide_id, why, attempt)
                    if attempt < self.max_attempts:
                        done.add(submit(ctx, attempt + 1))
                        continue
                    outcome = _lost_row(ctx, attempt, why)
                except Exception as err:  # noqa: BLE001 - a row's failure never stops the run
                    from .runner import RowOutcome

                    outcome = RowOutcome(
                        ctx.slide_id,
                        "failed",
                        error=f"dask task failed ({type(err).__name__}: {err}); see the worker log",
                    )
                yield outcome
        finally:
            for future in tasks:
                future.cancel()
            if self._client is None:
                client.close()


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ExecutorError(
            "--executor dask needs Dask distributed: pip install 'clam-heat[dask]'"
        ) from None
    return distributed


def make_executor(
    kind: Literal["local", "dask", "serial"] | None = None,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    scheduler_file: Path | str | None = None,
) -> Executor | None:
    """The executor for the CLI options; None means run rows in the driver process (serial).

    ``kind`` None picks dask when a scheduler is given, else local.

    >>> make_executor(workers=1) is None, type(make_executor(workers=3)).__name__
    (True, 'LocalExecutor')
    """
    if kind is None:
        kind = "dask" if (scheduler or scheduler_file) else "local"
    if kind == "dask":
        _import_distributed()
        return DaskExecutor(scheduler, scheduler_file=scheduler_file)
    if scheduler or scheduler_file:
        raise ConfigError(f"--scheduler/--scheduler-file need --executor dask (got {kind})")
    if kind == "serial" or (kind == "local" and workers == 1):
        return None
    if kind == "local":
        return LocalExecutor(workers)
    raise ConfigError(f"--executor must be local, dask or serial, got {kind!r}")


# --------------------------------------------------------------------------------------------
# Sharding for plain job arrays
# --------------------------------------------------------------------------------------------

#: Process-list columns a run writes; everything else belongs to the user and is never merged.
RUN_COLUMNS: tuple[str, ...] = ("status", "stage", "error", "updated_at")
_RESULT_COLUMN = re.compile(r"^(bag_size|attention_mean|attention_std|Pred_\d+|p_\d+)$")
_SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)$")


def is_run_column(name: str) -> bool:
    """True for columns the runner owns (status and results), False for user columns.

    >>> [is_run_column(c) for c in ("status", "p_1", "Pred_0", "label", "x1", "process")]
    [True, True, True, False, False, False]
    """
    return name in RUN_COLUMNS or bool(_RESULT_COLUMN.match(name))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) from ``--shard``; Slurm: ``--shard $SLURM_ARRAY_TASK_ID/N``.

    >>> parse_shard("0/4"), parse_shard(" 3 / 4 ")
    ((0, 4), (3, 4))
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. --shard 0/4")
    i, n = int(match[1]), int(match[2])
    if n < 1 or i >= n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def shard_of(slide_id: str, n: int) -> int:
    """The shard (0..n-1) of a slide: a stable hash of its id, the same on every machine/run.

    Hashing (not list position) keeps a slide in its shard when rows are added, removed or
    reordered, so a rerun with the same n never moves work between array tasks.

    >>> shard_of("slide_1", 4) == shard_of("slide_1", 4), shard_of("anything", 1)
    (True, 0)
    """
    digest = hashlib.sha256(str(slide_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def select_shard(
    contexts: Sequence[Any], i: int, n: int, *, by: Literal["hash", "position"] = "hash"
) -> list[Any]:
    """The rows of shard ``i`` of ``n``: by stable hash of ``slide_id`` (default) or by position.

    ``by="position"`` takes every n-th row starting at i (balanced shards) and is stable only
    while the list's rows and order do not change; pass it the whole list, not pending rows.
    Works on anything with a ``slide_id`` attribute (RowContexts).
    """
    if not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: need 0 <= i < n")
    if by == "position":
        return list(contexts[i::n])
    return [c for c in contexts if shard_of(c.slide_id, n) == i]


def shard_path(list_path: Path | str, i: int, n: int) -> Path:
    """Where shard ``i`` of ``n`` writes its rows: beside the list.

    >>> shard_path("lists/demo.csv", 2, 8).as_posix()
    'lists/demo.shard-2-of-8.csv'
    """
    path = Path(list_path)
    return path.with_name(f"{path.stem}.shard-{i}-of-{n}{path.suffix or '.csv'}")


def find_shards(list_path: Path | str) -> list[Path]:
    """Every shard file of a list (any n), ordered by n then i."""
    path = Path(list_path)
    found = []
    for candidate in path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix or '.csv'}"):
        match = _SHARD_NAME.match(candidate.stem)
        if match and match["stem"] == path.stem:
            found.append((int(match["n"]), int(match["i"]), candidate))
    return [p for _, _, p in sorted(found)]


def _read_text_frame(path: Path) -> pd.DataFrame:
    """A CSV with every cell as the exact text in the file (so untouched cells round-trip)."""
    import pandas as pd

    from .errors import ProcessListError

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise ProcessListError(f"{path}: cannot read CSV ({err}); fix or remove the file") from None


def _timestamps(values: Any) -> Any:
    import pandas as pd

    return pd.to_datetime(
        pd.Series(values, dtype=object), utc=True, errors="coerce", format="ISO8601"
    )


def _overlay(
    base: pd.DataFrame, shard: pd.DataFrame, source: Path
) -> tuple[pd.DataFrame, int, list[str]]:
    """Copy the run columns of ``shard`` rows into ``base`` where the shard is as new or newer.

    Returns the new frame, how many rows were taken and the shard's slide ids unknown to base.
    Ties go to the shard: the shard is where the row ran.
    """
    from .errors import ProcessListError

    if "slide_id" not in shard.columns:
        raise ProcessListError(f"{source}: no slide_id column; not a process-list shard")
    base = base.copy()
    ids = base["slide_id"].astype(str)
    shard_ids = shard["slide_id"].astype(str)
    if shard_ids.duplicated().any():
        dupes = sorted(set(shard_ids[shard_ids.duplicated()]))[:3]
        raise ProcessListError(f"{source}: duplicate slide_id {dupes}; fix or delete the shard")
    position = {sid: k for k, sid in enumerate(ids)}
    unknown = [sid for sid in shard_ids if sid not in position]
    known = shard[shard_ids.isin(position)].reset_index(drop=True)
    if known.empty:
        return base, 0, unknown
    rows = [position[sid] for sid in known["slide_id"].astype(str)]
    base_times = (
        _timestamps(base["updated_at"].iloc[rows].to_numpy())
        if "updated_at" in base.columns
        else _timestamps([None] * len(rows))
    )
    shard_times = (
        _timestamps(known["updated_at"].to_numpy())
        if "updated_at" in known.columns
        else _timestamps([None] * len(rows))
    )
    take = (shard_times.notna() & (base_times.isna() | (shard_times >= base_times))).to_numpy()
    if not take.any():
        return base, 0, unknown
    target = base.index[[r for r, t in zip(rows, take, strict=True) if t]]
    columns = [c for c in known.columns if is_run_column(c)]
    for column in columns:
        if column not in base.columns:
            base[column] = ""
        if base[column].dtype != object:
            base[column] = base[column].astype(object)
        base.loc[target, column] = known.loc[take, column].astype(object).to_numpy()
    return base, int(take.sum()), unknown


def merge_shards(
    list_path: Path | str, shard_paths: Sequence[Path | str] | None = None
) -> pd.DataFrame:
    """The process list with every shard's run columns folded in (nothing is written).

    For each shard row whose ``updated_at`` is as new as or newer than the list's, the run
    columns (status, stage, error, updated_at, bag_size, Pred_c, p_c, attention stats) come from
    the shard; user columns, row order and rows absent from all shards are untouched, cell text
    included. Shards default to :func:`find_shards`.
    """
    return _merge(Path(list_path), shard_paths)[0]


@dataclass
class MergeReport:
    """What :func:`merge_process_list` did, for the CLI's one-line summary."""

    list_path: Path
    shards: list[Path] = field(default_factory=list)
    rows_taken: int = 0
    unknown: list[str] = field(default_factory=list)
    results_csv: Path | None = None
    removed: list[Path] = field(default_factory=list)


def _merge(
    list_path: Path, shard_paths: Sequence[Path | str] | None
) -> tuple[pd.DataFrame, MergeReport]:
    from .errors import ProcessListError

    if not list_path.is_file():
        raise ProcessListError(
            f"{list_path}: process list not found; run `clam-heat list CONFIG` first"
        )
    shards = [Path(p) for p in shard_paths] if shard_paths is not None else find_shards(list_path)
    report = MergeReport(list_path, shards)
    frame = _read_text_frame(list_path)
    for shard in shards:
        if not shard.is_file():
            raise ProcessListError(f"{shard}: shard not found (check the path or omit it)")
        frame, taken, unknown = _overlay(frame, _read_text_frame(shard), shard)
        report.rows_taken += taken
        report.unknown.extend(u for u in unknown if u not in report.unknown)
    return frame, report


def merge_process_list(
    list_path: Path | str,
    shard_paths: Sequence[Path | str] | None = None,
    *,
    results_csv: Path | str | None = None,
    remove: bool = False,
) -> MergeReport:
    """``clam-heat merge LIST``: fold shard CSVs into the list, atomically; optionally rewrite
    the results CSV (the ``process == 1`` rows) and remove the merged shards (with ``results_csv``
    also that CSV's shards, which sharded runs write beside it).

    Safe to repeat: merging the same shards twice changes nothing.
    """
    import pandas as pd

    from .ledger import write_text_atomic

    list_path = Path(list_path)
    frame, report = _merge(list_path, shard_paths)
    if report.shards:
        write_text_atomic(list_path, frame.to_csv(index=False))
    if results_csv is not None:
        report.results_csv = Path(results_csv)
        process = pd.to_numeric(
            frame.get("process", pd.Series(["1"] * len(frame))), errors="coerce"
        )
        processed = frame[(process == 1).to_numpy()].reset_index(drop=True)
        write_text_atomic(report.results_csv, processed.to_csv(index=False))
    if remove:
        leftovers = find_shards(results_csv) if results_csv is not None else []
        for shard in [*report.shards, *leftovers]:  # a shard run's results CSV shards too
            shard.unlink(missing_ok=True)
            report.removed.append(shard)
    return report


def shard_frame(df: pd.DataFrame, list_path: Path | str, i: int, n: int) -> pd.DataFrame:
    """The rows of shard ``i``/``n`` of the process list ``df``, resumed from its shard file.

    What a sharded driver starts from: the list's rows whose :func:`shard_of` is ``i`` (in list
    order), with the run columns of an existing ``shard_path(list_path, i, n)`` laid over them
    when newer, so a resubmitted array task skips rows it already finished.
    """
    if not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: need 0 <= i < n")
    mask = [shard_of(str(s), n) == i for s in df["slide_id"]]
    rows = df[mask].reset_index(drop=True)
    existing = shard_path(list_path, i, n)
    if existing.is_file():
        rows, _taken, _unknown = _overlay(rows, _read_text_frame(existing), existing)
    return rows
