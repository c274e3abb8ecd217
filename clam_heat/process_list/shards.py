"""Sharding for plain job arrays: ``--shard i/n`` rows, shard files beside the list, ``merge``.

A sharded run (``--shard i/n``) is a driver of its own: it writes only its shard CSVs
(:func:`shard_path`); :func:`merge_process_list` folds shards back into the list.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ..atomic import write_text_atomic
from ..errors import ConfigError, ProcessListError
from .results import is_run_column

__all__ = [
    "MergeReport",
    "find_shards",
    "merge_process_list",
    "merge_shards",
    "parse_shard",
    "select_shard",
    "shard_frame",
    "shard_of",
    "shard_path",
]

_SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) from ``--shard``; Slurm: ``--shard $SLURM_ARRAY_TASK_ID/N``.

    >>> parse_shard("0/4"), parse_shard(" 3 / 4 ")
    ((0, 4), (3, 4))
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. --shard 0/4")
    i, n = int(match[1]), int(match[2])
    if n < 1 or i >= n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def shard_of(slide_id: str, n: int) -> int:
    """The shard (0..n-1) of a slide: a stable hash of its id, the same on every machine/run.

    Hashing (not list position) keeps a slide in its shard when rows are added, removed or
    reordered, so a rerun with the same n never moves work between array tasks.

    >>> shard_of("slide_1", 4) == shard_of("slide_1", 4), shard_of("anything", 1)
    (True, 0)
    """
    digest = hashlib.sha256(str(slide_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def select_shard(
    contexts: Sequence[Any], i: int, n: int, *, by: Literal["hash", "position"] = "hash"
) -> list[Any]:
    """The rows of shard ``i`` of ``n``: by stable hash of ``slide_id`` (default) or by position.

    ``by="position"`` takes every n-th row starting at i (balanced shards) and is stable only
    while the list's rows and order do not change; pass it the whole list, not pending rows.
    Works on anything with a ``slide_id`` attribute (RowContexts).
    """
    if not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: need 0 <= i < n")
    if by == "position":
        return list(contexts[i::n])
    return [c for c in contexts if shard_of(c.slide_id, n) == i]


def shard_path(list_path: Path | str, i: int, n: int) -> Path:
    """Where shard ``i`` of ``n`` writes its rows: beside the list.

    >>> shard_path("lists/demo.csv", 2, 8).as_posix()
    'lists/demo.shard-2-of-8.csv'
    """
    path = Path(list_path)
    return path.with_name(f"{path.stem}.shard-{i}-of-{n}{path.suffix or '.csv'}")


def find_shards(list_path: Path | str) -> list[Path]:
    """Every shard file of a list (any n), ordered by n then i."""
    path = Path(list_path)
    found = []
    for candidate in path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix or '.csv'}"):
        match = _SHARD_NAME.match(candidate.stem)
        if match and match["stem"] == path.stem:
            found.append((int(match["n"]), int(match["i"]), candidate))
    return [p for _, _, p in sorted(found)]


def _read_text_frame(path: Path) -> pd.DataFrame:
    """A CSV with every cell as the exact text in the file (so untouched cells round-trip)."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise ProcessListError(f"{path}: cannot read CSV ({err}); fix or remove the file") from None


def _timestamps(values: Any) -> Any:
    return pd.to_datetime(
        pd.Series(values, dtype=object), utc=True, errors="coerce", format="ISO8601"
    )


def _overlay(
    base: pd.DataFrame, shard: pd.DataFrame, source: Path
) -> tuple[pd.DataFrame, int, list[str]]:
    """Copy the run columns of ``shard`` rows into ``base`` where the shard is as new or newer.

    Returns the new frame, how many rows were taken and the shard's slide ids unknown to base.
    Ties go to the shard: the shard is where the row ran.
    """
    if "slide_id" not in shard.columns:
        raise ProcessListError(f"{source}: no slide_id column; not a process-list shard")
    base = base.copy()
    ids = base["slide_id"].astype(str)
    shard_ids = shard["slide_id"].astype(str)
    if shard_ids.duplicated().any():
        dupes = sorted(set(shard_ids[shard_ids.duplicated()]))[:3]
        raise ProcessListError(f"{source}: duplicate slide_id {dupes}; fix or delete the shard")
    position = {sid: k for k, sid in enumerate(ids)}
    unknown = [sid for sid in shard_ids if sid not in position]
    known = shard[shard_ids.isin(position)].reset_index(drop=True)
    if known.empty:
        return base, 0, unknown
    rows = [position[sid] for sid in known["slide_id"].astype(str)]
    base_times = (
        _timestamps(base["updated_at"].iloc[rows].to_numpy())
        if "updated_at" in base.columns
        else _timestamps([None] * len(rows))
    )
    shard_times = (
        _timestamps(known["updated_at"].to_numpy())
        if "updated_at" in known.columns
        else _timestamps([None] * len(rows))
    )
    take = (shard_times.notna() & (base_times.isna() | (shard_times >= base_times))).to_numpy()
    if not take.any():
        return base, 0, unknown
    target = base.index[[r for r, t in zip(rows, take, strict=True) if t]]
    columns = [c for c in known.columns if is_run_column(c)]
    for column in columns:
        if column not in base.columns:
            base[column] = ""
        if base[column].dtype != object:
            base[column] = base[column].astype(object)
        base.loc[target, column] = known.loc[take, column].astype(object).to_numpy()
    return base, int(take.sum()), unknown


def merge_shards(
    list_path: Path | str, shard_paths: Sequence[Path | str] | None = None
) -> pd.DataFrame:
    """The process list with every shard's run columns folded in (nothing is written).

    For each shard row whose ``updated_at`` is as new as or newer than the list's, the run
    columns (status, stage, error, updated_at, bag_size, Pred_c, p_c, attention stats) come from
    the shard; user columns, row order and rows absent from all shards are untouched, cell text
    included. Shards default to :func:`find_shards`.
    """
    return _merge(Path(list_path), shard_paths)[0]


@dataclass
class MergeReport:
    """What :func:`merge_process_list` did, for the CLI's one-line summary."""

    list_path: Path
    shards: list[Path] = field(default_factory=list)
    rows_taken: int = 0
    unknown: list[str] = field(default_factory=list)
    results_csv: Path | None = None
    removed: list[Path] = field(default_factory=list)


def _merge(
    list_path: Path, shard_paths: Sequence[Path | str] | None
) -> tuple[pd.DataFrame, MergeReport]:
    if not list_path.is_file():
        raise ProcessListError(
            f"{list_path}: process list not found; run `clam-heat list CONFIG` first"
        )
    shards = [Path(p) for p in shard_paths] if shard_paths is not None else find_shards(list_path)
    report = MergeReport(list_path, shards)
    frame = _read_text_frame(list_path)
    for shard in shards:
        if not shard.is_file():
            raise ProcessListError(f"{shard}: shard not found (check the path or omit it)")
        frame, taken, unknown = _overlay(frame, _read_text_frame(shard), shard)
        report.rows_taken += taken
        report.unknown.extend(u for u in unknown if u not in report.unknown)
    return frame, report


def merge_process_list(
    list_path: Path | str,
    shard_paths: Sequence[Path | str] | None = None,
    *,
    results_csv: Path | str | None = None,
    remove: bool = False,
) -> MergeReport:
    """``clam-heat merge LIST``: fold shard CSVs into the list, atomically; optionally rewrite
    the results CSV (the ``process == 1`` rows) and remove the merged shards (with ``results_csv``
    also that CSV's shards, which sharded runs write beside it).

    Safe to repeat: merging the same shards twice changes nothing.
    """
    list_path = Path(list_path)
    frame, report = _merge(list_path, shard_paths)
    if report.shards:
        write_text_atomic(list_path, frame.to_csv(index=False))
    if results_csv is not None:
        report.results_csv = Path(results_csv)
        process = pd.to_numeric(
            frame.get("process", pd.Series(["1"] * len(frame))), errors="coerce"
        )
        processed = frame[(process == 1).to_numpy()].reset_index(drop=True)
        write_text_atomic(report.results_csv, processed.to_csv(index=False))
    if remove:
        leftovers = find_shards(results_csv) if results_csv is not None else []
        for shard in [*report.shards, *leftovers]:  # a shard run's results CSV shards too
            shard.unlink(missing_ok=True)
            report.removed.append(shard)
    return report


def shard_frame(df: pd.DataFrame, list_path: Path | str, i: int, n: int) -> pd.DataFrame:
    """The rows of shard ``i``/``n`` of the process list ``df``, resumed from its shard file.

    What a sharded driver starts from: the list's rows whose :func:`shard_of` is ``i`` (in list
    order), with the run columns of an existing ``shard_path(list_path, i, n)`` laid over them
    when newer, so a resubmitted array task skips rows it already finished.
    """
    if not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: need 0 <= i < n")
    mask = [shard_of(str(s), n) == i for s in df["slide_id"]]
    rows = df[mask].reset_index(drop=True)
    existing = shard_path(list_path, i, n)
    if existing.is_file():
        rows, _taken, _unknown = _overlay(rows, _read_text_frame(existing), existing)
    elif len(rows) == 0:
        # a shard with no rows still leaves its file (the list's columns, no rows): a job array
        # can then check that every task ran, and `merge` finds all n shard files
        write_text_atomic(existing, rows.to_csv(index=False))
    return rows
