"""One way to write a file: a unique temp file in the same folder, fsync, then ``os.replace``.

Readers therefore see either the old complete file or the new complete one, never a partial
write; a failure removes the temp file and raises :class:`~clam_heat.errors.OutputError` naming
the target. Temp names are hidden and contain ``.tmp`` (the runner sweeps leftovers of a killed
run) and keep the target's extension.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}"
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise OutputError(
            f"{target}: cannot write ({err.strerror or err}); check that the folder is writable"
        ) from None
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
