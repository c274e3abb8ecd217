"""Rows one after another in the driver process (the default with one worker)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .base import Started, Stateless, _run_row

if TYPE_CHECKING:
    from ..rows import RowContext
    from ..stages.base import Stage
    from ..stages.row import RowOutcome

__all__ = ["SerialExecutor"]


class SerialExecutor(Stateless):
    """Rows one after another in this process; each is marked started just before it runs."""

    def map_rows(
        self,
        pending: list[RowContext],
        stages: Sequence[Stage],
        started: Started | None = None,
    ) -> Iterator[RowOutcome]:
        for ctx in pending:
            if started is not None:
                started([ctx])
            yield _run_row(ctx, stages)
