"""Where process-list rows run: in this process, in a local process pool, or on a Dask cluster.

:mod:`.base` holds the :class:`Executor` protocol (a context manager with ``map_rows``) and the
worker side of a row; :mod:`.serial`, :mod:`.local` (fork-server pool) and :mod:`.dask` are the
three executors. A new executor is one more module with a class that follows the protocol.
Executors import the stages (:mod:`clam_heat.stages.row`), never the runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from .base import Executor, ExecutorError, available_cores, pin_device, threads_per_worker
from .dask import DaskExecutor, _import_distributed
from .local import LocalExecutor
from .serial import SerialExecutor

__all__ = [
    "DaskExecutor",
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "SerialExecutor",
    "available_cores",
    "make_executor",
    "pin_device",
    "threads_per_worker",
]


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
