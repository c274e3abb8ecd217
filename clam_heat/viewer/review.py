"""Review notes: a verdict and a note per slide, kept in ``<results>/<list>_review.csv``.

Columns ``slide_id, verdict, note, updated_at``. Every save reads the file, changes one row and
writes it back atomically (temp file + rename) under a lock (a thread lock plus an exclusive
``fcntl`` lock on ``<csv>.lock``), so two tabs (or two servers) saving at once both land.
A bad save (unknown slide, unknown verdict, oversized note) raises :class:`ReviewError` and
changes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import OutputError

__all__ = ["MAX_NOTE", "VERDICTS", "ReviewError", "ReviewNotes", "review_path"]

VERDICTS = ("", "agree", "disagree", "artifact", "unsure")
#: Longest note kept (characters).
MAX_NOTE = 4000
COLUMNS = ("slide_id", "verdict", "note", "updated_at")


class ReviewError(OutputError):
    """A review save that is refused (the page shows the message; the file is unchanged)."""


def review_path(results_csv: Path, process_list: Path) -> Path:
    """``<results dir>/<process list stem>_review.csv``."""
    return Path(results_csv).parent / f"{Path(process_list).stem}_review.csv"


class ReviewNotes:
    """The notes of one run, read and written through one file."""

    def __init__(self, path: Path, slide_ids: set[str]) -> None:
        self.path, self.slide_ids = Path(path), slide_ids
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> dict[str, dict[str, str]]:
        """slide_id -> {verdict, note, updated_at} (empty when there is no file yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise OutputError(
                f"{self.path}: cannot read the review notes ({err.strerror})"
            ) from None
        rows = {}
        for row in csv.DictReader(io.StringIO(text)):
            sid = row.get("slide_id")
            if sid:
                rows[sid] = {k: row.get(k) or "" for k in COLUMNS[1:]}
        return rows

    def save(self, slide_id: str, verdict: str, note: str) -> dict[str, str]:
        """Set one slide's verdict and note; returns the saved row."""
        if slide_id not in self.slide_ids:
            raise ReviewError(f"no slide {slide_id!r} in this run's process list")
        if verdict not in VERDICTS:
            raise ReviewError(f"verdict {verdict!r}: use one of {', '.join(VERDICTS[1:])}")
        if len(note) > MAX_NOTE:
            raise ReviewError(f"note of {len(note)} characters: at most {MAX_NOTE}")
        with self._locked():
            rows = self.read()
            saved = {
                "verdict": verdict,
                "note": note,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            rows[slide_id] = saved
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(COLUMNS)
            for sid in sorted(rows):
                r = rows[sid]
                writer.writerow([sid, r["verdict"], r["note"], r["updated_at"]])
            write_text_atomic(self.path, out.getvalue())
        return saved
