"""``--workers N``: rows run in N local worker processes forked from a preloaded fork server."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import (
    THREAD_ENV,
    ExecutorError,
    Outcomes,
    Rows,
    Stages,
    Started,
    _configure_process,
    _exit_reason,
    _lost_row,
    _preload,
    _run_row,
    _shippable,
    _thread_settings,
    available_cores,
    killed_for_memory,
    pin_device,
    threads_per_worker,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from ..rows import RowContext
    from ..stages.base import Stage
    from ..stages.row import RowOutcome

log = logging.getLogger(__name__)

__all__ = ["LocalExecutor"]


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
    from ..stages.registry import preload_modules

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload_modules()))
    return "forkserver"


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
    for name in set(THREAD_ENV) - environ.keys():
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

    Never a plain fork of the driver (torch and OpenSlide are not fork-safe once used): workers
    come from a fork server that has imported the stage modules and nothing else
    (:func:`_start_method`), or are spawned where there is none. Each worker loads the model
    once (:mod:`clam_heat.stages.resources` caches it per process), runs
    ``threads_per_worker(cores, N)`` CPU threads and, when GPUs are visible and a row's device
    is ``auto``/``cuda``, worker i runs it on ``cuda:(i % n_gpus)`` (:func:`pin_device`;
    ``n_gpus`` overrides the count). A worker that dies is replaced; its row is rerun until
    ``max_attempts`` attempts, then reported failed.

    Use as a context manager to keep the pool (and loaded models) across several runs (entering
    again while open does nothing; the outermost exit stops it); otherwise each :meth:`map_rows`
    call starts and stops its own pool.
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
        self._depth = 0  # how many `with` blocks hold the pool open
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
        if self._depth == 0:
            try:
                self.start(wait=True)
            except BaseException:
                self.shutdown(graceful=False)
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
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
        environ.update({k: os.environ[k] for k in THREAD_ENV if k in os.environ})
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

    def abort(self) -> None:
        """A stop (SIGTERM/SIGINT): terminate the workers now, mid-row; each row's outputs are
        atomic and its ledger says which stage to redo. The pool starts again on next use."""
        self.shutdown(graceful=False, timeout=5.0)

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

    def _dispatch(
        self,
        queue: deque[tuple[RowContext, int]],
        stages: Sequence[Stage],
        started: Started | None = None,
    ) -> None:
        """Give each idle, ready worker the next row (``started`` hears of it now, so only rows
        really in a worker are marked 'running')."""
        for worker in self._pool:
            if worker.ready and worker.task is None and queue and worker.process.is_alive():
                ctx, attempt = queue.popleft()
                worker.task = (ctx, attempt)
                if started is not None:
                    started([ctx])
                with contextlib.suppress(OSError):  # died just now: its sentinel requeues the row
                    worker.conn.send((uuid.uuid4().hex, ctx, list(stages)))

    def map_rows(self, pending: Rows, stages: Stages, started: Started | None = None) -> Outcomes:
        """Yield each row's outcome as it finishes (any order); ``started`` gets each row as a
        worker takes it."""
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
                self._dispatch(queue, stages, started)
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
                    memory = killed_for_memory(worker.process.exitcode)  # retried, killed again
                    self._replace_dead(worker)
                    if lost is None:
                        continue
                    ctx, attempt = lost
                    log.warning("%s: worker died (%s) on attempt %d", ctx.slide_id, why, attempt)
                    if attempt < self.max_attempts and not memory:
                        queue.append((ctx, attempt + 1))
                    else:
                        finished.append(_lost_row(ctx, attempt, why))
                self._dispatch(queue, stages, started)  # workers stay busy while the driver records
                for outcome in finished:
                    remaining -= 1
                    yield outcome
            graceful = True
        finally:
            if own_pool and self._depth == 0:
                self.shutdown(graceful=graceful)
