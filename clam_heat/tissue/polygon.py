"""Exact point-in-polygon signs for many points at once (``cv2.pointPolygonTest`` answers).

A raster answers points far from the boundary; points near an edge go to an exact integer test
that only meets the edges of their y-band, so the result never depends on the raster's scale.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Largest raster (pixels) built per polygon for the point tests; bigger polygons are rasterised
#: coarser (points near an edge are then decided exactly, so the answer does not change).
_RASTER_BUDGET_PX = 16_000_000


#: Elements (points x edges) handled at once by the exact point-in-polygon test.
_EXACT_CHUNK = 1_000_000


#: Sub-pixel bits used when drawing polygons (cv2 ``shift``), so coarse rasters keep precision.
_SHIFT_BITS = 4


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
