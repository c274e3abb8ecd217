"""The run journal: an append-only, fsync'd JSON-lines record of row outcomes.

Why JSON lines and not SQLite: the journal is written by one process (the driver holds the
list's lock), read back only at start-up, and must survive ``kill -9`` at any byte. A line is
appended with one ``write`` + ``fsync`` (constant cost whatever the list's size), a torn last
line is recognisable and dropped on replay, and a user can read the file with ``tail``.

The journal lives beside the process list (``.<list>.journal.jsonl``). The CSVs are
materialised from it every ``runner_arguments.flush_seconds`` and at the end
(:class:`~clam_heat.process_list.record.Recorder`); after a crash the next start replays it
into the CSVs (:func:`~clam_heat.process_list.record.replay_journal`), so no finished row is
lost. It is emptied once its entries are in both CSVs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import OutputError, os_error_advice

__all__ = ["RowJournal", "journal_path"]

log = logging.getLogger(__name__)


def journal_path(list_path: str | os.PathLike[str]) -> Path:
    """Where the journal of ``list_path`` lives (hidden, beside it; not a temp-file name, so
    the start-up sweep never removes it).

    >>> journal_path("lists/cohort.csv").as_posix()
    'lists/.cohort.csv.journal.jsonl'
    """
    path = Path(list_path)
    return path.with_name(f".{path.name}.journal.jsonl")


class RowJournal:
    """Append row entries (``{"slide_id": ..., <column>: <value>, ...}``) durably.

    Use as a context manager; :meth:`append` costs one small write and (by default) one fsync.
    """

    def __init__(self, list_path: str | os.PathLike[str]) -> None:
        self.path = journal_path(list_path)
        self._fd: int | None = None

    def __enter__(self) -> RowJournal:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputError(
                f"{self.path}: cannot open the run journal; {os_error_advice(self.path, err)}"
            ) from None

    def append(self, values: Mapping[str, Any], *, sync: bool = True) -> None:
        """Write one entry as a line; with ``sync`` fsync it (a crash after this loses nothing)."""
        self.append_many([values], sync=sync)

    def append_many(self, entries: Iterable[Mapping[str, Any]], *, sync: bool = True) -> None:
        """Write several entries with one write (and at most one fsync)."""
        data = "".join(
            json.dumps(dict(e), default=str, separators=(",", ":")) + "\n" for e in entries
        ).encode("utf-8")
        if not data:
            return
        if self._fd is None:
            self.open()
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:  # a regular file takes it all at once; loop anyway for short writes
                view = view[os.write(self._fd, view) :]
            if sync:
                os.fsync(self._fd)
        except OSError as err:
            raise OutputError(
                f"{self.path}: cannot append to the run journal; {os_error_advice(self.path, err)}"
            ) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def replay(self) -> Iterator[dict[str, Any]]:
        """Every complete entry, oldest first; a torn line (kill -9 mid-write) is dropped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                log.warning("%s:%d: dropped a torn journal line", self.path, number)
                continue
            if isinstance(entry, dict) and "slide_id" in entry:
                yield entry

    def latest(self) -> dict[str, dict[str, Any]]:
        """Each slide id's entries folded oldest to newest (what the CSVs must show)."""
        out: dict[str, dict[str, Any]] = {}
        for entry in self.replay():
            out.setdefault(str(entry["slide_id"]), {}).update(entry)
        return out

    def truncate(self) -> None:
        """Forget every entry (call only once they are in both CSVs)."""
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
            elif self.path.exists():
                self.path.unlink()
        except OSError as err:
            log.warning("%s: could not clear the journal (%s)", self.path, err)
