"""The stages of a row (segment -> infer -> overlap -> heatmap -> sample) as plug-ins.

:mod:`.base` says what a stage is, :mod:`.registry` holds the ordered table, :mod:`.row` runs
one row through it under the ledger protocol, :mod:`.resources` caches what stages share, and
each stage lives in its own module.
"""

from __future__ import annotations

from .base import Stage, StageRun, base_fingerprint
from .registry import get, names, register, registered, stages, stages_for, unregister
from .row import RowOutcome, plan_row, process_row

__all__ = [
    "RowOutcome",
    "Stage",
    "StageRun",
    "base_fingerprint",
    "get",
    "names",
    "plan_row",
    "process_row",
    "register",
    "registered",
    "stages",
    "stages_for",
    "unregister",
]
