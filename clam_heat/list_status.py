"""What ``clam-heat status`` reports, read with the standard library alone.

Counting statuses needs no dtypes, presets or merging, so this reads the process-list CSV with
:mod:`csv` instead of :mod:`clam_heat.process_list` (pandas): on a 10,000-row list the pandas
import alone cost more than the whole answer. The file is read as the list reader reads it
(UTF-8 with an optional BOM, blank lines skipped, an empty status cell counted as ``tbp``).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import ProcessListError, csv_read_error

__all__ = ["STATUSES", "ListStatus", "read_status"]

#: The row statuses a run writes, in the order ``status`` prints them (the process list's).
STATUSES: tuple[str, ...] = ("tbp", "running", "done", "failed", "skipped")


@dataclass(frozen=True)
class ListStatus:
    """Rows per status and the failed rows of one process list."""

    rows: int
    #: The five known statuses (zeros included), then any others, sorted.
    counts: dict[str, int]
    #: (slide_id, error) of each failed row, in file order.
    failed: list[tuple[str, str]]


def read_status(path: str | Path) -> ListStatus:
    """Count the statuses of the process list at ``path``.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     csv_path = Path(tmp, "list.csv")
    ...     _ = csv_path.write_text("slide_id,status,error\\na,done,\\nb,failed,no tissue\\nc,,\\n")
    ...     read_status(csv_path)
    ListStatus(rows=3, counts={'tbp': 1, 'running': 0, 'done': 1, 'failed': 1, 'skipped': 0}, failed=[('b', 'no tissue')])
    """  # noqa: E501 - a doctest's output is one line
    path = Path(path)
    what = "process list"
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ProcessListError(f"{path}: {what} file is empty; it needs a header row")
            if "slide_id" not in header:
                raise ProcessListError(
                    f"{path}: no 'slide_id' column; add one naming each slide file"
                )
            id_at = header.index("slide_id")
            status_at = header.index("status") if "status" in header else None
            error_at = header.index("error") if "error" in header else None
            counts: Counter[str] = Counter()
            failed: list[tuple[str, str]] = []
            rows = 0
            for cells in reader:
                if not cells:  # a blank line is not a row
                    continue
                rows += 1
                status = _cell(cells, status_at) or "tbp"
                counts[status] += 1
                if status == "failed":
                    failed.append((_cell(cells, id_at), _cell(cells, error_at)))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise csv_read_error(path, what, err) from None
    ordered = {status: counts.get(status, 0) for status in STATUSES}
    ordered.update({other: counts[other] for other in sorted(set(counts) - set(STATUSES))})
    return ListStatus(rows, ordered, failed)


def _cell(cells: list[str], at: int | None) -> str:
    """The cell at column ``at`` ("" for a missing column or a short row)."""
    return cells[at] if at is not None and at < len(cells) else ""
