"""Exact overlap accumulation on a compressed grid of cells (docs/rules/heatmaps.md#drawing, 6-7).

A window's overlay is constant on the rectangles between consecutive patch edges (*cells*), so
patches are summed with integer difference arrays on that grid, never per pixel. Per-patch
values are split into exact fixed-point integers, which makes every pixel independent of the
tiling and of patch order (and equal to CLAM's sequential float64 sum whenever that sum is
exact, e.g. float32 scores). All coordinates are ``vis_`` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Cells",
    "Fixed",
    "accumulate_patches",
    "from_fixed",
    "paint_mask",
    "patch_rects",
    "to_fixed",
    "window_cells",
]

# Fixed-point layout used to sum patch values exactly (see to_fixed).
_HI_BITS = 40
_LO_BITS = 46


@dataclass(frozen=True)
class Fixed:
    """Patch values as exact integers: ``v = (hi + lo * 2**-46) * 2**-shift``."""

    hi: np.ndarray  # (N,) int64
    lo: np.ndarray  # (N,) int64
    shift: int


def to_fixed(values: np.ndarray) -> Fixed:
    """Split non-negative float64 values into two int64 limbs, exactly.

    The scale is chosen from the largest value so ``hi < 2**40``; values within 2**33 of the
    largest are exact (smaller ones lose bits below ``2**-(shift + 46)``). Integer sums are
    associative, so the overlay does not depend on tile boundaries or patch order.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size and (not np.isfinite(v).all() or (v < 0).any()):
        raise ValueError("patch values must be finite and >= 0")
    vmax = float(v.max()) if v.size else 0.0
    exponent = math.frexp(vmax)[1] if vmax > 0 else 0
    shift = _HI_BITS - exponent
    t = np.ldexp(v, shift)
    hi = np.floor(t)
    lo = np.floor(np.ldexp(t - hi, _LO_BITS))
    return Fixed(hi.astype(np.int64), lo.astype(np.int64), shift)


def from_fixed(hi_sum: np.ndarray, lo_sum: np.ndarray, shift: int) -> np.ndarray:
    """Correctly rounded float64 of ``(hi_sum + lo_sum * 2**-46) * 2**-shift``."""
    carry = lo_sum >> _LO_BITS
    hi = hi_sum + carry
    lo = lo_sum - (carry << _LO_BITS)
    return np.ldexp(hi.astype(np.float64) + np.ldexp(lo.astype(np.float64), -_LO_BITS), -shift)


@dataclass(frozen=True)
class Cells:
    """The overlay of one window on its cell grid (cells = spans between patch edges)."""

    ex: np.ndarray  # (nx + 1,) vis x edges, ex[0] = window x0, ex[-1] = window x1
    ey: np.ndarray  # (ny + 1,) vis y edges
    avg: np.ndarray  # (ny, nx) float64 overlay / counter (0 where no patch)
    count: np.ndarray  # (ny, nx) int64 counter (all patches)
    painted: np.ndarray  # (ny, nx) bool: covered by a patch with score >= threshold

    def expand(self, cells: np.ndarray) -> np.ndarray:
        """Cell array (ny, nx, ...) → pixel array (h, w, ...) of the window."""
        wide = np.repeat(cells, np.diff(self.ex), axis=1)
        return np.repeat(wide, np.diff(self.ey), axis=0)


def window_cells(
    rects: np.ndarray,
    fixed: Fixed,
    above: np.ndarray,
    window: tuple[int, int, int, int],
    *,
    binarize: bool,
    counts: np.ndarray | None = None,
) -> Cells:
    """Accumulate the patches ``rects`` (K, 4) = vis (x0, y0, x1, y1) over ``window``.

    Difference arrays on the cell grid (+v at a rectangle's top-left cell, -v at the cells past
    its right and bottom edges, +v past both), then two cumulative sums: O(K log K) for the
    edges plus O(cells), never O(pixels). ``counts`` (K,) says how many patches share each
    rectangle (their values already summed in ``fixed``; ``above``: any of them painted): the
    same sums as the patches one by one (None: one patch per rectangle).
    """
    wx0, wy0, wx1, wy1 = window
    x0 = np.clip(rects[:, 0], wx0, wx1)
    y0 = np.clip(rects[:, 1], wy0, wy1)
    x1 = np.clip(rects[:, 2], wx0, wx1)
    y1 = np.clip(rects[:, 3], wy0, wy1)
    inside = (x0 < x1) & (y0 < y1)
    if not inside.all():
        x0, y0, x1, y1 = x0[inside], y0[inside], x1[inside], y1[inside]
        hi, lo, above = fixed.hi[inside], fixed.lo[inside], above[inside]
        counts = None if counts is None else counts[inside]
    else:
        hi, lo = fixed.hi, fixed.lo
    ex = np.unique(np.concatenate(([wx0, wx1], x0, x1)))
    ey = np.unique(np.concatenate(([wy0, wy1], y0, y1)))
    nx, ny = len(ex), len(ey)
    ix0, ix1 = np.searchsorted(ex, x0), np.searchsorted(ex, x1)
    iy0, iy1 = np.searchsorted(ey, y0), np.searchsorted(ey, y1)
    flat = np.concatenate((iy0 * nx + ix0, iy0 * nx + ix1, iy1 * nx + ix0, iy1 * nx + ix1))
    size = nx * ny

    def integrate(weights: np.ndarray | None) -> np.ndarray:
        diff = np.zeros(size, dtype=np.int64)
        if weights is None:  # unit weights: exact in bincount's float64
            ones = np.ones(len(x0))
            signed = np.concatenate((ones, -ones, -ones, ones))
            diff += np.rint(np.bincount(flat, signed, minlength=size)).astype(np.int64)
        else:
            np.add.at(diff, flat, np.concatenate((weights, -weights, -weights, weights)))
        grid = diff.reshape(ny, nx).cumsum(axis=0).cumsum(axis=1)
        return grid[:-1, :-1]

    count = integrate(None if counts is None else counts.astype(np.int64))
    painted_count = count if above.all() else _integrate_subset(flat, above, nx, ny)
    hi_sum, lo_sum = integrate(hi), integrate(lo)
    avg = np.zeros(count.shape, dtype=np.float64)
    covered = count > 0
    avg[covered] = from_fixed(hi_sum[covered], lo_sum[covered], fixed.shift) / count[covered]
    if binarize:
        avg = np.around(avg)
    return Cells(ex, ey, avg, count, painted_count > 0)


def _integrate_subset(flat: np.ndarray, subset: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Cell counts of the patches in ``subset`` (bool over the K rects of ``flat``)."""
    w = subset.astype(np.float64)
    signed = np.concatenate((w, -w, -w, w))
    diff = np.rint(np.bincount(flat, signed, minlength=nx * ny)).astype(np.int64)
    return diff.reshape(ny, nx).cumsum(axis=0).cumsum(axis=1)[:-1, :-1]


def patch_rects(vis_xy: np.ndarray, vis_ps: Sequence[int], region: tuple[int, int]) -> np.ndarray:
    """(N, 4) int32 vis (x0, y0, x1, y1) rectangles clipped to the region (may be empty)."""
    xy = np.asarray(vis_xy, dtype=np.int64).reshape(-1, 2)
    w, h = region
    x0 = np.clip(xy[:, 0], 0, w)
    y0 = np.clip(xy[:, 1], 0, h)
    x1 = np.clip(xy[:, 0] + int(vis_ps[0]), 0, w)
    y1 = np.clip(xy[:, 1] + int(vis_ps[1]), 0, h)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int32)


def accumulate_patches(
    vis_xy: np.ndarray,
    vis_patch_size: int | Sequence[int],
    values: np.ndarray,
    shape: tuple[int, int],
    *,
    binarize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Overlap-averaged patch values on a (h, w) vis canvas.

    CLAM's rule: docs/rules/heatmaps.md#drawing, steps 6-7.

    Every patch adds its value over its square (clipped to the canvas) and 1 to the counter;
    the overlay is ``sum / counter`` where the counter is positive (``np.around`` of it when
    binarizing), 0 elsewhere. Values are summed exactly (see module docstring).

    Parameters
    ----------
    vis_xy : (N, 2) int ndarray
        Vis-frame top-left corners.
    vis_patch_size : int or (w, h)
    values : (N,) float ndarray, >= 0
        From :func:`patch_values`.
    shape : (h, w)

    Returns
    -------
    overlay : (h, w) float64 ndarray
    counter : (h, w) int64 ndarray

    Examples
    --------
    Two 2x2 patches overlapping on one column; the second is below threshold (value 0):

    >>> ov, cnt = accumulate_patches(np.array([[0, 0], [1, 1]]), 2, np.array([0.8, 0.0]), (4, 4))
    >>> ov
    array([[0.8, 0.8, 0. , 0. ],
           [0.8, 0.4, 0. , 0. ],
           [0. , 0. , 0. , 0. ],
           [0. , 0. , 0. , 0. ]])
    >>> cnt
    array([[1, 1, 0, 0],
           [1, 2, 1, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0]])
    """
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    cells = _canvas_cells(vis_xy, vis_patch_size, vals, vals > 0, shape, binarize=binarize)
    return cells.expand(cells.avg), cells.expand(cells.count)


def paint_mask(
    vis_xy: np.ndarray,
    vis_patch_size: int | Sequence[int],
    above: np.ndarray,
    shape: tuple[int, int],
) -> np.ndarray:
    """Pixels covered by at least one patch whose score reached the threshold (CLAM paints
    only those). Returns (h, w) bool.

    >>> paint_mask(np.array([[0, 0], [2, 2]]), 2, np.array([True, False]), (4, 4)).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 0, 0],
           [0, 0, 0, 0]])
    """
    sel = np.asarray(above, dtype=bool).reshape(-1)
    xy = np.asarray(vis_xy).reshape(-1, 2)[sel]
    cells = _canvas_cells(xy, vis_patch_size, np.ones(len(xy)), sel[sel], shape, binarize=False)
    return cells.expand(cells.painted)


def _canvas_cells(
    vis_xy: np.ndarray,
    vis_patch_size: int | Sequence[int],
    values: np.ndarray,
    above: np.ndarray,
    shape: tuple[int, int],
    *,
    binarize: bool,
) -> Cells:
    """The cells of a whole (h, w) canvas (one window from (0, 0))."""
    h, w = int(shape[0]), int(shape[1])
    ps = np.broadcast_to(np.asarray(vis_patch_size, dtype=np.int64), (2,))
    rects = patch_rects(vis_xy, ps, (w, h))
    return window_cells(rects, to_fixed(values), above, (0, 0, w, h), binarize=binarize)
