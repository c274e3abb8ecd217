"""The one writer's recorder: row outcomes into a journal, then into the user's CSVs.

The driver of a run is the only writer of its list and results CSV (or of its own shard files;
it holds the list's lock, :mod:`.lock`); workers only return outcomes. :class:`Recorder` is the
one place where a row's status, stage, error and result columns are set.

Why a journal: rewriting a 10,000-row CSV after every row made the driver's cost grow with the
square of the list. Each outcome is now one fsync'd line in :class:`~.journal.RowJournal`
(constant cost), and the CSVs are *materialised* from it at most every ``flush_seconds`` and at
the end or stop: the CSV on disk is read as text, our run columns of the rows we recorded are
merged into it, and it is written back atomically. So the file stays the user's: a column or a
``process`` value edited during the run survives, untouched cells keep their exact text, and a
kill at any point leaves the old complete CSV or the new one, plus the journal that the next
start replays (:func:`replay_journal`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..errors import ProcessListError
from ..ledger import now_iso
from .columns import COLUMN_SPECS, STATUSES
from .csvfile import read_csv, write_csv_atomic
from .journal import RowJournal
from .results import result_columns

__all__ = ["Outcome", "Recorder", "materialise", "replay_journal", "update_row"]

log = logging.getLogger(__name__)

#: Journal keys that are bookkeeping, never CSV columns (``_prev``: status before 'running').
_PRIVATE = "_"


def update_row(df: pd.DataFrame, slide_id: str, **fields: Any) -> pd.DataFrame:
    """A copy of ``df`` with one row's fields set (``status='done', stage='heatmap'`` ...).

    ``status`` must be one of :data:`STATUSES`; ``error`` is collapsed to one line;
    ``updated_at`` is set to now (UTC, ISO 8601) unless given. Unknown fields become new
    columns (e.g. ``bag_size``). Unknown slide ids raise ProcessListError. (A library helper
    for small lists; the run itself records through :class:`Recorder`.)
    """
    mask = (df["slide_id"].astype(str) == str(slide_id)).to_numpy()
    if not mask.any():
        raise ProcessListError(f"slide_id {slide_id!r} is not in the process list")
    status = fields.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    if "error" in fields and fields["error"] is not None:
        fields["error"] = " ".join(str(fields["error"]).split())
    fields.setdefault("updated_at", now_iso())
    out = df.copy()
    for name, value in fields.items():
        spec = COLUMN_SPECS.get(name)
        if spec is not None and spec.dtype == "str":
            value = "" if value is None else str(value)
        elif spec is not None and spec.kind == "bool":
            value = bool(value)
        if name not in out.columns:
            out[name] = pd.Series([None] * len(out), index=out.index, dtype=object)
        try:
            out.loc[mask, name] = value
        except (TypeError, ValueError):  # pandas 3 refuses values foreign to a column's dtype
            out[name] = out[name].astype(object)
            out.loc[mask, name] = value
    return out


def _cell(value: Any) -> str:
    """A run value as the CSV text pandas would write for it (59, 0.25, True, empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return "True" if value else "False"
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)


def materialise(
    list_path: Path, results_csv: Path | None, updates: Mapping[str, Mapping[str, Any]]
) -> int:
    """Merge ``updates`` (slide id -> run columns) into the CSV at ``list_path`` as it is on disk
    now, write it back atomically, and rewrite ``results_csv`` as its ``process == 1`` rows.

    Every cell is handled as text, so user columns and edits round-trip exactly. Slide ids no
    longer in the file (the user removed the row) are skipped. Returns the rows updated.
    """
    frame = read_csv(list_path, what="process list", dtype=str).fillna("")
    if "slide_id" not in frame.columns:
        raise ProcessListError(f"{list_path}: no slide_id column; not a process list")
    position = {sid: k for k, sid in enumerate(frame["slide_id"])}
    rows = {sid: values for sid, values in updates.items() if sid in position}
    if len(rows) < len(updates):
        gone = sorted(set(updates) - set(rows))
        log.warning("%s: rows removed during the run, not recorded: %s", list_path, gone[:5])
    columns: dict[str, None] = {}
    for values in rows.values():
        columns.update(dict.fromkeys(k for k in values if not k.startswith(_PRIVATE)))
    columns.pop("slide_id", None)
    for column in columns:
        cells = (
            frame[column].to_numpy(dtype=object, copy=True)
            if column in frame.columns
            else np.full(len(frame), "", dtype=object)
        )
        for sid, values in rows.items():
            if column in values:
                cells[position[sid]] = _cell(values[column])
        frame[column] = cells
    write_csv_atomic(frame, list_path)
    if results_csv is not None:
        if "process" in frame.columns:
            keep = (pd.to_numeric(frame["process"], errors="coerce") == 1).to_numpy()
            frame = frame[keep].reset_index(drop=True)
        write_csv_atomic(frame, results_csv)
    return len(rows)


def _csv_values(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A journal entry's CSV columns; a row left 'running' by a dead run goes back to what it
    was before (its ``_prev``), or 'tbp'."""
    values = {k: v for k, v in entry.items() if k != "slide_id" and not k.startswith(_PRIVATE)}
    if values.get("status") == "running":
        prev = str(entry.get("_prev") or "tbp")
        values["status"] = "tbp" if prev == "running" else prev
    return values


def replay_journal(list_path: Path, results_csv: Path | None) -> int:
    """Fold a killed run's journal into the CSVs, then empty it; returns the rows replayed.

    Call before the list is read for planning, holding the list's lock.
    """
    journal = RowJournal(list_path)
    latest = journal.latest()
    if latest and Path(list_path).is_file():
        materialise(Path(list_path), results_csv, {k: _csv_values(v) for k, v in latest.items()})
        log.info("%s: replayed %d rows from the run journal", list_path, len(latest))
    journal.truncate()
    return len(latest)


class Outcome(Protocol):
    """What the recorder reads from a row's outcome (:class:`~clam_heat.stages.row.RowOutcome`)."""

    slide_id: str
    status: str
    stage: str
    error: str
    result: dict[str, Any]


class Recorder:
    """Records row outcomes for the process list at ``list_path`` and ``results_csv``.

    ``df`` is the list as planned (its ``status`` column says what a row returns to when a stop
    takes it back). Outcomes are journaled at once (one fsync each); both CSVs are written at
    most every ``flush_seconds`` (0: after every outcome) and on :meth:`flush` / :meth:`close`.
    Use as a context manager (closing flushes).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        list_path: Path,
        results_csv: Path,
        *,
        n_classes: int,
        flush_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.list_path = Path(list_path)
        self.results_csv = Path(results_csv)
        self.n_classes = n_classes
        self.flush_seconds = flush_seconds
        self.journal = RowJournal(self.list_path)
        self._clock = clock
        self._status = dict(zip(df["slide_id"].astype(str), df["status"].astype(str), strict=True))
        self._dirty: dict[str, dict[str, Any]] = {}  # recorded, not yet in the CSVs
        self._in_flight: dict[str, str] = {}  # handed out -> status before 'running'
        self._last_flush = clock()
        self.flushes = 0

    def __enter__(self) -> Recorder:
        self.journal.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> list[str]:
        """Rows handed out and not yet recorded."""
        return list(self._in_flight)

    def _note(self, slide_id: str, values: dict[str, Any]) -> None:
        status = values.get("status")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        self._dirty.setdefault(slide_id, {}).update(values)

    def skipped(self, errors: Mapping[str, str]) -> None:
        """Mark rows 'skipped' with why (a vanished slide file)."""
        entries = []
        for slide_id, error in errors.items():
            values = {
                "status": "skipped",
                "error": " ".join(error.split()),
                "updated_at": now_iso(),
            }
            entries.append({"slide_id": slide_id, **values})
            self._note(slide_id, values)
            self._status[slide_id] = "skipped"
        self.journal.append_many(entries)

    def start(self, slide_ids: Iterable[str]) -> None:
        """Mark rows 'running' as they are handed out: journal lines without fsync (losing one
        in a crash only leaves the row's old status, which is what a dead run's row gets)."""
        entries = []
        stamp = now_iso()
        for slide_id in slide_ids:
            prev = self._status.get(slide_id, "tbp")
            prev = "tbp" if prev == "running" else prev
            self._in_flight[slide_id] = prev
            entries.append({"slide_id": slide_id, "status": "running", "updated_at": stamp})
            self._note(slide_id, {"status": "running", "updated_at": stamp})
        running = [{**e, "_prev": self._in_flight[e["slide_id"]]} for e in entries]
        self.journal.append_many(running, sync=False)

    def record(self, outcome: Outcome) -> None:
        """A finished row: status, last stage, error and result columns, journaled durably."""
        values: dict[str, Any] = {
            "status": outcome.status,
            "stage": outcome.stage,
            "error": " ".join(str(outcome.error or "").split()),
            "updated_at": now_iso(),
        }
        values.update(result_columns(outcome.result, self.n_classes))
        self.journal.append({"slide_id": outcome.slide_id, **values})
        self._note(outcome.slide_id, values)
        self._in_flight.pop(outcome.slide_id, None)
        self._status[outcome.slide_id] = outcome.status
        if self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def release(self) -> int:
        """A stop: every row handed out and not finished goes back to its old status
        (never left 'running'); returns how many."""
        stamp = now_iso()
        entries = []
        for slide_id, prev in self._in_flight.items():
            entries.append({"slide_id": slide_id, "status": prev, "updated_at": stamp})
            self._note(slide_id, {"status": prev, "updated_at": stamp})
        self.journal.append_many(entries)
        count = len(self._in_flight)
        self._in_flight.clear()
        return count

    def flush(self) -> None:
        """Materialise both CSVs from what was recorded since the last flush, then restart the
        journal with only the rows still in flight."""
        self._last_flush = self._clock()
        if not self._dirty:
            return
        materialise(self.list_path, self.results_csv, self._dirty)
        self._dirty = {}
        self.flushes += 1
        self.journal.truncate()
        stamp = now_iso()
        self.journal.append_many(
            {"slide_id": s, "status": "running", "updated_at": stamp, "_prev": p}
            for s, p in self._in_flight.items()
        )

    def close(self) -> None:
        """End of the run (or stop): write both CSVs and close the journal (left empty)."""
        try:
            self.flush()
        finally:
            self.journal.close()
        if not self._in_flight:
            self.journal.truncate()  # removes the empty file
