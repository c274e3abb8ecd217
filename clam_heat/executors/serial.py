"""Rows one after another in the driver process (the default with one worker)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Outcomes, Rows, Stages, Started, Stateless, _run_row

if TYPE_CHECKING:
    pass

__all__ = ["SerialExecutor"]


class SerialExecutor(Stateless):
    """Rows one after another in this process; each is marked started just before it runs."""

    def map_rows(self, pending: Rows, stages: Stages, started: Started | None = None) -> Outcomes:
        for ctx in pending:
            if started is not None:
                started([ctx])
            yield _run_row(ctx, stages)
