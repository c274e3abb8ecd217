"""Building, reading and merging the process list (one CSV row per slide).

Building is idempotent: a rerun merges with the list already on disk, so no status, user column
or hand edit is lost, new slides are appended and vanished slides are flagged rather than
dropped. Rendering is deterministic and writes are atomic, so an unchanged list stays
byte-identical and a crash never leaves a half-written CSV.
"""

from __future__ import annotations

import io
import logging
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import name_problem
from ..errors import ProcessListError
from .columns import (
    _TEXT_COLUMNS,
    _is_blank,
    _type_known_columns,
    initialize_columns,
    load_preset,
    normalize_slide_id,
)
from .csvfile import read_csv, render_csv, write_csv_atomic

log = logging.getLogger(__name__)

__all__ = [
    "build_process_list",
    "build_process_list_from",
    "read_process_list",
    "missing_slide_reason",
    "slide_path_for_row",
    "unusable_slide_reason",
]


def _validate_ids(ids: pd.Series, where: list[str], source: str) -> None:
    """Refuse empty, duplicate or path-like ids: each id names an output folder.

    ``where[i]`` says where row ``i`` came from (e.g. 'line 3' or a file path), for messages.
    """
    text = ids.astype(object)
    empty = [i for i, v in enumerate(text) if _is_blank(v, "str")]
    if empty:
        raise ProcessListError(
            f"{source}: {where[empty[0]]}: slide_id is empty; every row needs the slide's "
            "file name (extension optional)"
        )
    where = [_shown(w) for w in where]
    for i, sid in enumerate(text):
        sid = str(sid)
        bad = name_problem(sid)
        if bad == "contains a path separator":
            raise ProcessListError(
                f"{source}: {where[i]}: slide_id {sid!r} contains a path separator; ids name "
                "output folders, so give the bare file name and put its folder in "
                "data_arguments.data_dir"
            )
        if bad:
            raise ProcessListError(
                f"{source}: {where[i]}: slide_id {sid!r} {bad}; ids name output "
                "folders, so rename the slide file or edit the id"
            )
    dup = pd.Series(list(text)).duplicated(keep=False).to_numpy()
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        twins = [i for i in np.flatnonzero(dup) if str(text.iloc[i]) == str(text.iloc[first])]
        raise ProcessListError(
            f"{source}: slide_id {str(text.iloc[first])!r} appears twice ({where[twins[0]]} "
            f"and {where[twins[1]]}); ids must be unique because each names an output folder, "
            "so remove or rename one"
        )


def _shown(text: str) -> str:
    """``text`` as is, or its ``repr`` when it holds a control character (a file name with a
    newline must not break a one-line message)."""
    return repr(text) if any(ord(ch) < 32 or ord(ch) == 127 for ch in text) else text


def _validate_labels(frame: pd.DataFrame, where: list[str], source: str) -> None:
    """Refuse labels that would leave the output folders: a label names a sub-folder of the
    raw and production roots (CLAM's layout), so it is checked like a slide id."""
    if "label" not in frame.columns:
        return
    for i, value in enumerate(frame["label"].astype(object)):
        if _is_blank(value, "str"):
            continue
        text = str(value).strip()
        bad = name_problem(text)
        if bad:
            raise ProcessListError(
                f"{source}: {where[i]}: label {text!r} {bad}; labels name output folders, so "
                "give a plain name (e.g. tumour) in the label column"
            )


def _line_labels(n: int) -> list[str]:
    """CSV line numbers of data rows (header is line 1)."""
    return [f"line {i + 2}" for i in range(n)]


def _read_csv(path: Path, *, what: str, all_text: bool) -> pd.DataFrame:
    """:func:`read_csv` with every cell as text (``all_text``) or only ids and text columns."""
    return read_csv(path, what=what, dtype=str if all_text else dict.fromkeys(_TEXT_COLUMNS, str))


def _read_raw_list(path: Path, *, what: str, slide_ext: str) -> pd.DataFrame:
    """A list as text cells with normalised, validated ids (the merge input)."""
    raw = _read_csv(path, what=what, all_text=True)
    if "slide_id" not in raw.columns:
        raise ProcessListError(
            f"{path}: no 'slide_id' column; the {what} needs one naming each slide file"
        )
    ids = [normalize_slide_id(v, slide_ext) for v in raw["slide_id"]]
    raw["slide_id"] = pd.Series(ids, index=raw.index, dtype="str")
    _validate_ids(raw["slide_id"], _line_labels(len(raw)), str(path))
    _validate_labels(raw, _line_labels(len(raw)), str(path))
    return raw


def read_process_list(path: Path | str) -> pd.DataFrame:
    """Read a process list with its dtypes back.

    ``slide_id`` and the text columns stay strings ("001" stays "001", keep_ids stays "0,3",
    an empty ``error``/``stage`` is ""), managed numbers/booleans get CLAM's dtypes, other
    columns are inferred by pandas ("NA" and "null" stay text; only empty cells are missing).
    """
    path = Path(path)
    return _parse_typed(_read_csv(path, what="process list", all_text=False), str(path))


def _parse_typed(df: pd.DataFrame, source: str) -> pd.DataFrame:
    if "slide_id" not in df.columns:
        raise ProcessListError(f"{source}: no 'slide_id' column; add one naming each slide file")
    df["slide_id"] = df["slide_id"].astype("str")
    _validate_ids(df["slide_id"], _line_labels(len(df)), source)
    _validate_labels(df, _line_labels(len(df)), source)
    return _type_known_columns(df, source)


# slide paths


def _data_args(cfg_or_data_args: Any) -> Any:
    return getattr(cfg_or_data_args, "data_arguments", cfg_or_data_args)


def _key_text(value: object) -> str | None:
    """A data_dir key cell as text (an integral number read as 1.0 becomes '1')."""
    if _is_blank(value, "str"):
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
        number = float(value)
        if number.is_integer():
            return str(int(number))
    return str(value).strip()


def slide_path_for_row(row: Mapping[str, Any] | pd.Series, cfg_or_data_args: Any) -> Path:
    """Where a row's slide file lives (docs/rules/heatmaps.md#slide-paths).

    ``data_dir`` str → ``data_dir/slide_name``; dict → ``data_dir[row[data_dir_key]]/
    slide_name``; ``slide_name`` = ``slide_id + slide_ext`` unless it already ends with it.
    Accepts the whole config or its ``data_arguments``.
    """
    args = _data_args(cfg_or_data_args)
    slide_ext: str = args.slide_ext
    sid = str(row["slide_id"])
    name = sid if sid.endswith(slide_ext) else sid + slide_ext
    data_dir = args.data_dir
    if isinstance(data_dir, Mapping):
        key_col: str = args.data_dir_key or "source"
        key = _key_text(row.get(key_col))
        if key is None:
            raise ProcessListError(
                f"slide_id {sid!r}: column {key_col!r} (data_arguments.data_dir_key) is empty "
                f"or absent; data_dir is a dict, so set it to one of {sorted(map(str, data_dir))}"
            )
        folders = {str(k): v for k, v in data_dir.items()}
        if key not in folders:
            raise ProcessListError(
                f"slide_id {sid!r}: column {key_col!r} = {key!r} is not a data_arguments.data_dir "
                f"key; use one of {sorted(folders)} or add {key!r} to data_dir"
            )
        return Path(folders[key]) / name
    if isinstance(data_dir, list | tuple):
        raise ProcessListError(
            "data_arguments.data_dir is a list; give one folder or a dict of named folders"
        )
    return Path(data_dir) / name


# --------------------------------------------------------------------------------------------
# building


def _list_folder(
    folder: Path, slide_ext: str, label: str, problems: dict[str, str] | None = None
) -> list[Path]:
    """Slide files in ``folder``: names ending with ``slide_ext`` (no dot-files), sorted.

    Dangling links and unreadable entries are left out, their reasons put in ``problems``."""
    if not folder.is_dir():
        raise ProcessListError(
            f"{label}: folder {folder} does not exist; fix the path in the config"
        )
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise ProcessListError(
            f"{label}: cannot list {folder} ({err.strerror or err}); check permissions"
        ) from None
    files = []
    for p in entries:
        if not p.name.endswith(slide_ext) or p.name.startswith("."):
            continue
        problem = unusable_slide_reason(p)
        if problem is None:
            files.append(p)
        elif problem and problems is not None:
            problems[str(p)] = problem
    return sorted(files, key=lambda p: p.name)


def missing_slide_reason(path: Path) -> str:
    """The ``error`` of a row skipped because its slide file is missing or unusable."""
    return unusable_slide_reason(path) or (
        f"slide file not found: {path} (restore it, or set process to 0 for this row)"
    )


def unusable_slide_reason(path: Path) -> str | None:
    """Why a slide entry cannot be used (a dangling symbolic link, an unreadable file), as a
    one-line reason naming it and the fix; None when it is a readable file, "" for a folder."""
    try:
        if not path.exists() and not path.is_symlink():
            return None  # plainly missing: the caller says "not found"
        if path.is_symlink() and not path.exists():
            return (
                f"{path}: symbolic link to {os.readlink(path)}, which does not exist; "
                "restore the target or remove the link"
            )
        if not path.is_file():
            return "" if path.is_dir() else f"{path}: not a regular file; remove it"
        with open(path, "rb"):
            pass
    except OSError as err:
        return f"{path}: cannot be read ({err.strerror or err}); fix its permissions"
    return None


def _enumerate_slides(
    data_dir: Path | str | Mapping[str, Path | str],
    data_dir_key: str,
    slide_ext: str,
    problems: dict[str, str],
) -> pd.DataFrame:
    """``slide_id`` (+ the data_dir_key column for a dict) for every slide file found."""
    if isinstance(data_dir, Mapping):
        ids: list[str] = []
        keys: list[str] = []
        where: list[str] = []
        for key, folder in data_dir.items():
            for p in _list_folder(
                Path(folder), slide_ext, f"data_arguments.data_dir[{key!r}]", problems
            ):
                ids.append(p.name.removesuffix(slide_ext))
                keys.append(str(key))
                where.append(f"{p}")
        frame = pd.DataFrame(
            {"slide_id": pd.Series(ids, dtype="str"), data_dir_key: pd.Series(keys, dtype="str")}
        )
        _validate_ids(frame["slide_id"], where, "data_arguments.data_dir")
        return frame
    if isinstance(data_dir, list | tuple):
        raise ProcessListError(
            "data_arguments.data_dir is a list; give one folder or a dict of named folders"
        )
    files = _list_folder(Path(data_dir), slide_ext, "data_arguments.data_dir", problems)
    frame = pd.DataFrame(
        {"slide_id": pd.Series([p.name.removesuffix(slide_ext) for p in files], dtype="str")}
    )
    _validate_ids(frame["slide_id"], [str(p) for p in files], "data_arguments.data_dir")
    return frame


def _merge(existing: pd.DataFrame | None, base: pd.DataFrame) -> pd.DataFrame:
    """Existing rows first, untouched and in order; then base rows with new ids.

    Columns the base has and the existing list lacks are added, filled per slide from the base.
    """
    if existing is None:
        return base
    merged = existing.copy()
    by_id = base.set_index("slide_id")
    for col in base.columns:
        if col != "slide_id" and col not in merged.columns:
            merged[col] = merged["slide_id"].map(by_id[col])
    new = base[~base["slide_id"].isin(merged["slide_id"])]
    if len(new) == 0:
        return merged
    new = new.reindex(columns=merged.columns)
    for col in merged.columns:  # concat of all-NaN columns must not change existing dtypes
        if new[col].isna().all():
            new[col] = new[col].astype(object)
    parts = [merged.astype(object), new.astype(object)]
    return pd.concat(parts, ignore_index=True)


def build_process_list_from(
    *,
    data_dir: Path | str | Mapping[str, Path | str],
    list_path: Path | str,
    defaults: Mapping[str, object],
    slide_ext: str = ".svs",
    data_dir_key: str = "source",
    source_csv: Path | str | None = None,
    write: bool = True,
) -> tuple[pd.DataFrame, Path]:
    """Build or update the process list at ``list_path`` from plain values.

    Rows come from ``source_csv`` when it is given and exists (CLAM's configured process list;
    needs ``slide_id``), else from listing ``data_dir``. They are merged with the list already
    at ``list_path``: existing rows, their status and every user column or edit are kept, new
    slides are appended with status 'tbp', and ``missing`` is set for rows whose slide file is
    not found (cleared when it returns; status untouched). Managed columns are filled and typed
    by :func:`initialize_columns`. The file is rewritten only when its bytes would change, so a
    rerun on an unchanged folder leaves it byte-identical. Returns the typed frame (as
    :func:`read_process_list` would read it) and the list's path.
    """
    list_path = Path(list_path)
    source = Path(source_csv) if source_csv is not None else None
    problems: dict[str, str] = {}  # path -> why the slide entry is unusable (warned once)
    if source is not None and source.exists():
        base = _read_raw_list(source, what="process list", slide_ext=slide_ext)
        if isinstance(data_dir, Mapping) and data_dir_key not in base.columns:
            raise ProcessListError(
                f"{source}: no {data_dir_key!r} column (data_arguments.data_dir_key); "
                "data_dir is a dict, so each row must name its folder's key"
            )
        same = list_path.exists() and list_path.resolve() == source.resolve()
    else:
        base = _enumerate_slides(data_dir, data_dir_key, slide_ext, problems)
        same = False
    existing = None
    if list_path.exists() and not same:
        existing = _read_raw_list(list_path, what="process list", slide_ext=slide_ext)
    if existing is None and len(base) == 0:
        raise ProcessListError(
            f"{source}: the process list has no rows; add one row per slide"
            if source is not None and source.exists()
            else f"data_arguments.data_dir: no files ending in {slide_ext!r} in {data_dir}; "
            "check data_dir and slide_ext"
        )
    merged = _merge(existing, base)
    table = initialize_columns(merged, defaults, source=str(list_path))
    args = _PlainDataArgs(data_dir=data_dir, data_dir_key=data_dir_key, slide_ext=slide_ext)
    records = table.to_dict("records")
    gone = []
    for record in records:
        path = slide_path_for_row(record, args)
        problem = unusable_slide_reason(path) if path.exists() or path.is_symlink() else None
        if problem:
            problems[str(path)] = problem
        gone.append(not path.exists() or bool(problem))
    table["missing"] = pd.Series(gone, index=table.index, dtype="bool")
    for problem in problems.values():
        log.warning("%s", problem)  # one line each; the CLI shows it as "warning: ..."
    data = render_csv(table)
    if write:
        old = list_path.read_bytes() if list_path.is_file() else None
        if old != data:
            write_csv_atomic(table, list_path)
    typed = pd.read_csv(
        io.BytesIO(data),
        dtype=dict.fromkeys(_TEXT_COLUMNS, str),
        keep_default_na=False,
        na_values=[""],
    )
    return _parse_typed(typed, str(list_path)), list_path


@dataclass(frozen=True)
class _PlainDataArgs:
    """The three data_arguments fields slide_path_for_row needs, from plain values."""

    data_dir: Any
    data_dir_key: str
    slide_ext: str


def build_process_list(cfg: Any, *, write: bool = True) -> tuple[pd.DataFrame, Path]:
    """The ``clam-heat list CONFIG`` library call: build/update ``cfg.process_list_path``.

    Uses ``cfg.data_arguments`` (data_dir, data_dir_key, process_list, preset, slide_ext); see
    :func:`build_process_list_from` for the merge rules.
    """
    args = cfg.data_arguments
    list_path = Path(cfg.process_list_path)
    source = list_path if args.process_list is not None else None
    return build_process_list_from(
        data_dir=args.data_dir,
        list_path=list_path,
        defaults=load_preset(args.preset),
        slide_ext=args.slide_ext,
        data_dir_key=args.data_dir_key or "source",
        source_csv=source,
        write=write,
    )


# --------------------------------------------------------------------------------------------
