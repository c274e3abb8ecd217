"""``--executor dask``: rows run as tasks on an existing Dask distributed cluster."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import base
from .base import (
    ExecutorError,
    Outcomes,
    Rows,
    Stages,
    Started,
    Stateless,
    _configure_process,
    _lost_row,
    _run_row,
    _shippable,
    available_cores,
    threads_per_worker,
)

if TYPE_CHECKING:
    from ..rows import RowContext
    from ..stages.base import Stage
    from ..stages.row import RowOutcome

log = logging.getLogger(__name__)

__all__ = ["DaskExecutor"]


def _dask_run_row(ctx: RowContext, stages: Sequence[Stage]) -> RowOutcome:
    """Task run on a Dask worker: thread limits once per worker process, then the row."""
    if not base._CONFIGURED:
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


class DaskExecutor(Stateless):
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

    def map_rows(self, pending: Rows, stages: Stages, started: Started | None = None) -> Outcomes:
        """Submit every row, then yield outcomes as tasks finish (any order); ``started`` gets
        every row at once, as all are submitted together."""
        if started is not None:
            started(pending)
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

        try:  # on a stop the driver closes this generator: the finally cancels every task
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
                    from ..stages.row import RowOutcome

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
