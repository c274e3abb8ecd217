"""Tissue contours in level 0: the container, CLAM's tissue mask of any window, GeoJSON I/O.

All contours are stored in level 0 as ``(n, 2)`` int32 ``(x, y)`` polygons, in the order
OpenCV's ``findContours`` produced them (after filtering and id selection), like CLAM. GeoJSON
replaces CLAM's pickle (QuPath opens it; nothing executable is ever loaded).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from ..atomic import write_text_atomic
from ..errors import SegmentationError


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
    """Tissue mask of one window, with CLAM's ``get_seg_mask`` semantics.

    See docs/rules/heatmaps.md#tissue-mask.

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
    return write_text_atomic(path, text)


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
