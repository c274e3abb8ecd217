"""Process-list columns: CLAM's managed columns and dtypes, presets, per-row overrides, casting.

The columns a run writes (status and results) are in :mod:`.results`.

Deliberate deviations from CLAM, each fixing a listed weakness (docs/rules/heatmaps.md#deviations):

- ``a_t``/``a_h`` keep their fractions (CLAM truncates them with ``int()`` before storing them
  as float32, docs/rules/heatmaps.md#fractional-area-thresholds), so a preset ``a_t`` of 0.5
  means 0.5 here.
- A blank or junk override cell never drops into ``pdb`` (docs/rules/heatmaps.md#no-prompt):
  blank means "use the default", junk raises :class:`~clam_heat.errors.ProcessListError`
  naming the slide, column and value.
- ``keep_ids``/``exclude_ids`` also accept a number (``2`` or ``2.0`` from a numeric column).
- Folder listing keeps only names *ending* with ``slide_ext`` and skips dot-files (macOS
  ``._x.svs`` resource forks), where CLAM keeps any name *containing* it.
- A ``slide_id`` written with its extension (``a.svs``) is stored without it (``a``), which is
  the id CLAM derives at run time anyway; ids must be unique and safe as folder names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import ProcessListError
from .csvfile import read_csv

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
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

_Kind = Literal["int", "float", "bool", "str", "ids"]


@dataclass(frozen=True)
class ColumnSpec:
    """One managed column: how cells are parsed (``kind``) and stored (``dtype``)."""

    name: str
    kind: _Kind
    dtype: str


#: CLAM's ``initialize_df`` columns after ``slide_id`` (``use_heatmap_args=False``), in order.
_CLAM_SPECS = (
    ColumnSpec("process", "int", "uint8"),
    ColumnSpec("status", "str", "str"),
    ColumnSpec("seg_level", "int", "int8"),
    ColumnSpec("sthresh", "int", "uint8"),
    ColumnSpec("mthresh", "int", "uint8"),
    ColumnSpec("close", "int", "uint32"),
    ColumnSpec("use_otsu", "bool", "bool"),
    ColumnSpec("keep_ids", "ids", "str"),
    ColumnSpec("exclude_ids", "ids", "str"),
    ColumnSpec("a_t", "float", "float32"),
    ColumnSpec("a_h", "float", "float32"),
    ColumnSpec("max_n_holes", "int", "uint32"),
    ColumnSpec("vis_level", "int", "int8"),
    ColumnSpec("line_thickness", "int", "uint32"),
    ColumnSpec("use_padding", "bool", "bool"),
    ColumnSpec("contour_fn", "str", "str"),
)
#: Our bookkeeping columns, appended after CLAM's.
_STATUS_SPECS = (
    ColumnSpec("stage", "str", "str"),
    ColumnSpec("error", "str", "str"),
    ColumnSpec("updated_at", "str", "str"),
    ColumnSpec("missing", "bool", "bool"),
)
#: Every managed column by name (what the recorder casts a value by).
COLUMN_SPECS: dict[str, ColumnSpec] = {c.name: c for c in _CLAM_SPECS + _STATUS_SPECS}
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
_TEXT_COLUMNS = ("slide_id",) + tuple(c.name for c in COLUMN_SPECS.values() if c.dtype == "str")

_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "1.0"})
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "0.0"})
#: Text that means "empty" in a numeric or boolean cell (pandas' own NA spellings).
_BLANK_WORDS = frozenset({"", "nan", "na", "n/a", "null", "none", "<na>"})


# --------------------------------------------------------------------------------------------
# defaults and presets


def builtin_defaults() -> dict[str, object]:
    """create_heatmaps' own defaults, used when ``data_arguments.preset`` is null
    (docs/rules/heatmaps.md#presets).

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
    return COLUMN_SPECS[key].kind


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
    raw = read_csv(path, what="preset", dtype=str)
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
    """Contour ids from a keep_ids/exclude_ids cell, more forgiving than CLAM
    (docs/rules/heatmaps.md#keep-and-exclude-ids).

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
    spec = COLUMN_SPECS.get(column)
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


# --------------------------------------------------------------------------------------------
# columns and dtypes


def _column_default(name: str, defaults: Mapping[str, object]) -> object:
    if name in _FIXED_DEFAULTS:
        return _FIXED_DEFAULTS[name]
    if name not in defaults:
        raise ValueError(f"defaults lack {name!r}; build them with load_preset()")
    return defaults[name]


def _coerce_column(
    series: pd.Series, spec: ColumnSpec, ids: pd.Series, default: object, source: str
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
    """CLAM's ``initialize_df`` for a DataFrame, plus our status columns
    (docs/rules/heatmaps.md#process-list-columns).

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
    """The 14 seg/filter/vis/patch parameters for one row (CLAM's ``load_params``,
    docs/rules/heatmaps.md#per-row-overrides).

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
