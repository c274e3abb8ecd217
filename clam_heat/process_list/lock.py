"""One run per process list: an advisory ``fcntl`` lock beside the list.

The kernel releases an ``flock`` when its holder dies (even by ``kill -9``), so a dead holder's
lock is taken over by simply locking again; the holder's pid, host and start time are written
into the lock file so a refused run can say who holds it.

A ``--shard i/n`` run holds its shard list exclusively and the whole list *shared*: shard runs
go side by side, while a whole-list run (or ``merge``), whose start-up sweep would touch the
shards' live temp files, waits for them and they for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from ..errors import ClamHeatError, OutputError, os_error_advice

__all__ = ["ListLockedError", "list_lock", "lock_path"]


class ListLockedError(ClamHeatError):
    """Another live run holds the process list."""

    exit_code = 2


def lock_path(list_path: str | os.PathLike[str]) -> Path:
    """The lock file of ``list_path``.

    >>> lock_path("lists/cohort.csv").as_posix()
    'lists/.cohort.csv.lock'
    """
    path = Path(list_path)
    return path.with_name(f".{path.name}.lock")


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:  # shared holders write nothing
        return "another clam-heat run (a --shard run?)"
    since = str(info.get("since", ""))
    with contextlib.suppress(ValueError):
        since = datetime.fromisoformat(since).strftime("%H:%M")
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {since}"


@contextlib.contextmanager
def list_lock(list_path: str | os.PathLike[str], *, shared: bool = False) -> Iterator[Path]:
    """Hold the lock of ``list_path`` for the block, or raise :class:`ListLockedError` at once.

    ``shared`` (the whole list under a ``--shard`` run) may be held by several runs at once, but
    never together with an exclusive holder.
    """
    import fcntl

    target = Path(list_path)
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OutputError(
            f"{path}: cannot create the lock file; {os_error_advice(path, err)}"
        ) from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ListLockedError(
                f"{target}: is being run by {_holder_text(path)}; stop it or wait"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a dead exclusive holder's details are stale now
            if not shared:
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.now().astimezone().isoformat(timespec="seconds"),
                }
                os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        try:
            yield path
        finally:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
