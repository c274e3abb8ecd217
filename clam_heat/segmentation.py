"""Tissue segmentation, tissue masks and in-tissue patch grids (CLAM-compatible).

What this reproduces (spec ``clam-heatmaps.md`` §3, §4, §6.5), in our own code:

* :func:`segment_array` / :func:`segment_slide`: CLAM's ``segmentTissue`` (HSV saturation,
  median blur, fixed or Otsu threshold, closing, two-level contours, area filters measured in
  512x512 level-0 patches, ``max_n_holes``, ``keep_ids``/``exclude_ids``).
* :func:`grid_coords` / :func:`patch_in_tissue`: CLAM's per-contour patch grid and its contour
  tests (``basic``, ``center``, ``four_pt``, ``four_pt_hard``) plus the hole test. The point
  tests give exactly ``cv2.pointPolygonTest`` answers, but vectorised (see
  :class:`_PolygonSign`).
* :func:`rasterize_tissue`: CLAM's ``get_seg_mask`` for any window (used per heatmap tile).
* :func:`draw_overview`: CLAM's ``visWSI`` overview (``<id>_mask.jpg``).
* GeoJSON instead of CLAM's pickle (QuPath opens it; nothing executable is ever loaded).

Coordinate frames: ``l0_*`` are level-0 pixels, ``vis_*`` are pixels of the level being drawn.
All contours are stored in level 0 as ``(n, 2)`` int32 ``(x, y)`` polygons, in the order
OpenCV's ``findContours`` produced them (after filtering and id selection), like CLAM.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import cv2
import numpy as np

from .atomic import write_bytes_atomic
from .errors import ConfigError, SegmentationError

if TYPE_CHECKING:
    from .slide import Slide

__all__ = [
    "CONTOUR_FNS",
    "SegmentationParams",
    "TissueContours",
    "area_unit",
    "center_shift_for_overlap",
    "contours_to_geojson",
    "draw_overview",
    "grid_coords",
    "load_geojson",
    "patch_in_tissue",
    "rasterize_tissue",
    "resolve_level",
    "save_geojson",
    "save_overview_jpg",
    "segment_array",
    "segment_slide",
]

#: Names accepted for the in-tissue test; ``four_pt`` and ``four_pt_easy`` are the same test.
CONTOUR_FNS = ("four_pt_hard", "four_pt", "four_pt_easy", "center", "basic")

ContourFn = Literal["four_pt_hard", "four_pt", "four_pt_easy", "center", "basic"]

#: Downsample that ``seg_level`` / ``vis_level`` = -1 resolve to (CLAM's heatmap path uses 32).
AUTO_LEVEL_DOWNSAMPLE = 32.0

#: Largest raster (pixels) built per polygon for the point tests; bigger polygons are rasterised
#: coarser (points near an edge are then decided exactly, so the answer does not change).
_RASTER_BUDGET_PX = 16_000_000

#: Elements (points x edges) handled at once by the exact point-in-polygon test.
_EXACT_CHUNK = 1_000_000

#: Sub-pixel bits used when drawing polygons (cv2 ``shift``), so coarse rasters keep precision.
_SHIFT_BITS = 4

# Row-parameter keys that belong to patching, not segmentation; accepted and ignored.
_IGNORED_ROW_KEYS = frozenset({"use_padding", "contour_fn"})


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


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
        ints = ("seg_level", "sthresh", "sthresh_up", "mthresh", "close", "max_n_holes",
                "ref_patch_size", "vis_level", "line_thickness")  # fmt: skip
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
        for name, low in (("seg_level", -1), ("vis_level", -1), ("close", 0), ("max_n_holes", 0),
                          ("line_thickness", 0), ("ref_patch_size", 1)):  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# Contours container
# --------------------------------------------------------------------------------------------


def _as_polygon(points: Any, what: str) -> np.ndarray:
    array = np.asarray(points)
    if array.ndim == 3 and array.shape[1] == 1:
        array = array[:, 0, :]
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"{what} must be an (n, 2) array of (x, y) points, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) and not (
        np.all(np.isfinite(array)) and np.all(array == np.trunc(array))
    ):
        raise ValueError(f"{what} must hold integer pixel coordinates")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > 2**31 - 1):
        raise ValueError(f"{what} has coordinates outside the int32 range")
    out = np.ascontiguousarray(array, dtype=np.int32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class TissueContours:
    """Tissue polygons and their holes in level-0 pixels (CLAM's contours_tissue/holes_tissue).

    ``tissue[i]`` is an (n, 2) int32 array of level-0 (x, y) vertices (read-only);
    ``holes[i]`` is the tuple of hole polygons of ``tissue[i]`` (same layout). Equality compares
    every vertex exactly.
    """

    tissue: tuple[np.ndarray, ...] = ()
    holes: tuple[tuple[np.ndarray, ...], ...] = ()
    #: Per-instance memo of scaled contours (set in __post_init__; not a dataclass field).
    _cache: ClassVar[dict[Any, Any]]

    def __post_init__(self) -> None:
        tissue = tuple(_as_polygon(c, f"tissue[{i}]") for i, c in enumerate(self.tissue))
        holes_in = tuple(self.holes) if len(self.holes) else tuple(() for _ in tissue)
        if len(holes_in) != len(tissue):
            raise ValueError(
                f"holes must have one entry per tissue contour ({len(holes_in)} != {len(tissue)})"
            )
        holes = tuple(
            tuple(_as_polygon(h, f"holes[{i}][{j}]") for j, h in enumerate(hs))
            for i, hs in enumerate(holes_in)
        )
        object.__setattr__(self, "tissue", tissue)
        object.__setattr__(self, "holes", holes)
        object.__setattr__(self, "_cache", {})

    def __len__(self) -> int:
        return len(self.tissue)

    def is_empty(self) -> bool:
        """True when no tissue contour survived (the runner reports "no tissue found")."""
        return len(self.tissue) == 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TissueContours):
            return NotImplemented
        if len(self) != len(other):
            return False
        for a, b, ha, hb in zip(self.tissue, other.tissue, self.holes, other.holes, strict=True):
            if not np.array_equal(a, b) or len(ha) != len(hb):
                return False
            if not all(np.array_equal(x, y) for x, y in zip(ha, hb, strict=True)):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n_holes = sum(len(h) for h in self.holes)
        return f"TissueContours({len(self)} tissue contours, {n_holes} holes)"


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def area_unit(downsample: tuple[float, float], ref_patch_size: int = 512) -> int:
    """Seg-level pixels in one ``ref_patch_size``² level-0 patch (CLAM truncates to int).

    ``a_t``/``a_h`` are multiplied by this to get pixel areas at the segmentation level.

    >>> area_unit((16.0, 16.0)), area_unit((1.0, 1.0)), area_unit((1024.0, 1024.0))
    (1024, 262144, 0)
    """
    return int(ref_patch_size**2 / (float(downsample[0]) * float(downsample[1])))


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {array.shape} dtype {array.dtype}"
        )
    return np.ascontiguousarray(array[..., :3])


def _filter_contours(
    contours: Sequence[np.ndarray],
    hierarchy: np.ndarray,
    a_t_px: float,
    a_h_px: float,
    max_n_holes: int,
) -> tuple[list[int], list[list[int]]]:
    """CLAM's contour filter (§3.3) on findContours output; returns kept indices and holes.

    ``hierarchy`` is (M, 4) ``[next, prev, first_child, parent]``. Net area = outer area minus
    the area of all its holes; a contour is kept if net != 0 and net > a_t_px. Its holes are
    sorted by area (descending, stable), cut to ``max_n_holes``, then kept if area > a_h_px.
    """
    parent = hierarchy[:, 3]
    areas = np.array([cv2.contourArea(c) for c in contours], dtype=np.float64)
    hole_idx = np.flatnonzero(parent >= 0)
    hole_sum = np.bincount(parent[hole_idx], weights=areas[hole_idx], minlength=len(contours))
    outer = np.flatnonzero(parent == -1)
    net = areas[outer] - hole_sum[outer]
    kept = outer[(net != 0) & (net > a_t_px)]
    holes: list[list[int]] = []
    for idx in kept:  # loop over kept contours (few), never over pixels
        own = hole_idx[parent[hole_idx] == idx]
        own = own[np.argsort(-areas[own], kind="stable")][:max_n_holes]
        holes.append([int(h) for h in own if areas[h] > a_h_px])
    return [int(k) for k in kept], holes


def _select_ids(n: int, keep_ids: tuple[int, ...], exclude_ids: tuple[int, ...]) -> list[int]:
    """CLAM's keep/exclude rule (§3.4), ids in ascending order; bad ids raise.

    >>> _select_ids(4, (), (1,)), _select_ids(4, (3, 0, 1), (1,))
    ([0, 2, 3], [0, 3])
    """
    bad = sorted({i for i in (*keep_ids, *exclude_ids) if not 0 <= i < n})
    if bad:
        raise SegmentationError(
            f"keep_ids/exclude_ids {bad} out of range: segmentation kept {n} tissue contours "
            f"(ids 0..{n - 1}, as numbered in the _mask.jpg of a run without keep_ids/exclude_ids);"
            " fix the ids in the process list"
        )
    ids = set(keep_ids) - set(exclude_ids) if keep_ids else set(range(n)) - set(exclude_ids)
    return sorted(ids)


def segment_array(
    rgb: np.ndarray,
    downsample: tuple[float, float],
    params: SegmentationParams | None = None,
) -> TissueContours:
    """Segment tissue in a segmentation-level image, CLAM's ``segmentTissue`` (§3.2-§3.4).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        The whole segmentation level, RGB (an alpha channel is ignored).
    downsample : (dx, dy)
        Level-0 pixels per pixel of ``rgb``; scales areas and the output contours.
    params : SegmentationParams

    Returns
    -------
    TissueContours
        Level-0 int32 polygons (seg-level vertices x downsample, truncated); empty if no
        tissue passes the filters (never an exception for an empty mask).

    Examples
    --------
    >>> img = np.full((64, 64, 3), 255, np.uint8)
    >>> img[8:40, 8:40] = (220, 120, 180)            # one pink square
    >>> p = SegmentationParams(mthresh=1, close=0, a_t=0, a_h=0)
    >>> tc = segment_array(img, (4.0, 4.0), p)
    >>> len(tc), tc.tissue[0].min(axis=0).tolist(), tc.tissue[0].max(axis=0).tolist()
    (1, [32, 32], [156, 156])
    """
    p = params or SegmentationParams()
    image = _check_rgb(rgb)
    dx, dy = float(downsample[0]), float(downsample[1])
    saturation = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1])
    blurred = cv2.medianBlur(saturation, p.mthresh)
    if p.use_otsu:
        _, mask = cv2.threshold(blurred, 0, p.sthresh_up, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, mask = cv2.threshold(blurred, p.sthresh, p.sthresh_up, cv2.THRESH_BINARY)
    if p.close > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((p.close, p.close), np.uint8))
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or len(contours) == 0:
        return TissueContours()
    unit = area_unit((dx, dy), p.ref_patch_size)
    kept, kept_holes = _filter_contours(
        contours, hierarchy[0], p.a_t * unit, p.a_h * unit, p.max_n_holes
    )
    if not kept:
        return TissueContours()
    scale = np.array([dx, dy], dtype=np.float64)

    def to_l0(c: np.ndarray) -> np.ndarray:
        return (c.reshape(-1, 2) * scale).astype(np.int32)

    tissue = [to_l0(contours[k]) for k in kept]
    holes = [tuple(to_l0(contours[h]) for h in hs) for hs in kept_holes]
    chosen = _select_ids(len(tissue), p.keep_ids, p.exclude_ids)
    return TissueContours(tuple(tissue[i] for i in chosen), tuple(holes[i] for i in chosen))


def resolve_level(slide: Slide, level: int, downsample: float = AUTO_LEVEL_DOWNSAMPLE) -> int:
    """``level`` if >= 0 (checked against the slide), else the best level for ``downsample``."""
    if level < 0:
        return slide.best_level_for_downsample(downsample)
    slide.check_level(level)
    return level


def segment_slide(
    slide: Slide, params: SegmentationParams | None = None
) -> tuple[TissueContours, int]:
    """Segment a whole slide; returns the contours and the segmentation level actually used.

    ``seg_level`` -1 resolves to the best level for downsample 32 (CLAM's heatmap path). The
    level is read whole (the slide refuses levels above its size guard with a SlideError).
    """
    p = params or SegmentationParams()
    level = resolve_level(slide, p.seg_level)
    rgb = slide.read_level(level)
    return segment_array(rgb, slide.level_downsamples[level], p), level


# --------------------------------------------------------------------------------------------
# Tissue masks (CLAM get_seg_mask)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScaledContours:
    tissue: list[np.ndarray]
    holes: list[list[np.ndarray]]
    order: np.ndarray  # drawing order: contour area descending (stable)
    lo: np.ndarray  # (K, 2) scaled bbox minimum
    hi: np.ndarray  # (K, 2) scaled bbox maximum


def _scaled(tc: TissueContours, scale: tuple[float, float]) -> _ScaledContours:
    """Contours scaled like CLAM (int32 truncation), cached per scale for tile-by-tile use."""
    key = ("scaled", float(scale[0]), float(scale[1]))
    hit = tc._cache.get(key)
    if hit is None:
        s = np.array(key[1:], dtype=np.float64)
        tissue = [(c * s).astype(np.int32) for c in tc.tissue]
        holes = [[(h * s).astype(np.int32) for h in hs] for hs in tc.holes]
        areas = np.array([cv2.contourArea(c) for c in tissue], dtype=np.float64)
        hit = _ScaledContours(
            tissue=tissue,
            holes=holes,
            order=np.argsort(-areas, kind="stable"),
            lo=np.array([c.min(axis=0) for c in tissue], dtype=np.int64).reshape(-1, 2),
            hi=np.array([c.max(axis=0) for c in tissue], dtype=np.int64).reshape(-1, 2),
        )
        if len(tc._cache) > 16:
            tc._cache.clear()
        tc._cache[key] = hit
    return hit


def rasterize_tissue(
    tc: TissueContours,
    *,
    l0_origin: tuple[float, float],
    shape: tuple[int, int],
    scale: tuple[float, float],
    use_holes: bool = True,
) -> np.ndarray:
    """Tissue mask of one window, with CLAM's ``get_seg_mask`` semantics (§6.5).

    Parameters
    ----------
    tc : TissueContours
    l0_origin : (x, y)
        Level-0 position of the window's top-left pixel.
    shape : (h, w)
        Window size in target pixels.
    scale : (sx, sy)
        Target pixels per level-0 pixel (``1 / downsample`` of the target level).
    use_holes : bool
        Cut holes out of their contour.

    Returns
    -------
    (h, w) bool ndarray
        True on tissue. Contours are scaled with int32 truncation and shifted by
        ``int32(-l0_origin * scale)``; (contour, holes) pairs are drawn filled in order of
        contour area (descending), so an island inside a hole of a larger contour survives.
        Polygons whose box misses the window are skipped, so a small window is cheap.

    Examples
    --------
    >>> square = np.array([[0, 0], [7, 0], [7, 7], [0, 7]])
    >>> tc = TissueContours((square,), ((square // 2 + 2,),))
    >>> rasterize_tissue(tc, l0_origin=(2, 0), shape=(4, 4), scale=(0.5, 0.5)).astype(int)
    array([[1, 1, 1, 0],
           [0, 0, 1, 0],
           [0, 0, 1, 0],
           [1, 1, 1, 0]])
    """
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((max(h, 0), max(w, 0)), dtype=np.uint8)
    if tc.is_empty() or h <= 0 or w <= 0:
        return mask.astype(bool)
    sc = _scaled(tc, scale)
    offset = (np.asarray(l0_origin, dtype=np.float64) * np.asarray(scale) * -1).astype(np.int32)
    lo, hi = sc.lo + offset, sc.hi + offset
    visible = (lo[:, 0] < w) & (lo[:, 1] < h) & (hi[:, 0] >= 0) & (hi[:, 1] >= 0)
    off = (int(offset[0]), int(offset[1]))
    for i in sc.order[visible[sc.order]]:  # loop over contours, not pixels
        cv2.drawContours(mask, [sc.tissue[i]], -1, 1, thickness=cv2.FILLED, offset=off)
        if use_holes and sc.holes[i]:
            cv2.drawContours(mask, sc.holes[i], -1, 0, thickness=cv2.FILLED, offset=off)
    return mask.astype(bool)


# --------------------------------------------------------------------------------------------
# Point-in-polygon tests (CLAM util_classes) and patch grids
# --------------------------------------------------------------------------------------------


def _exact_sign(points: np.ndarray, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Sign of ``cv2.pointPolygonTest(poly, p, False)`` for integer points, vectorised.

    ``points`` (M, 2) int64; ``v0``/``v1`` (E, 2) int64 edge starts/ends (all edges of the
    polygon, or at least every edge whose y-range contains a point's y). Returns (M,) int8:
    0 on an edge or vertex, +1 inside (odd number of crossings of a ray towards +x), -1 outside.
    Exact integer arithmetic; processed in chunks of points to bound memory.

    >>> sq = np.array([[0, 0], [4, 0], [4, 4], [0, 4]])
    >>> _exact_sign(np.array([[2, 2], [4, 1], [5, 2], [0, 0]]), sq, np.roll(sq, -1, axis=0))
    array([ 1,  0, -1,  0], dtype=int8)
    """
    out = np.empty(len(points), dtype=np.int8)
    x0, y0, x1, y1 = v0[:, 0], v0[:, 1], v1[:, 0], v1[:, 1]
    xmin, xmax = np.minimum(x0, x1), np.maximum(x0, x1)
    ymin, ymax = np.minimum(y0, y1), np.maximum(y0, y1)
    rising = y1 > y0
    chunk = max(1, _EXACT_CHUNK // max(len(v0), 1))
    for start in range(0, len(points), chunk):  # chunks of points, bounded memory
        px = points[start : start + chunk, 0:1]
        py = points[start : start + chunk, 1:2]
        cross = (py - y0) * (x1 - x0) - (px - x0) * (y1 - y0)
        on_edge = (cross == 0) & (px >= xmin) & (px <= xmax) & (py >= ymin) & (py <= ymax)
        straddles = (y0 > py) != (y1 > py)
        ray_hits = straddles & np.where(rising, cross > 0, cross < 0)
        odd = (np.count_nonzero(ray_hits, axis=1) % 2) == 1
        out[start : start + chunk] = np.where(on_edge.any(axis=1), 0, np.where(odd, 1, -1))
    return out


class _EdgeBuckets:
    """Polygon edges grouped by horizontal bands of y, so each point meets only nearby edges.

    Only edges whose y-range contains a point's y can touch it or cross its ray, and all of
    them are listed in the point's band; this keeps the exact test cheap for contours with tens
    of thousands of vertices (CHAIN_APPROX_NONE outlines of large tissue).
    """

    def __init__(self, v0: np.ndarray, v1: np.ndarray) -> None:
        self.v0, self.v1 = v0, v1
        n_edges = len(v0)
        ymin = np.minimum(v0[:, 1], v1[:, 1])
        ymax = np.maximum(v0[:, 1], v1[:, 1])
        self.base = int(ymin.min())
        span = int(ymax.max()) - self.base + 1
        self.n_bands = int(np.clip(n_edges // 8, 1, 8192))
        self.height = max(1, -(-span // self.n_bands))
        first = (ymin - self.base) // self.height
        count = (ymax - self.base) // self.height - first + 1
        edge_ids = np.repeat(np.arange(n_edges), count)
        within = np.arange(len(edge_ids)) - np.repeat(np.cumsum(count) - count, count)
        band = np.repeat(first, count) + within
        order = np.argsort(band, kind="stable")
        self.edge_ids = edge_ids[order]
        self.starts = np.searchsorted(band[order], np.arange(self.n_bands + 1))

    def sign(self, points: np.ndarray) -> np.ndarray:
        out = np.full(len(points), -1, dtype=np.int8)
        band = (points[:, 1] - self.base) // self.height
        valid = np.flatnonzero((band >= 0) & (band < self.n_bands))
        if valid.size == 0:
            return out
        order = valid[np.argsort(band[valid], kind="stable")]
        bands, first = np.unique(band[order], return_index=True)
        bounds = [*first.tolist(), len(order)]
        for i, b in enumerate(bands.tolist()):  # loop over y-bands, each a vectorised batch
            rows = order[bounds[i] : bounds[i + 1]]
            edges = self.edge_ids[self.starts[b] : self.starts[b + 1]]
            if edges.size:
                out[rows] = _exact_sign(points[rows], self.v0[edges], self.v1[edges])
        return out


class _PolygonSign:
    """Fast exact ``pointPolygonTest`` sign for many points against one polygon.

    A raster of the polygon (level-0 / k, k chosen so it stays under the pixel budget) answers
    points far from the boundary; a 5-px band drawn along the edges marks points whose raster
    answer could be wrong, and those points (deduplicated) go to the exact integer test, which
    only meets the edges of their y-band. The result is therefore identical to OpenCV's test for
    every point, whatever k is.
    """

    def __init__(self, polygon: np.ndarray) -> None:
        poly = np.asarray(polygon, dtype=np.int64).reshape(-1, 2)
        self.v0 = poly
        self.v1 = np.roll(poly, -1, axis=0)
        self.lo = poly.min(axis=0)
        self.hi = poly.max(axis=0)
        span = self.hi - self.lo + 1
        self.k = max(1, math.ceil(math.sqrt(float(span[0]) * float(span[1]) / _RASTER_BUDGET_PX)))
        pad = 3
        self.origin = self.lo - pad * self.k
        size = span // self.k + 2 * pad + 2
        raster = np.zeros((int(size[1]), int(size[0])), dtype=np.uint8)
        fixed = np.rint((poly - self.origin) * ((1 << _SHIFT_BITS) / self.k)).astype(np.int32)
        cv2.fillPoly(raster, [fixed], 1, cv2.LINE_8, _SHIFT_BITS)
        cv2.polylines(raster, [fixed], True, 2, 5, cv2.LINE_8, _SHIFT_BITS)
        self.raster = raster
        self._buckets: _EdgeBuckets | None = None

    def sign(self, points: np.ndarray) -> np.ndarray:
        """(M,) int8 in {-1, 0, 1} for (M, 2) int64 level-0 points."""
        out = np.full(len(points), -1, dtype=np.int8)
        in_box = np.flatnonzero(np.all((points >= self.lo) & (points <= self.hi), axis=1))
        if in_box.size == 0:
            return out
        q = np.rint((points[in_box] - self.origin) / self.k).astype(np.intp)
        value = self.raster[q[:, 1], q[:, 0]]
        out[in_box[value == 1]] = 1
        near_edge = in_box[value == 2]
        if near_edge.size:
            if self._buckets is None:
                self._buckets = _EdgeBuckets(self.v0, self.v1)
            # neighbouring patches share test points: decide each distinct point once
            unique, inverse = np.unique(points[near_edge], axis=0, return_inverse=True)
            out[near_edge] = self._buckets.sign(unique)[inverse.reshape(-1)]
        return out


def _check_contour_fn(contour_fn: str) -> None:
    if contour_fn not in CONTOUR_FNS:
        raise ConfigError(f"contour_fn = {contour_fn!r}: must be one of {', '.join(CONTOUR_FNS)}")


def _test_points(
    l0_coords: np.ndarray, patch_size_l0: int, contour_fn: str, center_shift: float
) -> tuple[np.ndarray, bool]:
    """Points each patch tests against the contour, and whether all (vs any) must pass.

    Returns an (N, P, 2) int64 array (P = 1 or 4) and ``require_all``.

    >>> pts, need_all = _test_points(np.array([[0, 0]]), 100, "four_pt_hard", 0.5)
    >>> pts[0].tolist(), need_all
    ([[25, 25], [75, 75], [75, 25], [25, 75]], True)
    >>> _test_points(np.array([[0, 0]]), 100, "four_pt", 0.0)[0][0].tolist()
    [[50, 50]]
    """
    xy = l0_coords.astype(np.int64, copy=False)
    if contour_fn == "basic":
        return xy[:, None, :], True
    center = xy + patch_size_l0 // 2
    shift = int(patch_size_l0 // 2 * center_shift)
    if contour_fn == "center" or shift == 0:
        return center[:, None, :], True
    signs = np.array([[-1, -1], [1, 1], [1, -1], [-1, 1]], dtype=np.int64)
    return center[:, None, :] + shift * signs[None], contour_fn == "four_pt_hard"


class _ContourTester:
    """CLAM's ``isInContours`` for one tissue contour and its holes (§4.2, §4.3)."""

    def __init__(self, contour: np.ndarray, holes: Sequence[np.ndarray]) -> None:
        self.outer = _PolygonSign(contour)
        # Holes are tested at the float centre x + ps/2 (OpenCV does not round it): doubling
        # both the hole and the point keeps the test exact in integers.
        self.holes2 = [_PolygonSign(np.asarray(h, dtype=np.int64) * 2) for h in holes]

    def passes(
        self, l0_coords: np.ndarray, points: np.ndarray, require_all: bool, patch_size_l0: int
    ) -> np.ndarray:
        n, n_pts = points.shape[:2]
        inside = (self.outer.sign(points.reshape(-1, 2)) >= 0).reshape(n, n_pts)
        ok = inside.all(axis=1) if require_all else inside.any(axis=1)
        if self.holes2 and ok.any():
            idx = np.flatnonzero(ok)
            centre2 = l0_coords[idx].astype(np.int64) * 2 + patch_size_l0
            in_hole = np.zeros(len(idx), dtype=bool)
            for hole2 in self.holes2:  # few holes per contour (max_n_holes)
                in_hole |= hole2.sign(centre2) > 0
            ok[idx[in_hole]] = False
        return ok


def patch_in_tissue(
    l0_coords: np.ndarray,
    patch_size_l0: int,
    tc: TissueContours,
    *,
    contour_fn: ContourFn = "four_pt_hard",
    center_shift: float = 0.5,
) -> np.ndarray:
    """Which patches CLAM's tissue test keeps (§4.2, §4.3), vectorised.

    Parameters
    ----------
    l0_coords : (N, 2) int ndarray
        Level-0 (x, y) top-left corners.
    patch_size_l0 : int
        Level-0 patch side ``ps``.
    contour_fn : {"four_pt_hard", "four_pt", "four_pt_easy", "center", "basic"}
        ``basic``: top-left inside; ``center``: ``c = (x + ps//2, y + ps//2)`` inside;
        ``four_pt``/``four_pt_easy``: any of ``c ± (s, s)`` with ``s = int(ps//2 *
        center_shift)`` (centre only when s == 0); ``four_pt_hard``: all four.
    center_shift : float
        See :func:`center_shift_for_overlap`.

    Returns
    -------
    (N,) bool ndarray
        True if, for some tissue contour, the test passes (points on the edge count, like
        ``pointPolygonTest >= 0``) and the centre ``(x + ps/2, y + ps/2)`` is not strictly
        inside one of that contour's holes. Each contour is tested with its own holes, as in
        CLAM, and the answers equal OpenCV's ``pointPolygonTest`` exactly (no raster error).

    Examples
    --------
    >>> square = np.array([[0, 0], [99, 0], [99, 99], [0, 99]])
    >>> tc = TissueContours((square,))
    >>> xy = np.array([[0, 0], [70, 0], [90, 90]])  # inside, straddling the edge, outside
    >>> patch_in_tissue(xy, 40, tc).tolist(), patch_in_tissue(xy, 40, tc, contour_fn="four_pt")
    ([True, False, False], array([ True,  True, False]))
    """
    _check_contour_fn(contour_fn)
    coords = np.asarray(l0_coords).reshape(-1, 2).astype(np.int64)
    result = np.zeros(len(coords), dtype=bool)
    if tc.is_empty() or len(coords) == 0:
        return result
    points, require_all = _test_points(coords, int(patch_size_l0), contour_fn, center_shift)
    # Patches sorted by the left-most x of their test points, so each contour finds the
    # patches that can reach its bounding box by binary search instead of a full scan.
    p_min, p_max = points.min(axis=1), points.max(axis=1)
    spread = int((p_max[:, 0] - p_min[:, 0]).max())
    by_x = np.argsort(p_min[:, 0], kind="stable")
    sorted_x = p_min[by_x, 0]
    for contour, holes in zip(tc.tissue, tc.holes, strict=True):  # loop over contours only
        lo, hi = contour.min(axis=0).astype(np.int64), contour.max(axis=0).astype(np.int64)
        begin = np.searchsorted(sorted_x, lo[0] - spread, side="left")
        end = np.searchsorted(sorted_x, hi[0], side="right")
        near = by_x[begin:end]
        if require_all:  # every point must be inside, so inside the box
            reach = np.all((p_min[near] >= lo) & (p_max[near] <= hi), axis=1)
        else:  # some point must be inside: the points' box must meet the contour's box
            reach = np.all((p_max[near] >= lo) & (p_min[near] <= hi), axis=1)
        candidates = near[reach & ~result[near]]
        if candidates.size == 0:
            continue
        tester = _ContourTester(contour, holes)
        ok = tester.passes(coords[candidates], points[candidates], require_all, patch_size_l0)
        result[candidates[ok]] = True
    return result


def center_shift_for_overlap(overlap: float, use_center_shift: bool) -> float:
    """CLAM's four-point shift for the heatmap grid (§4.4), from ``overlap = 1 - step/patch``.

    >>> center_shift_for_overlap(0.5, False)
    0.0
    >>> [center_shift_for_overlap(o, True) for o in (0.0, 0.2, 0.25, 0.5, 0.9, 0.95, 0.99)]
    [0.375, 0.375, 0.5, 0.5, 0.5, 0.625, 0.625]
    """
    if not use_center_shift:
        return 0.0
    if not math.isfinite(overlap):
        raise ConfigError(f"overlap = {overlap}: must be a finite number below 1")
    if overlap < 0.25:
        return 0.375
    if overlap < 0.95:
        return 0.5
    return 0.625


def grid_coords(
    tc: TissueContours,
    *,
    patch_size_l0: int,
    step_l0: int,
    slide_dims: tuple[int, int],
    roi: tuple[int, int, int, int] | None = None,
    contour_fn: ContourFn = "four_pt_hard",
    center_shift: float = 0.5,
    use_padding: bool = True,
) -> np.ndarray:
    """CLAM's per-contour patch grid (``process_contour``, §4.1), level-0 top-left corners.

    For each contour in list order: start at its bounding rect ``(x0, y0, w, h)`` (OpenCV,
    inclusive width); end at ``x0 + w`` / ``y0 + h`` (padding on) or ``min(x0 + w, W0 - ps +
    1)`` (padding off); with ``roi = (x1, y1, x2, y2)`` (level 0) the start is raised to
    ``(x1, y1)`` and the end lowered to ``(x2, y2)``, and a contour outside the ROI is skipped.
    Candidates ``arange(x0, x_end, step) x arange(y0, y_end, step)`` are flattened x-major (for
    each x, every y) and kept if they pass that contour's test and are not in its holes (see
    :func:`patch_in_tissue`). Grids of different contours are not aligned (as in CLAM).

    Returns
    -------
    (N, 2) int64 ndarray
        Level-0 (x, y), contour after contour; (0, 2) when nothing qualifies.

    Examples
    --------
    >>> rect = np.array([[10, 20], [109, 20], [109, 119], [10, 119]])
    >>> tc = TissueContours((rect,))
    >>> grid_coords(tc, patch_size_l0=40, step_l0=40, slide_dims=(200, 200)).tolist()
    [[10, 20], [10, 60], [50, 20], [50, 60]]
    """
    _check_contour_fn(contour_fn)
    ps, step = int(patch_size_l0), int(step_l0)
    if ps <= 0 or step <= 0:
        raise ValueError(f"patch_size_l0 and step_l0 must be > 0, got {ps} and {step}")
    width, height = int(slide_dims[0]), int(slide_dims[1])
    found: list[np.ndarray] = []
    for contour, holes in zip(tc.tissue, tc.holes, strict=True):  # loop over contours only
        x0, y0, w, h = cv2.boundingRect(contour)
        if use_padding:
            x_end, y_end = x0 + w, y0 + h
        else:
            x_end, y_end = min(x0 + w, width - ps + 1), min(y0 + h, height - ps + 1)
        if roi is not None:
            x_end, y_end = min(int(roi[2]), x_end), min(int(roi[3]), y_end)
            x0, y0 = max(int(roi[0]), x0), max(int(roi[1]), y0)
            if x_end - x0 <= 0 or y_end - y0 <= 0:
                continue
        xs = np.arange(x0, x_end, step, dtype=np.int64)
        ys = np.arange(y0, y_end, step, dtype=np.int64)
        if xs.size == 0 or ys.size == 0:
            continue
        grid_x, grid_y = np.meshgrid(xs, ys, indexing="ij")
        candidates = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
        points, require_all = _test_points(candidates, ps, contour_fn, center_shift)
        keep = _ContourTester(contour, holes).passes(candidates, points, require_all, ps)
        found.append(candidates[keep])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(found, axis=0).astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# GeoJSON (instead of CLAM's pickle)
# --------------------------------------------------------------------------------------------

_TISSUE_PROPERTIES = {
    "objectType": "annotation",
    "classification": {"name": "Tissue", "color": [0, 200, 0]},
}


def _ring(polygon: np.ndarray) -> list[list[int]]:
    closed: list[list[int]] = np.vstack([polygon, polygon[:1]]).tolist()
    return closed


def contours_to_geojson(tc: TissueContours) -> dict[str, Any]:
    """A GeoJSON FeatureCollection QuPath can import: one Polygon per tissue contour.

    Rings are closed (first point repeated), outer ring first then its holes, coordinates in
    level-0 pixels. ``properties.tissue_id`` is the contour's index.

    >>> tri = np.array([[0, 0], [4, 0], [0, 4]])
    >>> fc = contours_to_geojson(TissueContours((tri,)))
    >>> fc["features"][0]["geometry"]
    {'type': 'Polygon', 'coordinates': [[[0, 0], [4, 0], [0, 4], [0, 0]]]}
    """
    features = []
    for i, (outer, holes) in enumerate(zip(tc.tissue, tc.holes, strict=True)):
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_ring(outer), *(_ring(h) for h in holes)],
                },
                "properties": {**json.loads(json.dumps(_TISSUE_PROPERTIES)), "tissue_id": i},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def save_geojson(tc: TissueContours, path: str | os.PathLike[str]) -> Path:
    """Save contours as GeoJSON (see :func:`contours_to_geojson`), atomically."""
    text = json.dumps(contours_to_geojson(tc), separators=(",", ":"))
    return write_bytes_atomic(path, text.encode("utf-8"))


def _ring_array(ring: Any, where: str) -> np.ndarray:
    array = np.asarray(ring, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2 or array.shape[0] == 0:
        raise ValueError(f"{where}: a ring must be a list of [x, y] positions")
    array = array[:, :2]
    if array.shape[0] >= 2 and np.array_equal(array[0], array[-1]):
        array = array[:-1]
    if not np.all(np.isfinite(array)) or np.abs(array).max() > 2**31 - 1:
        raise ValueError(f"{where}: coordinates must be finite level-0 pixels")
    return np.rint(array).astype(np.int32)


def load_geojson(path: str | os.PathLike[str]) -> TissueContours:
    """Read tissue contours written by :func:`save_geojson` (exact) or exported from QuPath.

    Accepts a FeatureCollection, a list of Features or one Feature, with Polygon or
    MultiPolygon geometries (each polygon becomes one tissue contour with its holes).
    Non-integer coordinates are rounded to the nearest pixel.
    """
    source = Path(path)
    fix = "re-create it with clam-heat or export Polygon annotations from QuPath as GeoJSON"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegmentationError(f"{source}: tissue GeoJSON not found ({fix})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SegmentationError(f"{source}: not readable as GeoJSON ({err}); {fix}") from None
    try:
        if isinstance(data, dict) and data.get("type") == "FeatureCollection":
            features = data.get("features")
        elif isinstance(data, dict) and data.get("type") == "Feature":
            features = [data]
        else:
            features = data
        if not isinstance(features, list):
            raise ValueError("expected a FeatureCollection or a list of Features")
        tissue: list[np.ndarray] = []
        holes: list[tuple[np.ndarray, ...]] = []
        for i, feature in enumerate(features):
            geometry = feature.get("geometry") if isinstance(feature, dict) else None
            kind = geometry.get("type") if isinstance(geometry, dict) else None
            if kind == "Polygon":
                polygons = [geometry["coordinates"]]
            elif kind == "MultiPolygon":
                polygons = list(geometry["coordinates"])
            else:
                raise ValueError(f"feature {i} has geometry {kind!r}, expected a Polygon")
            for rings in polygons:
                if not rings:
                    raise ValueError(f"feature {i} has a polygon without rings")
                tissue.append(_ring_array(rings[0], f"feature {i}"))
                holes.append(tuple(_ring_array(r, f"feature {i}") for r in rings[1:]))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise SegmentationError(f"{source}: not a tissue GeoJSON ({err}); {fix}") from None
    return TissueContours(tuple(tissue), tuple(holes))


# --------------------------------------------------------------------------------------------
# Overview image (CLAM visWSI -> <id>_mask.jpg)
# --------------------------------------------------------------------------------------------


def draw_overview(
    slide: Slide,
    tc: TissueContours,
    *,
    vis_level: int = -1,
    line_thickness: int = 250,
    number_contours: bool = True,
) -> np.ndarray:
    """The segmentation overview CLAM saves as ``<id>_mask.jpg`` (``visWSI``, §3.6).

    Returns an (h, w, 3) uint8 RGB image of the whole ``vis_level`` (-1: best level for 32x):
    tissue contours in green (0, 255, 0), holes in blue (0, 0, 255), line thickness
    ``int(line_thickness * sqrt(sx * sy))`` vis pixels (``line_thickness`` is in level-0 px;
    at least 1), and each contour's index in red at its centroid. CLAM's text (Hershey simplex,
    scale 2, thickness 10) is shrunk on images under 1000 px so it stays readable.
    """
    level = resolve_level(slide, vis_level)
    image = np.ascontiguousarray(slide.read_level(level)).copy()
    if tc.is_empty():
        return image
    dx, dy = slide.level_downsamples[level]
    scale = (1.0 / dx, 1.0 / dy)
    thickness = max(1, int(line_thickness * math.sqrt(scale[0] * scale[1])))
    sc = _scaled(tc, scale)
    h, w = image.shape[:2]
    factor = min(1.0, min(h, w) / 1000.0)
    font_scale = max(0.4, 2.0 * factor)
    font_thickness = max(1, round(10 * factor))
    for idx, contour in enumerate(sc.tissue):  # loop over contours only
        cv2.drawContours(image, [contour], -1, (0, 255, 0), thickness, lineType=cv2.LINE_8)
        if number_contours:
            moments = cv2.moments(contour)
            c_x = int(moments["m10"] / (moments["m00"] + 1e-9))
            c_y = int(moments["m01"] / (moments["m00"] + 1e-9))
            cv2.putText(
                image, str(idx), (c_x, c_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                (255, 0, 0), font_thickness,
            )  # fmt: skip
    for holes in sc.holes:
        if holes:
            cv2.drawContours(image, holes, -1, (0, 0, 255), thickness, lineType=cv2.LINE_8)
    return image


def save_overview_jpg(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save an RGB overview as JPEG (quality 75, as CLAM's PIL default), atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buffer, format="JPEG", quality=75)
    return write_bytes_atomic(path, buffer.getvalue())
