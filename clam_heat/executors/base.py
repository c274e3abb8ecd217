"""What every executor shares: the :class:`Executor` protocol and the worker side of a row.

One-writer contract (why outputs are the same whatever the executor):

* The **driver** (:func:`clam_heat.runner.run_pipeline`) is the only writer of the process-list
  CSV and the results CSV (:class:`~clam_heat.process_list.Recorder`). An executor only
  *returns* :class:`~clam_heat.stages.row.RowOutcome` objects; the driver records them as they
  arrive.
* A **worker** runs one row at a time with :func:`~clam_heat.stages.row.process_row`, and so
  writes only that slide's JSON ledger and that slide's outputs, each through
  :mod:`clam_heat.atomic`. No two workers ever hold the same row, so every file has one writer.
* A worker that dies mid-row leaves the ledger's stage marked *started* and no half-written
  output; the executor reruns the row once more (``max_attempts``) and then reports it failed with
  the reason, so a run always finishes every row.
* The driver resolves the stages once (:func:`~clam_heat.stages.registry.stages_for`) and ships
  the stage objects with each row, so a worker runs exactly the stages the driver planned.

Nothing heavy is imported at module level: a spawned worker sets its thread limits before numpy,
torch or OpenCV load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ClamHeatError

if TYPE_CHECKING:
    from ..rows import RowContext
    from ..stages.base import Stage
    from ..stages.row import RowOutcome

log = logging.getLogger(__name__)

__all__ = [
    "THREAD_ENV",
    "Executor",
    "ExecutorError",
    "Outcomes",
    "Rows",
    "Stages",
    "Started",
    "available_cores",
    "pin_device",
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

#: Called with the rows an executor hands out, when it hands them out (the recorder marks them
#: 'running').
Started = Callable[[Sequence["RowContext"]], None]
#: The shapes of ``map_rows``' arguments and result, shared by every executor.
Rows = list["RowContext"]
Stages = Sequence["Stage"]
Outcomes = Iterator["RowOutcome"]


class ExecutorError(ClamHeatError):
    """An executor cannot run at all (missing optional package, unreachable scheduler, ...)."""


class Executor(Protocol):
    """What :func:`~clam_heat.runner.run_pipeline` needs from an executor.

    A context manager (the runner holds it for one run: a pool starts on entry and stops on
    exit; re-entering an executor that is already open does nothing) whose :meth:`map_rows`
    yields each row's outcome as it finishes, in any order, calling ``started`` with the rows
    as it hands them out.
    """

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...

    def map_rows(self, pending: Rows, stages: Stages, started: Started | None = None) -> Outcomes:
        """Each row's outcome as it finishes; ``started`` hears which rows were handed out."""
        ...


class Stateless:
    """Base of executors that hold nothing between runs (entering and leaving do nothing)."""

    def __enter__(self) -> Stateless:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


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


def _preload() -> None:
    """Import the stage modules now, so "ready" means ready and the first row is not slower."""
    import importlib

    from ..stages.registry import preload_modules

    for name in preload_modules():
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _thread_settings() -> dict[str, Any]:
    """What this process really runs with (the driver shows it; tests check it)."""
    import torch

    from ..threads import helper_threads

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


def _run_row(ctx: RowContext, stages: Sequence[Stage], device: str | None = None) -> RowOutcome:
    """One row in this process; a failed outcome, never an exception, whatever goes wrong."""
    from ..stages.row import RowOutcome, process_row

    ctx = _with_device(ctx, device)
    try:
        return process_row(ctx, stages)
    except Exception as err:  # noqa: BLE001 - process_row itself should not raise
        log.exception("%s: unexpected error outside the stages", ctx.slide_id)
        return RowOutcome(ctx.slide_id, "failed", error=f"{type(err).__name__}: {err}")


def _shippable(ctx: RowContext) -> RowContext:
    """A copy safe to pickle to another process (no open slide handle)."""
    return replace(ctx, _slide=None)


def killed_for_memory(exitcode: int | None) -> bool:
    """Whether a worker's death looks like the kernel's out-of-memory killer (SIGKILL): such a
    row is not retried blindly, since the retry would be killed again (and double the load).

    >>> killed_for_memory(-9), killed_for_memory(86), killed_for_memory(None)
    (True, False, False)
    """
    return exitcode == -signal.SIGKILL


def _lost_row(ctx: RowContext, attempts: int, why: str) -> RowOutcome:
    """The failed outcome of a row whose worker died on every attempt (or once, killed for
    memory); names the stage it was in."""
    from ..ledger import Ledger
    from ..stages.registry import names
    from ..stages.row import RowOutcome

    ledger = Ledger.load(ctx.ledger_path)  # read only: the worker was its writer
    done = [s for s in names() if (ledger.record(s) or {}).get("state") == "done"]
    running = [s for s in names() if (ledger.record(s) or {}).get("state") == "started"]
    where = f" in stage {running[0]}" if running else ""
    times = "once" if attempts == 1 else f"{attempts} times"
    if why == "killed by SIGKILL":
        error = (
            f"slide {ctx.slide_path}: worker process killed for memory{where} (SIGKILL, the "
            "kernel's out-of-memory killer; not retried); lower runner_arguments.max_patches "
            "or --workers, or give each worker more memory, then rerun with --retry-failed"
        )
    else:
        error = (
            f"slide {ctx.slide_path}: worker process died{where} {times} ({why}); often out of "
            "memory: check the worker's memory limit and log, then rerun with --retry-failed"
        )
    return RowOutcome(ctx.slide_id, "failed", stage=done[-1] if done else "", error=error)
