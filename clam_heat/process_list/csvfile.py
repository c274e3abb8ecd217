"""Reading and writing the list's CSV files: one reader with clear errors, one atomic writer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import commit, temp_path_for
from ..errors import OutputError, ProcessListError, csv_read_error

__all__ = ["read_csv", "render_csv", "write_csv_atomic"]


def read_csv(path: Path, *, what: str, dtype: Any) -> pd.DataFrame:
    """Read a CSV (UTF-8, optional BOM, CRLF ok); only empty cells count as missing.

    ``dtype=str`` keeps every cell as text, so user columns round-trip exactly when rewritten;
    a dict forces only those columns to text and pandas infers the rest.
    """
    try:
        return pd.read_csv(
            path, dtype=dtype, keep_default_na=False, na_values=[""], encoding="utf-8-sig"
        )
    except pd.errors.EmptyDataError:
        raise ProcessListError(f"{path}: {what} file is empty; it needs a header row") from None
    except (OSError, ValueError) as err:  # pandas' ParserError and UnicodeDecodeError included
        raise csv_read_error(path, what, err) from None


def render_csv(df: pd.DataFrame) -> bytes:
    """The CSV bytes we write: UTF-8, LF, no index; deterministic for equal frames."""
    return df.to_csv(index=False, lineterminator="\n").encode("utf-8")


def _cause(err: OutputError) -> object:
    """The OS error's own words behind an :mod:`clam_heat.atomic` failure (for our message)."""
    cause = err.__context__
    return (cause.strerror or cause) if isinstance(cause, OSError) else err


def write_csv_atomic(df: pd.DataFrame, path: Path | str) -> Path:
    """Write ``df`` as CSV through :mod:`clam_heat.atomic` (temp file beside it, then rename).

    Readers see the old file or the new one, never a half-written one, and the temp file is
    removed whatever fails. The folder is created; an existing file's permissions are kept.
    """
    path = Path(path)
    data = render_csv(df)
    try:
        tmp = temp_path_for(path)
    except OutputError as err:
        raise OutputError(
            f"{path}: cannot create the file's folder or a temp file in it "
            f"({_cause(err)}); check the folder is writable"
        ) from None
    try:
        tmp.write_bytes(data)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(_write_failed(path, err.strerror or err)) from None
        raise
    try:
        commit(tmp, path, durable=True)  # removes the temp file when the rename fails
    except OutputError as err:
        raise OutputError(_write_failed(path, _cause(err))) from None
    return path


def _write_failed(path: Path, why: object) -> str:
    return f"{path}: cannot write the CSV ({why}); check the folder is writable and has free space"
