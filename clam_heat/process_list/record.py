"""The one writer's recorder: row outcomes into the process list and the results CSV.

The driver of a run is the only writer of its list and results CSV (or of its own shard files);
workers only return outcomes. :class:`Recorder` is the one place where a row's status, stage,
error and result columns are set and both CSVs are written, each write atomic, so a kill at any
point leaves the old complete CSV or the new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from ..errors import ProcessListError
from ..ledger import now_iso
from .columns import _SPECS, STATUSES, result_columns
from .csvfile import write_csv_atomic

__all__ = ["Outcome", "Recorder", "update_row"]


def update_row(df: pd.DataFrame, slide_id: str, **fields: Any) -> pd.DataFrame:
    """A copy of ``df`` with one row's fields set (``status='done', stage='heatmap'`` ...).

    ``status`` must be one of :data:`STATUSES`; ``error`` is collapsed to one line;
    ``updated_at`` is set to now (UTC, ISO 8601) unless given. Unknown fields become new
    columns (e.g. ``bag_size``). Unknown slide ids raise ProcessListError.
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
        spec = _SPECS.get(name)
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


def _set_row(df: pd.DataFrame, slide_id: str, values: dict[str, Any]) -> pd.DataFrame:
    """:func:`update_row`, with integer result columns kept as nullable ints so a count is
    written as 59 (not 59.0) next to empty cells."""
    for key, value in values.items():
        if key in df.columns and isinstance(value, int) and not isinstance(value, bool):
            df[key] = pd.to_numeric(df[key], errors="coerce").astype("Int64")
    return update_row(df, slide_id, **values)


class Outcome(Protocol):
    """What the recorder reads from a row's outcome (:class:`~clam_heat.stages.row.RowOutcome`)."""

    slide_id: str
    status: str
    stage: str
    error: str
    result: dict[str, Any]


class Recorder:
    """Records row outcomes into the process list ``df`` and writes both CSVs.

    ``list_path`` receives the whole list after every change; ``results_csv`` the rows with
    ``process == 1`` after every outcome (CLAM's results file). Use as a context manager or call
    :meth:`close` when the run ends.
    """

    def __init__(
        self, df: pd.DataFrame, list_path: Path, results_csv: Path, *, n_classes: int
    ) -> None:
        self.frame = df
        self.list_path = Path(list_path)
        self.results_csv = Path(results_csv)
        self.n_classes = n_classes

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def skipped(self, errors: Mapping[str, str]) -> None:
        """Mark rows 'skipped' with why (a vanished slide file); one list write."""
        for slide_id, error in errors.items():
            self._set(slide_id, {"status": "skipped", "error": error, "updated_at": now_iso()})
        if errors:
            write_csv_atomic(self.frame, self.list_path)

    def start(self, slide_ids: Iterable[str]) -> None:
        """Mark rows 'running' as they are handed out; one list write."""
        for slide_id in slide_ids:
            self._set(slide_id, {"status": "running", "updated_at": now_iso()})
        write_csv_atomic(self.frame, self.list_path)

    def record(self, outcome: Outcome) -> None:
        """A finished row: status, last stage, error and result columns; both CSVs written."""
        values: dict[str, Any] = {
            "status": outcome.status,
            "stage": outcome.stage,
            "error": outcome.error,
            "updated_at": now_iso(),
        }
        values.update(result_columns(outcome.result, self.n_classes))
        self._set(outcome.slide_id, values)
        write_csv_atomic(self.frame, self.list_path)
        df = self.frame
        processed = df[pd.to_numeric(df["process"], errors="coerce") == 1].reset_index(drop=True)
        write_csv_atomic(processed, self.results_csv)

    def close(self) -> None:
        """End of the run: every write is already on disk; nothing is held."""

    def _set(self, slide_id: str, values: dict[str, Any]) -> None:
        self.frame = _set_row(self.frame, slide_id, values)
