"""Every demo file is written through :mod:`clam_heat.atomic`: readers only see complete files,
and a killed run leaves temp names that the runner's sweep recognises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..atomic import atomic_path
from ..errors import OutputError


@contextlib.contextmanager
def output_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that needs a file name (tifffile, h5py);
    moved into place when the block ends, removed if it raises.

    The folder is created first, with a one-line :class:`OutputError` naming it when it cannot be.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"{path.parent}: cannot create folder ({err.strerror or err}); check permissions"
        ) from None
    with atomic_path(path) as tmp:
        yield tmp


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (folder errors as in :func:`output_path`)."""
    with output_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
