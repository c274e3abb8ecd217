"""The process list: one CSV row per slide, CLAM's columns plus our status columns.

CLAM's ``create_heatmaps.py`` builds this table from a folder listing or a user CSV, fills the
segmentation/filter/vis/patch defaults from a preset (spec §2.1-2.2) and lets any row override
them (§2.3). clam-heat keeps that file format, so a CLAM list works here and ours works in CLAM,
and adds the bookkeeping CLAM lacks: ``status`` (tbp/running/done/failed/skipped, CLAM's 'tbp'
kept), ``stage`` (last completed stage), ``error`` (one line), ``updated_at`` (ISO timestamp)
and ``missing`` (the slide file is gone).

Building is idempotent: a rerun merges with the list already on disk, so no status, user column
or hand edit is lost, new slides are appended and vanished slides are flagged rather than
dropped. Rendering is deterministic and writes are atomic, so an unchanged list stays
byte-identical and a crash never leaves a half-written CSV.

Deliberate deviations from CLAM, each fixing a listed weakness (spec §10):

- ``a_t``/``a_h`` keep their fractions (CLAM truncates them with ``int()`` before storing them
  as float32, §10.17), so a preset ``a_t`` of 0.5 means 0.5 here.
- A blank or junk override cell never drops into ``pdb`` (§10.2): blank means "use the
  default", junk raises :class:`~clam_heat.errors.ProcessListError` naming the slide, column and
  value.
- ``keep_ids``/``exclude_ids`` also accept a number (``2`` or ``2.0`` from a numeric column).
- Folder listing keeps only names *ending* with ``slide_ext`` and skips dot-files (macOS
  ``._x.svs`` resource forks), where CLAM keeps any name *containing* it.
- A ``slide_id`` written with its extension (``a.svs``) is stored without it (``a``), which is
  the id CLAM derives at run time anyway; ids must be unique and safe as folder names.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import OutputError, ProcessListError

__all__ = [
    "CLAM_COLUMNS",
    "FILTER_KEYS",
    "PATCH_KEYS",
    "PRESETS_DIR",
    "PRESET_KEYS",
    "SEG_KEYS",
    "STATUSES",
    "STATUS_COLUMNS",
    "VIS_KEYS",
    "build_process_list",
    "build_process_list_from",
    "builtin_defaults",
    "failed_rows",
    "initialize_columns",
    "load_preset",
    "normalize_slide_id",
    "read_process_list",
    "row_params",
    "slide_path_for_row",
    "status_summary",
    "update_row",
    "write_csv_atomic",
]

#: CLAM's parameter groups, in CLAM's order (create_heatmaps' seg/filter/vis/patch dicts).
SEG_KEYS = ("seg_level", "sthresh", "mthresh", "close", "use_otsu", "keep_ids", "exclude_ids")
FILTER_KEYS = ("a_t", "a_h", "max_n_holes")
VIS_KEYS = ("vis_level", "line_thickness")
PATCH_KEYS = ("use_padding", "contour_fn")
#: The 14 keys a preset must provide and a row may override.
PRESET_KEYS = SEG_KEYS + FILTER_KEYS + VIS_KEYS + PATCH_KEYS

#: Values of the ``status`` column; rows keep any other value (e.g. create_patches_fp's
#: 'processed') verbatim.
STATUSES = ("tbp", "running", "done", "failed", "skipped")

#: The presets shipped with clam-heat (CLAM's three), as package data so that any install has them.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

_Kind = Literal["int", "float", "bool", "str", "ids"]


@dataclass(frozen=True)
class _Column:
    """One managed column: how cells are parsed (``kind``) and stored (``dtype``)."""

    name: str
    kind: _Kind
    dtype: str


#: CLAM's ``initialize_df`` columns after ``slide_id`` (``use_heatmap_args=False``), in order.
_CLAM_SPECS = (
    _Column("process", "int", "uint8"),
    _Column("status", "str", "str"),
    _Column("seg_level", "int", "int8"),
    _Column("sthresh", "int", "uint8"),
    _Column("mthresh", "int", "uint8"),
    _Column("close", "int", "uint32"),
    _Column("use_otsu", "bool", "bool"),
    _Column("keep_ids", "ids", "str"),
    _Column("exclude_ids", "ids", "str"),
    _Column("a_t", "float", "float32"),
    _Column("a_h", "float", "float32"),
    _Column("max_n_holes", "int", "uint32"),
    _Column("vis_level", "int", "int8"),
    _Column("line_thickness", "int", "uint32"),
    _Column("use_padding", "bool", "bool"),
    _Column("contour_fn", "str", "str"),
)
#: Our bookkeeping columns, appended after CLAM's.
_STATUS_SPECS = (
    _Column("stage", "str", "str"),
    _Column("error", "str", "str"),
    _Column("updated_at", "str", "str"),
    _Column("missing", "bool", "bool"),
)
_SPECS = {c.name: c for c in _CLAM_SPECS + _STATUS_SPECS}
CLAM_COLUMNS = ("slide_id",) + tuple(c.name for c in _CLAM_SPECS)
STATUS_COLUMNS = tuple(c.name for c in _STATUS_SPECS)
#: Defaults that do not depend on the preset.
_FIXED_DEFAULTS: dict[str, object] = {
    "process": 1,
    "status": "tbp",
    "stage": "",
    "error": "",
    "updated_at": "",
    "missing": False,
}
#: Columns read as text whatever they look like (ids such as "001" must stay strings).
_TEXT_COLUMNS = ("slide_id",) + tuple(c.name for c in _SPECS.values() if c.dtype == "str")

_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "1.0"})
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "0.0"})
#: Text that means "empty" in a numeric or boolean cell (pandas' own NA spellings).
_BLANK_WORDS = frozenset({"", "nan", "na", "n/a", "null", "none", "<na>"})


# --------------------------------------------------------------------------------------------
# defaults and presets


def builtin_defaults() -> dict[str, object]:
    """create_heatmaps' own defaults, used when ``data_arguments.preset`` is null (spec §2.1).

    >>> d = builtin_defaults()
    >>> d["sthresh"], d["a_t"], d["max_n_holes"], d["line_thickness"], d["keep_ids"]
    (15, 50.0, 10, 250, 'none')
    """
    return {
        "seg_level": -1,
        "sthresh": 15,
        "mthresh": 11,
        "close": 2,
        "use_otsu": False,
        "keep_ids": "none",
        "exclude_ids": "none",
        "a_t": 50.0,
        "a_h": 8.0,
        "max_n_holes": 10,
        "vis_level": -1,
        "line_thickness": 250,
        "use_padding": True,
        "contour_fn": "four_pt",
    }


def _preset_kind(key: str) -> _Kind:
    return _SPECS[key].kind


def _shipped_fallback(path: Path) -> Path:
    """``.../presets/<name>.csv`` that does not exist → our shipped copy of CLAM's preset.

    CLAM resolves its template's ``presets/bwh_biopsy.csv`` against the CWD (its repo root);
    this lets the same config work from any folder. Any other missing path is left to fail.
    """
    if path.exists() or path.parent.name != "presets":
        return path
    shipped = PRESETS_DIR / path.name
    return shipped if shipped.is_file() else path


def load_preset(path: Path | str | None) -> dict[str, object]:
    """The 14 seg/filter/vis/patch defaults from row 0 of a preset CSV, or the built-ins.

    Values come back as plain Python ``int``/``float``/``bool``/``str`` (CLAM keeps numpy
    scalars, whose types then drive its casting; ours are explicit). Extra columns such as
    ``white_thresh``/``black_thresh`` are ignored, as on CLAM's heatmap path. A missing
    ``presets/bwh_biopsy.csv``, ``presets/bwh_resection.csv`` or ``presets/tcga.csv`` falls
    back to the copy shipped in :data:`PRESETS_DIR`.
    """
    if path is None:
        return builtin_defaults()
    path = _shipped_fallback(Path(path))
    raw = _read_csv_text_columns(path, what="preset")
    if len(raw) == 0:
        raise ProcessListError(f"{path}: preset has a header but no data row; add one row")
    absent = [key for key in PRESET_KEYS if key not in raw.columns]
    if absent:
        raise ProcessListError(
            f"{path}: preset lacks column {absent[0]!r}"
            + (f" (and {', '.join(map(repr, absent[1:]))})" if len(absent) > 1 else "")
            + f"; a preset needs all of {', '.join(PRESET_KEYS)}"
        )
    out: dict[str, object] = {}
    for key in PRESET_KEYS:
        value = raw.at[0, key]
        kind = _preset_kind(key)
        try:
            parsed = _cast(value, kind)
        except _CastError as err:
            raise ProcessListError(
                f"{path}: preset column {key!r} = {value!r} {err}; fix row 1 of the preset"
            ) from None
        if parsed is None:
            raise ProcessListError(
                f"{path}: preset column {key!r} is empty; give it a value in row 1"
            )
        if kind == "ids":
            parsed = str(value).strip()
        _check_range(key, parsed, lambda msg, k=key: f"{path}: preset column {k!r} {msg}")
        out[key] = parsed
    return out


# --------------------------------------------------------------------------------------------
# cell parsing


class _CastError(ValueError):
    """A cell that cannot be read as its column's kind; the message says what was expected."""


def _is_blank(value: object, kind: _Kind) -> bool:
    """True for NaN/None/empty cells (and NA words in cells that cannot hold text)."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float | np.floating) and math.isnan(value):
        return True
    if isinstance(value, str):
        text = value.strip()
        if kind in ("str", "ids"):
            return text == ""
        return text.lower() in _BLANK_WORDS
    return False


def _whole_number(value: object) -> int:
    """``value`` as an int if it is a whole number (int, 3.0, '3', '3.0'), else _CastError."""
    if isinstance(value, bool | np.bool_):
        raise _CastError("is a boolean, expected a whole number")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise _CastError("is not a whole number") from None
    else:
        raise _CastError("is not a whole number")
    if not math.isfinite(number) or not number.is_integer():
        raise _CastError("is not a whole number")
    return int(number)


def _parse_ids(value: object) -> list[int]:
    """Contour ids from a keep_ids/exclude_ids cell (spec §2.4), more forgiving than CLAM.

    >>> _parse_ids("none"), _parse_ids("0,3"), _parse_ids(" 1, 2 "), _parse_ids(2.0)
    ([], [0, 3], [1, 2], [2])
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "none":
            return []
        parts = [part.strip() for part in text.split(",")]
        try:
            ids = [_whole_number(part) for part in parts if part]
        except _CastError:
            raise _CastError(
                "is not a list of contour ids; write 'none' or ids like \"0,3\""
            ) from None
    else:
        try:
            ids = [_whole_number(value)]
        except _CastError:
            raise _CastError("is not a contour id; write 'none' or ids like \"0,3\"") from None
    if any(i < 0 for i in ids):
        raise _CastError("has a negative contour id; ids count from 0")
    return ids


def _cast(value: object, kind: _Kind) -> object:
    """Parse one cell as ``kind``; None for a blank cell; _CastError when it cannot be read.

    >>> _cast("TRUE", "bool"), _cast(0, "bool"), _cast("15.0", "int"), _cast("", "float")
    (True, False, 15, None)
    """
    if _is_blank(value, kind):
        return None
    if kind == "int":
        return _whole_number(value)
    if kind == "float":
        if isinstance(value, bool | np.bool_):
            raise _CastError("is a boolean, expected a number")
        try:
            number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _CastError("is not a number") from None
        if not math.isfinite(number):
            raise _CastError("is not a finite number")
        return number
    if kind == "bool":
        if isinstance(value, bool | np.bool_):
            return bool(value)
        word = str(value).strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _CastError("is not a boolean; write TRUE/FALSE or 1/0")
    if kind == "ids":
        return _parse_ids(value)
    return str(value).strip()


def _check_range(column: str, value: object, fail: Any) -> None:
    """Refuse ints that CLAM's column dtype (int8/uint8/uint32) would silently wrap."""
    spec = _SPECS.get(column)
    if spec is None or spec.kind != "int" or not isinstance(value, int):
        return
    info = np.iinfo(np.dtype(spec.dtype))
    if not info.min <= value <= info.max:
        raise ProcessListError(
            fail(f"= {value} is out of range {info.min}..{info.max} ({spec.dtype} in CLAM)")
        )


def _ids_text(value: object) -> str:
    """The stored text of a keep_ids/exclude_ids cell: text verbatim, numbers as '2'."""
    if isinstance(value, str):
        return value.strip()
    return ",".join(str(i) for i in _parse_ids(value))


# --------------------------------------------------------------------------------------------
# slide ids


def normalize_slide_id(value: object, slide_ext: str) -> str:
    """CLAM's run-time id: the cell as text without a trailing ``slide_ext``.

    >>> normalize_slide_id("C3L-01663-21.svs", ".svs"), normalize_slide_id("001", ".svs")
    ('C3L-01663-21', '001')
    """
    text = "" if _is_blank(value, "str") else str(value)
    return text.removesuffix(slide_ext) if slide_ext else text


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
    for i, sid in enumerate(text):
        sid = str(sid)
        if "/" in sid or "\\" in sid or (os.altsep and os.altsep in sid):
            raise ProcessListError(
                f"{source}: {where[i]}: slide_id {sid!r} contains a path separator; ids name "
                "output folders, so give the bare file name and put its folder in "
                "data_arguments.data_dir"
            )
        if ".." in sid:
            raise ProcessListError(
                f"{source}: {where[i]}: slide_id {sid!r} contains '..'; ids name output "
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


def _line_labels(n: int) -> list[str]:
    """CSV line numbers of data rows (header is line 1)."""
    return [f"line {i + 2}" for i in range(n)]


# --------------------------------------------------------------------------------------------
# columns and dtypes


def _column_default(name: str, defaults: Mapping[str, object]) -> object:
    if name in _FIXED_DEFAULTS:
        return _FIXED_DEFAULTS[name]
    if name not in defaults:
        raise ValueError(f"defaults lack {name!r}; build them with load_preset()")
    return defaults[name]


def _coerce_column(
    series: pd.Series, spec: _Column, ids: pd.Series, default: object, source: str
) -> pd.Series:
    """Parse every cell of a managed column; blanks become ``default`` (None keeps them blank).

    Runs once per cell (cells are slides, not pixels) so that the message can name the bad one.
    """
    values: list[object] = []
    for sid, cell in zip(ids, series, strict=True):
        try:
            parsed = _cast(cell, spec.kind)
        except _CastError as err:
            raise ProcessListError(
                f"{source}: slide_id {sid!r}: column {spec.name!r} = {cell!r} {err}; fix the "
                f"cell or leave it empty to use the default"
                + ("" if default is None else f" {default!r}")
            ) from None
        if parsed is None:
            parsed = default
        elif spec.kind == "ids":
            parsed = _ids_text(cell)
        if parsed is not None:
            _check_range(
                spec.name,
                parsed,
                lambda msg, s=sid, c=cell: (
                    f"{source}: slide_id {s!r}: column {spec.name!r} {msg}; fix the cell {c!r}"
                ),
            )
        values.append(parsed)
    if any(v is None for v in values):
        # Blank cells stay blank (read_process_list): numbers as float NaN, others as object.
        fill = np.nan if spec.kind in ("int", "float") else None
        out = pd.Series([fill if v is None else v for v in values], index=series.index)
        return out.astype("float64") if spec.kind in ("int", "float") else out.astype(object)
    if spec.kind == "ids" or spec.dtype == "str":
        return pd.Series(values, index=series.index, dtype="str")
    return pd.Series(values, index=series.index).astype(spec.dtype)


def initialize_columns(
    df: pd.DataFrame, defaults: Mapping[str, object], *, source: str = "process list"
) -> pd.DataFrame:
    """CLAM's ``initialize_df`` for a DataFrame (spec §2.2), plus our status columns.

    For each managed column in CLAM's order: if present, only its blank cells get the default
    (every other cell is parsed and range-checked, junk raises ProcessListError); if absent, it
    is appended at the end. Then ``stage``, ``error``, ``updated_at``, ``missing``. Any other
    column (label, source, x1..y2, notes) keeps its place and values. Dtypes follow CLAM
    (process uint8, seg_level int8, sthresh/mthresh uint8, close uint32, a_t/a_h float32, ...)
    except that a_t/a_h keep their fractions. Returns a new frame.

    >>> out = initialize_columns(pd.DataFrame({"slide_id": ["a"], "notes": ["x"]}),
    ...                          builtin_defaults())
    >>> list(out.columns[:4]), str(out["sthresh"].dtype), out.at[0, "status"]
    (['slide_id', 'notes', 'process', 'status'], 'uint8', 'tbp')
    """
    if "slide_id" not in df.columns:
        raise ProcessListError(f"{source}: no 'slide_id' column; add one naming each slide file")
    out = df.copy()
    ids = out["slide_id"]
    for spec in _CLAM_SPECS + _STATUS_SPECS:
        default = _column_default(spec.name, defaults)
        if spec.kind == "ids":
            default = _ids_text(default)
        if spec.name in out.columns:
            out[spec.name] = _coerce_column(out[spec.name], spec, ids, default, source)
        else:
            filler = pd.Series([default] * len(out), index=out.index)
            out[spec.name] = filler.astype(spec.dtype)
    return out


def _type_known_columns(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Typed managed columns for a list read from disk, without a preset at hand.

    Blank text cells become "" and blank numbers/booleans of preset columns stay NaN (both mean
    "use the default" to row_params); config-independent columns (process, status, stage,
    error, updated_at, missing) get their fixed default.
    """
    out = df.copy()
    ids = out["slide_id"]
    for spec in _CLAM_SPECS + _STATUS_SPECS:
        if spec.name not in out.columns:
            continue
        default = _FIXED_DEFAULTS.get(spec.name, "" if spec.dtype == "str" else None)
        out[spec.name] = _coerce_column(out[spec.name], spec, ids, default, source)
    return out


# --------------------------------------------------------------------------------------------
# reading and writing


def _read_csv(path: Path, *, what: str, all_text: bool) -> pd.DataFrame:
    """Read a CSV (UTF-8, optional BOM, CRLF ok); only empty cells count as missing.

    ``all_text`` keeps every cell as text, so user columns round-trip exactly when rewritten;
    otherwise only ids and managed text columns are forced to text and pandas infers the rest.
    """
    dtype: Any = str if all_text else dict.fromkeys(_TEXT_COLUMNS, str)
    try:
        return pd.read_csv(
            path, dtype=dtype, keep_default_na=False, na_values=[""], encoding="utf-8-sig"
        )
    except FileNotFoundError:
        raise ProcessListError(f"{path}: {what} file not found; check the path") from None
    except IsADirectoryError:
        raise ProcessListError(f"{path}: {what} path is a folder; name a CSV file") from None
    except pd.errors.EmptyDataError:
        raise ProcessListError(f"{path}: {what} file is empty; it needs a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProcessListError(
            f"{path}: {what} is not a readable UTF-8 CSV ({first}); re-save it as CSV"
        ) from None
    except OSError as err:
        raise ProcessListError(
            f"{path}: cannot read {what} ({err.strerror or err}); check permissions"
        ) from None


def _read_csv_text_columns(path: Path, *, what: str) -> pd.DataFrame:
    return _read_csv(path, what=what, all_text=True)


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
    return _type_known_columns(df, source)


def _render(df: pd.DataFrame) -> bytes:
    """The CSV bytes we write: UTF-8, LF, no index; deterministic for equal frames."""
    return df.to_csv(index=False, lineterminator="\n").encode("utf-8")


def write_csv_atomic(df: pd.DataFrame, path: Path | str) -> Path:
    """Write ``df`` as CSV via a temp file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never a half-written one, and the temp file is
    removed whatever fails. The folder is created; an existing file's permissions are kept.
    """
    path = Path(path)
    data = _render(df)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(
            f"{path}: cannot create the file's folder or a temp file in it "
            f"({err.strerror or err}); check the folder is writable"
        ) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(
                f"{path}: cannot write the CSV ({err.strerror or err}); check the folder is "
                "writable and has free space"
            ) from None
        raise
    return path


# --------------------------------------------------------------------------------------------
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
    """Where a row's slide file lives (spec §0.5).

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


def _list_folder(folder: Path, slide_ext: str, label: str) -> list[Path]:
    """Slide files in ``folder``: names ending with ``slide_ext`` (no dot-files), sorted."""
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
    files = [
        p
        for p in entries
        if p.name.endswith(slide_ext) and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: p.name)


def _enumerate_slides(
    data_dir: Path | str | Mapping[str, Path | str], data_dir_key: str, slide_ext: str
) -> pd.DataFrame:
    """``slide_id`` (+ the data_dir_key column for a dict) for every slide file found."""
    if isinstance(data_dir, Mapping):
        ids: list[str] = []
        keys: list[str] = []
        where: list[str] = []
        for key, folder in data_dir.items():
            for p in _list_folder(Path(folder), slide_ext, f"data_arguments.data_dir[{key!r}]"):
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
    files = _list_folder(Path(data_dir), slide_ext, "data_arguments.data_dir")
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
    if source is not None and source.exists():
        base = _read_raw_list(source, what="process list", slide_ext=slide_ext)
        if isinstance(data_dir, Mapping) and data_dir_key not in base.columns:
            raise ProcessListError(
                f"{source}: no {data_dir_key!r} column (data_arguments.data_dir_key); "
                "data_dir is a dict, so each row must name its folder's key"
            )
        same = list_path.exists() and list_path.resolve() == source.resolve()
    else:
        base = _enumerate_slides(data_dir, data_dir_key, slide_ext)
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
    gone = [not slide_path_for_row(record, args).exists() for record in records]
    table["missing"] = pd.Series(gone, index=table.index, dtype="bool")
    data = _render(table)
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
# per-row parameters and status


def _default_kind(key: str, default: object) -> _Kind:
    """Cast kind from the default's type, as CLAM's ``load_params`` does (keep/exclude: ids)."""
    if key in ("keep_ids", "exclude_ids"):
        return "ids"
    if isinstance(default, bool | np.bool_):
        return "bool"
    if isinstance(default, numbers.Integral):
        return "int"
    if isinstance(default, numbers.Real):
        return "float"
    return "str"


def row_params(row: Mapping[str, Any] | pd.Series, defaults: Mapping[str, object]) -> dict:
    """The 14 seg/filter/vis/patch parameters for one row (CLAM's ``load_params``, §2.3).

    A blank or absent cell gives the default; any other cell is cast to the default's type
    (bool accepts TRUE/False/1/0); ``keep_ids``/``exclude_ids`` come back as ``list[int]``.
    A cell that cannot be cast raises ProcessListError naming slide_id, column and value.

    >>> p = row_params({"slide_id": "a", "sthresh": "20", "a_t": float("nan"),
    ...                 "keep_ids": "0,3", "use_otsu": "TRUE"}, builtin_defaults())
    >>> p["sthresh"], p["a_t"], p["keep_ids"], p["exclude_ids"], p["use_otsu"]
    (20, 50.0, [0, 3], [], True)
    """
    sid = row.get("slide_id", "?")
    out: dict[str, object] = {}
    for key in PRESET_KEYS:
        if key not in defaults:
            raise ValueError(f"defaults lack {key!r}; build them with load_preset()")
        default = defaults[key]
        kind = _default_kind(key, default)
        cell = row.get(key)
        try:
            value = _cast(cell, kind)
            if value is None:
                value = _cast(default, kind)
        except _CastError as err:
            raise ProcessListError(
                f"slide_id {sid!r}: column {key!r} = {cell!r} {err}; fix the cell or leave it "
                f"empty to use the default {default!r}"
            ) from None
        _check_range(
            key, value, lambda msg, k=key: f"slide_id {sid!r}: column {k!r} {msg}; fix the cell"
        )
        out[key] = value
    return out


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
    fields.setdefault("updated_at", _now_iso())
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


def status_summary(df: pd.DataFrame) -> dict[str, int]:
    """Rows per status: the five known statuses (zeros included) then any others, sorted.

    >>> status_summary(pd.DataFrame({"status": ["tbp", "done", "done", "processed"]}))
    {'tbp': 1, 'running': 0, 'done': 2, 'failed': 0, 'skipped': 0, 'processed': 1}
    """
    status = df["status"] if "status" in df.columns else pd.Series(["tbp"] * len(df))
    counts = status.fillna("tbp").astype(str).value_counts()
    out = {s: int(counts.get(s, 0)) for s in STATUSES}
    for other in sorted(set(counts.index) - set(STATUSES)):
        out[other] = int(counts[other])
    return out


def failed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose status is 'failed' (all columns, original index)."""
    if "status" not in df.columns:
        return df.iloc[0:0].copy()
    return df.loc[df["status"].astype(str) == "failed"].copy()
