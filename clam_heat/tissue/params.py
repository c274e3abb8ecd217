"""CLAM's segmentation parameters (seg/filter/vis keys of a process-list row), validated.

``a_t``/``a_h`` are areas in 512x512 level-0 patches; ``seg_level``/``vis_level`` -1 mean "best
level for 32x" (:data:`AUTO_LEVEL_DOWNSAMPLE`). Every problem is reported at once as a
:class:`~clam_heat.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError

#: Names accepted for the in-tissue test; ``four_pt`` and ``four_pt_easy`` are the same test.
CONTOUR_FNS = ("four_pt_hard", "four_pt", "four_pt_easy", "center", "basic")


ContourFn = Literal["four_pt_hard", "four_pt", "four_pt_easy", "center", "basic"]


#: Downsample that ``seg_level`` / ``vis_level`` = -1 resolve to (CLAM's heatmap path uses 32).
AUTO_LEVEL_DOWNSAMPLE = 32.0


# Row-parameter keys that belong to patching, not segmentation; accepted and ignored.
_IGNORED_ROW_KEYS = frozenset({"use_padding", "contour_fn"})


def _as_ids(value: Any, key: str) -> tuple[int, ...]:
    """Parse keep_ids/exclude_ids like CLAM: ``'none'``/empty -> (), ``'0,3'`` -> (0, 3).

    Lists, tuples, arrays and single numbers are accepted too (the process-list module already
    parses cells to ``list[int]``).

    >>> _as_ids("0, 3", "keep_ids"), _as_ids("none", "keep_ids"), _as_ids([2.0], "keep_ids")
    ((0, 3), (), (2,))
    """
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() == "none":
            return ()
        items: Iterable[Any] = [part.strip() for part in text.split(",") if part.strip()]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        items = [value]
    ids: list[int] = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{key} = {value!r}: {item!r} is not an integer contour id "
                "(write ids as a quoted list like \"0,3\", or 'none')"
            ) from None
        if math.isnan(number) and isinstance(value, float):
            return ()
        if not math.isfinite(number) or number != int(number) or number < 0:
            raise ConfigError(
                f"{key} = {value!r}: {item!r} is not a non-negative integer contour id "
                "(write ids as a quoted list like \"0,3\", or 'none')"
            )
        ids.append(int(number))
    return tuple(ids)


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ConfigError(f"{key} = {value!r}: must be true or false")


@dataclass(frozen=True)
class SegmentationParams:
    """CLAM's seg/filter/vis parameters for one slide (create_heatmaps defaults).

    ``a_t``/``a_h`` are areas in units of one ``ref_patch_size`` x ``ref_patch_size`` level-0
    patch (512x512), like CLAM. ``seg_level``/``vis_level`` = -1 mean "best level for 32x".
    ``keep_ids``/``exclude_ids`` index the filtered contour list (see :func:`segment_array`).
    """

    seg_level: int = -1
    sthresh: int = 15
    sthresh_up: int = 255
    mthresh: int = 11
    close: int = 2
    use_otsu: bool = False
    a_t: float = 50.0
    a_h: float = 8.0
    max_n_holes: int = 10
    keep_ids: tuple[int, ...] = ()
    exclude_ids: tuple[int, ...] = ()
    ref_patch_size: int = 512
    vis_level: int = -1
    line_thickness: int = 250

    def __post_init__(self) -> None:
        problems: list[str] = []
        bad: set[str] = set()
        ints = (
            "seg_level",
            "sthresh",
            "sthresh_up",
            "mthresh",
            "close",
            "max_n_holes",
            "ref_patch_size",
            "vis_level",
            "line_thickness",
        )
        for name in ints:
            value = getattr(self, name)
            integral = isinstance(value, int | np.integer) or (
                isinstance(value, float | np.floating) and float(value).is_integer()
            )
            if isinstance(value, bool | np.bool_) or not integral:
                problems.append(f"{name} = {value!r}: must be an integer")
                bad.add(name)
            else:
                object.__setattr__(self, name, int(value))
        for name in ("a_t", "a_h"):
            value = getattr(self, name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or number < 0:
                problems.append(f"{name} = {value!r}: must be a finite number >= 0")
            else:
                object.__setattr__(self, name, number)
        try:
            object.__setattr__(self, "use_otsu", _as_bool(self.use_otsu, "use_otsu"))
        except ConfigError as err:
            problems.extend(err.problems)
        for name in ("keep_ids", "exclude_ids"):
            try:
                object.__setattr__(self, name, _as_ids(getattr(self, name), name))
            except ConfigError as err:
                problems.extend(err.problems)
        problems.extend(self._range_problems(bad))
        if problems:
            raise ConfigError(problems)

    def _range_problems(self, skip: set[str]) -> list[str]:
        problems = []
        for name, low in (
            ("seg_level", -1),
            ("vis_level", -1),
            ("close", 0),
            ("max_n_holes", 0),
            ("line_thickness", 0),
            ("ref_patch_size", 1),
        ):
            if name not in skip and getattr(self, name) < low:
                problems.append(f"{name} = {getattr(self, name)}: must be >= {low}")
        for name in ("sthresh", "sthresh_up"):
            if name not in skip and not 0 <= getattr(self, name) <= 255:
                problems.append(f"{name} = {getattr(self, name)}: must be between 0 and 255")
        if "mthresh" not in skip and (self.mthresh < 1 or self.mthresh % 2 == 0):
            problems.append(
                f"mthresh = {self.mthresh}: must be an odd integer >= 1 (median blur kernel)"
            )
        return problems

    @classmethod
    def from_row_params(cls, params: Mapping[str, Any]) -> SegmentationParams:
        """Build from the per-row dict of the process-list module (CLAM's 14 keys).

        ``use_padding`` and ``contour_fn`` are patching keys and are ignored here (CLAM's
        heatmap path ignores them too); missing keys keep their defaults; unknown keys are a
        :class:`ConfigError` so a typo never goes unnoticed.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names - _IGNORED_ROW_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown segmentation parameter(s) {', '.join(unknown)} "
                f"(expected some of: {', '.join(sorted(names | _IGNORED_ROW_KEYS))})"
            )
        values = {k: v for k, v in params.items() if k in names}
        return cls(**values)

    def to_dict(self, *, include_vis: bool = True) -> dict[str, Any]:
        """JSON-able dict (tuples become lists) for fingerprints and records.

        With ``include_vis=False`` the overview-only keys (vis_level, line_thickness) are left
        out, so a fingerprint of the contours does not change when only the drawing does.
        """
        out = dataclasses.asdict(self)
        out["keep_ids"] = list(self.keep_ids)
        out["exclude_ids"] = list(self.exclude_ids)
        if not include_vis:
            del out["vis_level"], out["line_thickness"]
        return out
