"""CLAM's patch grids and in-tissue tests (``process_contour``, ``isInContours``), vectorised.

Coordinates are level-0 (x, y) top-left corners. The contour tests (``basic``, ``center``,
``four_pt``, ``four_pt_hard``) and the hole test give exactly ``cv2.pointPolygonTest``'s
answers (see :mod:`.polygon`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import ConfigError
from .contours import TissueContours
from .params import CONTOUR_FNS, ContourFn
from .polygon import _PolygonSign


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
    """CLAM's ``isInContours`` for one tissue contour and its holes.

    See docs/rules/heatmaps.md#tissue-tests.
    """

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
    """Which patches CLAM's tissue test keeps (docs/rules/heatmaps.md#tissue-tests), vectorised.

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
    """CLAM's four-point shift for the heatmap grid, from ``overlap = 1 - step/patch``.

    See docs/rules/heatmaps.md#heatmap-grid.

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
    """CLAM's per-contour patch grid (``process_contour``), level-0 top-left corners.

    See docs/rules/heatmaps.md#patch-grid.

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
