"""Attention heatmaps: CLAM's drawing maths as pure functions, and a tile-streamed renderer.

Coordinate frames (named as in openslide's deepzoom): ``l0_`` values are level-0 pixels;
``vis_`` values are pixels of the heatmap's *region* at the vis level (the whole vis level, or
the ROI's box there), whose (0, 0) is the region's top-left; ``out_`` values are pixels of the
saved image (the region shrunk by ``custom_downsample``).

CLAM (``WholeSlideImage.visHeatmap``, spec §6.4) paints a full-size float canvas with a Python
loop per patch. Here the same picture is produced tile by tile: for each output tile only the
patches that touch it are accumulated, on a compressed grid of *cells* (the rectangles between
consecutive patch edges, inside which the overlay is constant), with integer difference arrays,
so the work per tile is numpy only and memory does not grow with the slide. Per-patch values
are summed in exact fixed-point integers, which makes every pixel independent of the tiling
(and equal to CLAM's sequential float64 sum whenever that sum is exact, e.g. float32 scores).

Deviations from CLAM, all deliberate and documented where they happen:

* ``custom_downsample`` shrinks with an exact block mean (``cv2.INTER_AREA`` on whole
  ``cd`` x ``cd`` blocks) instead of PIL's default bicubic filter, so tiles shrink exactly.
* the blending canvas is the canvas that was painted on (CLAM re-reads it with truncated
  integer downsamples, which misaligns on non-integer pyramids, spec §10.18).
* patch rectangles with negative vis coordinates are clipped at 0 (CLAM's numpy slicing would
  wrap around); such coordinates never come out of a valid patch grid.
* the tissue mask is rasterised in fixed :data:`MASK_TILE` blocks (OpenCV's polygon fill is not
  translation-invariant at image borders), so on regions wider or taller than a block a few
  pixels along tissue edges that cross a block border can differ from CLAM's one-shot mask.
* no tissue (``segment`` with an empty :class:`~clam_heat.segmentation.TissueContours`) paints
  nothing instead of crashing; no patches gives the bare canvas.

Memory: a JPEG/PNG output needs its whole RGB image once (encoders take whole images); tiles
are written straight into it. TIFF outputs (:func:`render_heatmap`'s ``pyramid_tiff_path``, or
a ``.tiff`` ``out_path``) are streamed in 256-row strips, so memory grows with the image width
and the number of patches, not with its area.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .errors import OutputError
from .threads import helper_threads

if TYPE_CHECKING:
    from .segmentation import TissueContours
    from .slide import Slide

__all__ = [
    "HeatmapSpec",
    "RenderResult",
    "accumulate_patches",
    "apply_colormap",
    "binarize_threshold",
    "blend",
    "blockmap_name",
    "colormap_index",
    "colormap_lut",
    "gaussian_ksize",
    "heatmap_image",
    "orig_name",
    "paint_mask",
    "patch_values",
    "percentile_of_scores",
    "production_heatmap_name",
    "render_heatmap",
    "save_orig",
    "to_percentiles",
    "vis_geometry",
    "write_attention_geojson",
]

#: TIFF tile side of the pyramidal overlay (and of plain .tiff outputs).
TIFF_TILE = 256
#: Side of the fixed blocks the tissue mask is rasterised in (vis px), and how many are cached.
MASK_TILE = 1024
MASK_CACHE_BLOCKS = 16
#: Largest image side libjpeg can encode.
JPEG_MAX_SIDE = 65500
#: JPEG quality of the pyramidal overlay's tiles.
PYRAMID_JPEG_QUALITY = 90
#: Vis level chosen for ``vis_level = -1`` (CLAM: best level for downsample 32).
AUTO_VIS_DOWNSAMPLE = 32.0

# Fixed-point layout used to sum patch values exactly (see _to_fixed).
_HI_BITS = 40
_LO_BITS = 46


# ============================================================================================
# Pure maths
# ============================================================================================


def to_percentiles(scores: np.ndarray) -> np.ndarray:
    """Rank percentiles of ``scores`` exactly as CLAM: average rank / N x 100, in (0, 100].

    Ties share their average rank (SciPy's ``rankdata(s, 'average') / N * 100``, computed
    with one numpy sort: O(N log N), no SciPy import). ``scores`` of any shape is flattened,
    as CLAM does for its (N, 1) attention arrays.

    Parameters
    ----------
    scores : (N,) or (N, 1) ndarray of float

    Returns
    -------
    (N,) float64 ndarray

    Raises
    ------
    ValueError
        If any score is NaN (a rank would be meaningless).

    Examples
    --------
    >>> to_percentiles(np.array([0.1, 0.5, 0.5, 0.9]))
    array([ 25. ,  62.5,  62.5, 100. ])
    >>> to_percentiles(np.array([[3.0], [1.0]]))
    array([100.,  50.])
    """
    flat = np.asarray(scores).reshape(-1)
    n = len(flat)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if flat.dtype.kind == "f" and np.isnan(flat).any():
        raise ValueError("scores contain NaN; percentiles need finite attention scores")
    order = np.argsort(flat)  # tie order is irrelevant: a tie group shares one rank
    ordered = flat[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, n))
    # average of the 1-based ranks start+1 .. start+size: exact halves, as scipy's rankdata
    group_rank = starts + (sizes + 1) / 2
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, sizes)
    return ranks / n * 100


def percentile_of_scores(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Percentile of each score within ``reference`` (CLAM's ``use_ref_scores``), in [0, 100].

    SciPy's ``percentileofscore(reference, s, kind='rank')`` for every ``s`` at once:
    ``(#ref < s + #ref <= s + [#ref <= s > #ref < s]) * 50 / n``, evaluated as
    ``(count * 50.0) / n`` like the SciPy versions CLAM was written against. Both inputs are
    flattened first (CLAM passes an (N, 1) reference, which current SciPy rejects, CLAM issue
    #192). One sort of the reference plus two binary searches: O((M + N) log N), not CLAM's
    O(M x N) loop.

    Parameters
    ----------
    scores : (M,) or (M, 1) ndarray of float
    reference : (N,) or (N, 1) ndarray of float, N >= 1

    Returns
    -------
    (M,) float64 ndarray
        Above the reference's max → 100, below its min → 0; NaN scores → NaN; a reference
        containing NaN makes every result NaN (SciPy's ``nan_policy='propagate'``).

    Examples
    --------
    >>> ref = np.array([[0.1], [0.5], [0.5], [0.9]])
    >>> percentile_of_scores(np.array([0.5, 0.2, 1.0, 0.0, 0.1]), ref)
    array([ 62.5,  25. , 100. ,   0. ,  25. ])
    """
    s = np.asarray(scores).reshape(-1)
    ref = np.asarray(reference).reshape(-1)
    n = len(ref)
    if n == 0:
        raise ValueError("reference scores are empty; percentiles need at least one reference")
    if ref.dtype.kind == "f" and np.isnan(ref).any():
        return np.full(s.shape, np.nan)
    ordered = np.sort(ref)
    left = np.searchsorted(ordered, s, side="left")
    right = np.searchsorted(ordered, s, side="right")
    total = left + right + (left < right)
    out = (total * 50.0) / n
    if s.dtype.kind == "f":
        out[np.isnan(s)] = np.nan
    return out


def binarize_threshold(binary_thresh: float, n: int) -> float:
    """CLAM's ``binary_thresh`` rule: a negative value means ``1 / n`` (n = number of patches).

    >>> binarize_threshold(-1, 4)
    0.25
    >>> binarize_threshold(0.3, 4)
    0.3
    """
    if binary_thresh < 0:
        if n <= 0:
            raise ValueError("binary_thresh -1 needs at least one patch (1 / number of patches)")
        return 1.0 / n
    return float(binary_thresh)


def patch_values(
    scores01: np.ndarray, threshold: float, *, binarize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch value added to the overlay, and whether the patch is painted.

    CLAM: a patch with score >= threshold adds its score (1.0 when binarizing) and is painted;
    any other patch adds 0.0 but still counts in the average, so it dims its neighbours.

    Parameters
    ----------
    scores01 : (N,) ndarray of float
        Scores on [0, 1] (percentiles / 100); the comparison runs in their dtype.
    threshold : float

    Returns
    -------
    values : (N,) float64 ndarray
    above : (N,) bool ndarray

    Examples
    --------
    >>> patch_values(np.array([0.2, 0.6]), 0.5)
    (array([0. , 0.6]), array([False,  True]))
    >>> patch_values(np.array([0.2, 0.6]), 0.5, binarize=True)[0]
    array([0., 1.])
    """
    s = np.asarray(scores01).reshape(-1)
    above = s >= threshold
    fill = np.ones(s.shape) if binarize else s.astype(np.float64)
    return np.where(above, fill, 0.0), above


def vis_geometry(
    l0_coords: np.ndarray,
    patch_size_l0: int | Sequence[int],
    downsample: Sequence[float],
    region_l0: tuple[int, int, int, int] | None = None,
    level_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Patch squares in the vis frame, as CLAM computes them (spec §6.4 steps 3-4).

    ``scale = 1 / downsample`` per axis; a ROI keeps the patches whose level-0 top-left lies in
    ``[x1, x2] x [y1, y2]`` (inclusive) and shifts them; then ``vis_xy = ceil(coords * scale)``
    and ``vis_ps = ceil(patch_size * scale)``.

    Parameters
    ----------
    l0_coords : (N, 2) int ndarray
        Level-0 (x, y) top-left corners.
    patch_size_l0 : int or (w, h)
        Level-0 footprint of a patch.
    downsample : (dx, dy)
        Vis level downsample.
    region_l0 : (x1, y1, x2, y2) or None
        ROI in level-0 pixels.
    level_size : (w, h)
        Vis level size; the region's size when there is no ROI.

    Returns
    -------
    keep : (N,) bool ndarray
        Patches kept by the ROI (all True without one).
    vis_xy : (K, 2) int64 ndarray
        Top-left corners of the kept patches, vis frame.
    vis_ps : (2,) int64 ndarray
        Patch (w, h) in vis pixels.
    region : (w, h)
        Region size in vis pixels.

    Examples
    --------
    >>> keep, xy, ps, region = vis_geometry(
    ...     np.array([[0, 0], [512, 256], [900, 0]]), 256, (4.0, 4.0), (256, 0, 800, 400))
    >>> keep.tolist(), xy.tolist(), ps.tolist(), region
    ([False, True, False], [[64, 64]], [64, 64], (136, 100))
    """
    coords = np.asarray(l0_coords, dtype=np.int64).reshape(-1, 2)
    scale = np.array([1.0 / float(downsample[0]), 1.0 / float(downsample[1])])
    ps = np.broadcast_to(np.asarray(patch_size_l0, dtype=np.float64), (2,))
    if region_l0 is not None:
        x1, y1, x2, y2 = (int(v) for v in region_l0)
        top_left, bot_right = np.array([x1, y1]), np.array([x2, y2])
        keep = np.all((coords >= top_left) & (coords <= bot_right), axis=1)
        coords = coords[keep] - top_left
        size = (bot_right * scale).astype(int) - (top_left * scale).astype(int)
        region = (int(size[0]), int(size[1]))
    else:
        if level_size is None:
            raise ValueError("level_size is required without a ROI")
        keep = np.ones(len(coords), dtype=bool)
        region = (int(level_size[0]), int(level_size[1]))
    vis_ps = np.ceil(ps * scale).astype(np.int64)
    vis_xy = np.ceil(coords * scale).astype(np.int64).reshape(-1, 2)
    return keep, vis_xy, vis_ps, region


def gaussian_ksize(vis_patch_size: Sequence[int], overlap: float) -> tuple[int, int]:
    """CLAM's blur kernel (kx, ky): ``int(ps * (1 - overlap)) * 2 + 1`` per axis.

    >>> gaussian_ksize((64, 64), 0.5)
    (65, 65)
    """
    k = (np.asarray(vis_patch_size, dtype=np.float64) * (1 - overlap)).astype(int) * 2 + 1
    return int(k[0]), int(k[1])


@functools.lru_cache(maxsize=32)
def colormap_lut(cmap: str) -> np.ndarray:
    """A colormap as a uint8 lookup table: N colours, then under, over and bad.

    Entries are ``uint8(rgba * 255)`` (truncation, as CLAM's ``(cmap(v) * 255).astype(uint8)``).
    Cached per name and read-only.

    Returns
    -------
    (N + 3, 3) uint8 ndarray, RGB

    Examples
    --------
    >>> lut = colormap_lut("gray")
    >>> lut.shape, lut[0].tolist(), lut[255].tolist()
    ((259, 3), [0, 0, 0], [255, 255, 255])
    """
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap name") from None
    n = int(cm.N)
    rgba = np.concatenate(
        [cm(np.arange(n)), [cm.get_under()], [cm.get_over()], [cm.get_bad()]], axis=0
    )
    lut = (np.asarray(rgba, dtype=np.float64) * 255)[:, :3].astype(np.uint8)
    lut.flags.writeable = False
    return lut


def colormap_index(values: np.ndarray, n: int) -> np.ndarray:
    """Matplotlib's float → colour index rule: ``int(v * n)``, 1.0 → n - 1, <0 → under (n),
    >=1 → over (n + 1), NaN → bad (n + 2).

    >>> colormap_index(np.array([0.0, 0.5, 0.999, 1.0, -0.1, 1.5, np.nan]), 256).tolist()
    [0, 128, 255, 255, 256, 257, 258]
    """
    xa = np.array(values, dtype=np.float64, copy=True)
    xa *= n
    xa[xa == n] = n - 1
    under = xa < 0
    over = xa >= n
    bad = np.isnan(xa)
    with np.errstate(invalid="ignore"):
        idx = xa.astype(np.int64)
    idx[under] = n
    idx[over] = n + 1
    idx[bad] = n + 2
    return idx


def apply_colormap(values: np.ndarray, cmap: str | np.ndarray) -> np.ndarray:
    """Colour ``values`` on [0, 1] with a matplotlib colormap (name or :func:`colormap_lut`).

    Returns ``values.shape + (3,)`` uint8 RGB, equal to CLAM's
    ``(cmap(values) * 255)[..., :3].astype(np.uint8)``.

    >>> apply_colormap(np.array([0.0, 1.0]), "jet").tolist()
    [[0, 0, 127], [127, 0, 0]]
    """
    lut = colormap_lut(cmap) if isinstance(cmap, str) else cmap
    return lut[colormap_index(values, lut.shape[0] - 3)]


def blend(colour: np.ndarray, canvas: np.ndarray, alpha: float) -> np.ndarray:
    """CLAM's blending: ``cv2.addWeighted(colour, alpha, canvas, 1 - alpha, 0)``.

    Each channel becomes ``round(alpha * colour + (1 - alpha) * canvas)`` (OpenCV rounds to the
    nearest, ties to even, in float32). ``alpha >= 1`` returns the colours unchanged (CLAM skips
    blending). Pixels where ``colour == canvas`` are unchanged for any alpha.

    Parameters
    ----------
    colour, canvas : (H, W, 3) uint8 ndarray

    Examples
    --------
    >>> c = np.full((1, 1, 3), 200, np.uint8); s = np.full((1, 1, 3), 100, np.uint8)
    >>> blend(c, s, 0.4)[0, 0].tolist(), blend(s, s, 0.4)[0, 0].tolist()
    ([140, 140, 140], [100, 100, 100])
    """
    if alpha >= 1:
        return colour
    return cv2.addWeighted(colour, float(alpha), canvas, 1.0 - float(alpha), 0.0)


# --------------------------------------------------------------------------------------------
# Exact overlap accumulation on a cell grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fixed:
    """Patch values as exact integers: ``v = (hi + lo * 2**-46) * 2**-shift``."""

    hi: np.ndarray  # (N,) int64
    lo: np.ndarray  # (N,) int64
    shift: int


def _to_fixed(values: np.ndarray) -> _Fixed:
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
    return _Fixed(hi.astype(np.int64), lo.astype(np.int64), shift)


def _from_fixed(hi_sum: np.ndarray, lo_sum: np.ndarray, shift: int) -> np.ndarray:
    """Correctly rounded float64 of ``(hi_sum + lo_sum * 2**-46) * 2**-shift``."""
    carry = lo_sum >> _LO_BITS
    hi = hi_sum + carry
    lo = lo_sum - (carry << _LO_BITS)
    return np.ldexp(hi.astype(np.float64) + np.ldexp(lo.astype(np.float64), -_LO_BITS), -shift)


@dataclass(frozen=True)
class _Cells:
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


def _window_cells(
    rects: np.ndarray,
    fixed: _Fixed,
    above: np.ndarray,
    window: tuple[int, int, int, int],
    *,
    binarize: bool,
) -> _Cells:
    """Accumulate the patches ``rects`` (K, 4) = vis (x0, y0, x1, y1) over ``window``.

    Difference arrays on the cell grid (+v at a rectangle's top-left cell, -v at the cells past
    its right and bottom edges, +v past both), then two cumulative sums: O(K log K) for the
    edges plus O(cells), never O(pixels).
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

    count = integrate(None)
    painted_count = count if above.all() else _integrate_subset(flat, above, nx, ny)
    hi_sum, lo_sum = integrate(hi), integrate(lo)
    avg = np.zeros(count.shape, dtype=np.float64)
    covered = count > 0
    avg[covered] = _from_fixed(hi_sum[covered], lo_sum[covered], fixed.shift) / count[covered]
    if binarize:
        avg = np.around(avg)
    return _Cells(ex, ey, avg, count, painted_count > 0)


def _integrate_subset(flat: np.ndarray, subset: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Cell counts of the patches in ``subset`` (bool over the K rects of ``flat``)."""
    w = subset.astype(np.float64)
    signed = np.concatenate((w, -w, -w, w))
    diff = np.rint(np.bincount(flat, signed, minlength=nx * ny)).astype(np.int64)
    return diff.reshape(ny, nx).cumsum(axis=0).cumsum(axis=1)[:-1, :-1]


def _rects(vis_xy: np.ndarray, vis_ps: Sequence[int], region: tuple[int, int]) -> np.ndarray:
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
    """Overlap-averaged patch values on a (h, w) vis canvas (CLAM §6.4 steps 6-7).

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
    h, w = int(shape[0]), int(shape[1])
    ps = np.broadcast_to(np.asarray(vis_patch_size, dtype=np.int64), (2,))
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    rects = _rects(vis_xy, ps, (w, h))
    cells = _window_cells(rects, _to_fixed(vals), vals > 0, (0, 0, w, h), binarize=binarize)
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
    h, w = int(shape[0]), int(shape[1])
    ps = np.broadcast_to(np.asarray(vis_patch_size, dtype=np.int64), (2,))
    sel = np.asarray(above, dtype=bool).reshape(-1)
    rects = _rects(np.asarray(vis_xy).reshape(-1, 2)[sel], ps, (w, h))
    ones = np.ones(len(rects))
    cells = _window_cells(rects, _to_fixed(ones), sel[sel], (0, 0, w, h), binarize=False)
    return cells.expand(cells.painted)


# ============================================================================================
# File names (spec §6.8)
# ============================================================================================


def production_heatmap_name(slide_id: str, heatmap_args: Mapping[str, Any], overlap: float) -> str:
    """CLAM's production heatmap file name.

    >>> args = dict(use_roi=False, blur=False, use_ref_scores=True, blank_canvas=False,
    ...             alpha=0.4, vis_level=1, binarize=False, binary_thresh=-1, save_ext="jpg")
    >>> production_heatmap_name("C3L-01663-21", args, 0.5)
    'C3L-01663-21_0.5_roi_0_blur_0_rs_1_bc_0_a_0.4_l_1_bi_0_-1.0.jpg'
    """
    keys = (
        "use_roi",
        "blur",
        "use_ref_scores",
        "blank_canvas",
        "alpha",
        "vis_level",
        "binarize",
        "binary_thresh",
        "save_ext",
    )
    missing = [k for k in keys if k not in heatmap_args]
    if missing:
        raise ValueError(f"heatmap_arguments lacks {', '.join(missing)} (needed for the file name)")
    a = heatmap_args
    return (
        f"{slide_id}_{float(overlap)}_roi_{int(a['use_roi'])}_blur_{int(a['blur'])}"
        f"_rs_{int(a['use_ref_scores'])}_bc_{int(a['blank_canvas'])}_a_{float(a['alpha'])}"
        f"_l_{int(a['vis_level'])}_bi_{int(a['binarize'])}_{float(a['binary_thresh'])}"
        f".{a['save_ext']}"
    )


def blockmap_name(slide_id: str) -> str:
    """The coarse heatmap's file name (in the raw results folder).

    >>> blockmap_name("s1")
    's1_blockmap.png'
    """
    return f"{slide_id}_blockmap.png"


def orig_name(slide_id: str, level: int, ext: str) -> str:
    """The plain slide image's file name.

    >>> orig_name("s1", 2, "jpg")
    's1_orig_2.jpg'
    """
    return f"{slide_id}_orig_{int(level)}.{ext}"


# ============================================================================================
# Renderer
# ============================================================================================


@dataclass(frozen=True)
class HeatmapSpec:
    """How one heatmap is drawn (CLAM ``visHeatmap`` arguments, with CLAM's meanings).

    ``vis_level`` -1 is resolved to the best level for downsample 32 when rendering.
    ``roi`` is level-0 (x1, y1, x2, y2). ``use_percentiles`` is CLAM's
    ``convert_to_percentiles``: without it the scores must already be on CLAM's 0-100 scale
    (e.g. from :func:`percentile_of_scores`). ``tile_size`` is the output tile side (pixels of
    the saved image); ``workers`` threads render tiles (0: two, or one in a local worker limited
    to one CPU thread; see :func:`~clam_heat.threads.helper_threads`).
    """

    vis_level: int = -1
    alpha: float = 0.4
    cmap: str = "jet"
    blank_canvas: bool = False
    blur: bool = False
    overlap: float = 0.0
    binarize: bool = False
    binary_thresh: float = -1.0
    use_percentiles: bool = False
    custom_downsample: int = 1
    segment: bool = True
    use_holes: bool = True
    roi: tuple[int, int, int, int] | None = None
    tile_size: int = 1024
    workers: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.vis_level < -1:
            problems.append(f"vis_level = {self.vis_level}: must be >= -1")
        if not self.alpha >= 0:
            problems.append(f"alpha = {self.alpha}: must be >= 0")
        if not 0 <= self.overlap < 1:
            problems.append(f"overlap = {self.overlap}: must be in [0, 1)")
        if int(self.custom_downsample) != self.custom_downsample or self.custom_downsample < 1:
            problems.append(f"custom_downsample = {self.custom_downsample}: must be an int >= 1")
        if self.tile_size < 16:
            problems.append(f"tile_size = {self.tile_size}: must be >= 16")
        if self.workers < 0:
            problems.append(f"workers = {self.workers}: must be >= 0")
        if self.roi is not None:
            if len(self.roi) != 4:
                problems.append(f"roi = {self.roi}: must be (x1, y1, x2, y2)")
            elif not (self.roi[2] > self.roi[0] and self.roi[3] > self.roi[1]):
                problems.append(f"roi = {self.roi}: needs x2 > x1 and y2 > y1")
        if problems:
            raise ValueError("HeatmapSpec: " + "; ".join(problems))
        colormap_lut(self.cmap)  # fails early on an unknown name


@dataclass(frozen=True)
class RenderResult:
    """What :func:`render_heatmap` produced.

    ``shape`` is the saved image's (h, w); ``image`` is the (h, w, 3) uint8 RGB image only
    when it was asked for (:func:`heatmap_image`).
    """

    shape: tuple[int, int]
    vis_level: int
    threshold: float
    n_patches: int
    paths: tuple[Path, ...]
    seconds: float
    image: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class _Plan:
    """Everything a tile needs, resolved once per render."""

    slide: Slide
    level: int
    scale: tuple[float, float]
    downsample: tuple[float, float]
    l0_top_left: tuple[int, int]
    region: tuple[int, int]  # (w, h) vis
    cd: int
    blank: bool
    alpha: float
    lut: np.ndarray
    binarize: bool
    rects: np.ndarray  # (K, 4) vis rects
    fixed: _Fixed
    above: np.ndarray
    ksize: tuple[int, int] | None
    tissue: Any
    use_holes: bool
    seg_offset: tuple[int, int]
    # tile buckets
    ntx: int = 0
    tile_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    tile_patches: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _mask_cache: OrderedDict[tuple[int, int], np.ndarray] = field(default_factory=OrderedDict)
    _mask_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def halo(self) -> tuple[int, int]:
        if self.ksize is None:
            return 0, 0
        return 2 * (self.ksize[0] // 2), 2 * (self.ksize[1] // 2)

    def bucket(self, tile: tuple[int, int], n_tiles: tuple[int, int]) -> None:
        """Assign each patch to every output tile (w, h) whose (haloed) vis window it touches.

        One vectorised pass: (tile, patch) pairs sorted by tile, so a tile's patches are one
        slice (O(patches in tile) per tile, never a scan of all patches).
        """
        ntx, nty = n_tiles
        self.ntx = ntx
        vtw, vth = tile[0] * self.cd, tile[1] * self.cd
        hx, hy = self.halo
        r = self.rects
        ax, bx = (r[:, 0] - hx) // vtw, (r[:, 2] - 1 + hx) // vtw
        ay, by = (r[:, 1] - hy) // vth, (r[:, 3] - 1 + hy) // vth
        ok = (r[:, 0] < r[:, 2]) & (r[:, 1] < r[:, 3]) & (bx >= 0) & (by >= 0)
        ok &= (ax < ntx) & (ay < nty)
        ax, bx = np.clip(ax, 0, ntx - 1), np.clip(bx, 0, ntx - 1)
        ay, by = np.clip(ay, 0, nty - 1), np.clip(by, 0, nty - 1)
        nx = np.where(ok, bx - ax + 1, 0)
        ny = np.where(ok, by - ay + 1, 0)
        per = nx * ny
        total = int(per.sum())
        pid = np.repeat(np.arange(len(r), dtype=np.int64), per)
        offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
        tx = ax[pid] + offs % nx[pid]
        ty = ay[pid] + offs // nx[pid]
        tid = ty * ntx + tx
        order = np.argsort(tid, kind="stable")
        self.tile_patches = pid[order]
        self.tile_starts = np.searchsorted(tid[order], np.arange(ntx * nty + 1))

    def patches_of(self, tx: int, ty: int) -> np.ndarray:
        t = ty * self.ntx + tx
        return self.tile_patches[self.tile_starts[t] : self.tile_starts[t + 1]]

    def canvas(self, vx0: int, vy0: int, w: int, h: int) -> np.ndarray:
        """Slide pixels (or white) of a vis window, (h, w, 3) uint8 RGB."""
        if self.blank:
            return np.full((h, w, 3), 255, dtype=np.uint8)
        l0_x = self.l0_top_left[0] + int(round(vx0 * self.downsample[0]))
        l0_y = self.l0_top_left[1] + int(round(vy0 * self.downsample[1]))
        return self.slide.read_region((l0_x, l0_y), self.level, (w, h))

    def tissue_window(self, vx0: int, vy0: int, w: int, h: int) -> np.ndarray | None:
        """CLAM's seg mask over a vis window, (h, w) bool (None: no masking).

        Contours are rasterised on a fixed grid of :data:`MASK_TILE` blocks of the region, never
        on the window itself: OpenCV's polygon fill clips edges at the image border, so a mask
        drawn on an arbitrary window is not a crop of the full mask. Composing fixed blocks
        makes every pixel independent of the render tiling (it equals CLAM's full-region mask
        except, at most, a few boundary pixels where a tissue edge crosses a block border).
        """
        if self.tissue is None:
            return None
        mask = np.zeros((h, w), dtype=bool)
        if isinstance(self.tissue, np.ndarray):
            src = self.tissue[vy0 : vy0 + h, vx0 : vx0 + w]
            mask[: src.shape[0], : src.shape[1]] = src
            return mask
        m = MASK_TILE
        for my in range(vy0 // m, (vy0 + h - 1) // m + 1):  # a few blocks per window
            for mx in range(vx0 // m, (vx0 + w - 1) // m + 1):
                block = self._mask_block(mx, my)
                bx0, by0 = mx * m, my * m
                x0, y0 = max(vx0, bx0), max(vy0, by0)
                x1, y1 = min(vx0 + w, bx0 + m), min(vy0 + h, by0 + m)
                mask[y0 - vy0 : y1 - vy0, x0 - vx0 : x1 - vx0] = block[
                    y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0
                ]
        return mask

    def _mask_block(self, mx: int, my: int) -> np.ndarray:
        """One (MASK_TILE, MASK_TILE) block of the tissue mask, cached (threads share it)."""
        key = (mx, my)
        with self._mask_lock:
            hit = self._mask_cache.get(key)
            if hit is not None:
                self._mask_cache.move_to_end(key)
                return hit
        from .segmentation import rasterize_tissue

        # rasterize_tissue shifts by int32(-l0_origin * scale); choose l0_origin so that this
        # is exactly CLAM's region offset minus the block position (always <= 0), float-safe.
        dx = self.seg_offset[0] - mx * MASK_TILE
        dy = self.seg_offset[1] - my * MASK_TILE
        origin = ((0.5 - dx) / self.scale[0], (0.5 - dy) / self.scale[1])
        block = rasterize_tissue(
            self.tissue,
            l0_origin=origin,
            shape=(MASK_TILE, MASK_TILE),
            scale=self.scale,
            use_holes=self.use_holes,
        )
        with self._mask_lock:
            self._mask_cache[key] = block
            while len(self._mask_cache) > MASK_CACHE_BLOCKS:
                self._mask_cache.popitem(last=False)
        return block

    def colours(self, values: np.ndarray) -> np.ndarray:
        return self.lut[colormap_index(values, self.lut.shape[0] - 3)]

    def render_window(self, tx: int, ty: int, window: tuple[int, int, int, int]) -> np.ndarray:
        """The blended heatmap of one vis window (x0, y0, x1, y1), (h, w, 3) uint8 RGB."""
        vx0, vy0, vx1, vy1 = window
        w, h = vx1 - vx0, vy1 - vy0
        idx = self.patches_of(tx, ty)
        rects, above = self.rects[idx], self.above[idx]
        fixed = _Fixed(self.fixed.hi[idx], self.fixed.lo[idx], self.fixed.shift)
        if self.ksize is None:
            canvas = self.canvas(vx0, vy0, w, h)
            if not above.any():
                return canvas
            cells = _window_cells(rects, fixed, above, window, binarize=self.binarize)
            if not cells.painted.any():
                return canvas
            paint = cells.expand(cells.painted)
            tissue = self.tissue_window(vx0, vy0, w, h)
            if tissue is not None:
                paint &= tissue
            img = canvas.copy()
            _paint(img, cells.expand(self.colours(cells.avg)), paint)
            return blend(img, canvas, self.alpha)
        return self._render_blurred(rects, fixed, above, window)

    def _render_blurred(
        self,
        rects: np.ndarray,
        fixed: _Fixed,
        above: np.ndarray,
        window: tuple[int, int, int, int],
    ) -> np.ndarray:
        """Blur needs halos: the overlay blur reads r px around the painted window, and the
        image blur reads r px around the tile, so the overlay is built on tile + 2r."""
        assert self.ksize is not None
        vx0, vy0, vx1, vy1 = window
        rw, rh = self.region
        rx, ry = self.ksize[0] // 2, self.ksize[1] // 2
        # outer window (tile + 2r) for the overlay, inner (tile + r) for the painted image
        o = (
            max(vx0 - 2 * rx, 0),
            max(vy0 - 2 * ry, 0),
            min(vx1 + 2 * rx, rw),
            min(vy1 + 2 * ry, rh),
        )
        i = (max(vx0 - rx, 0), max(vy0 - ry, 0), min(vx1 + rx, rw), min(vy1 + ry, rh))
        cells = _window_cells(rects, fixed, above, o, binarize=self.binarize)
        overlay = cv2.GaussianBlur(cells.expand(cells.avg), self.ksize, 0)
        inner = (slice(i[1] - o[1], i[3] - o[1]), slice(i[0] - o[0], i[2] - o[0]))
        paint = cells.expand(cells.painted)[inner]
        iw, ih = i[2] - i[0], i[3] - i[1]
        canvas = self.canvas(i[0], i[1], iw, ih)
        tissue = self.tissue_window(i[0], i[1], iw, ih)
        if tissue is not None:
            paint &= tissue
        img = canvas.copy()
        _paint(img, self.colours(overlay[inner]), np.ascontiguousarray(paint))
        img = cv2.GaussianBlur(img, self.ksize, 0)
        crop = (slice(vy0 - i[1], vy1 - i[1]), slice(vx0 - i[0], vx1 - i[0]))
        return blend(
            np.ascontiguousarray(img[crop]), np.ascontiguousarray(canvas[crop]), self.alpha
        )

    def render_tile(self, tx: int, ty: int, out_box: tuple[int, int, int, int]) -> np.ndarray:
        """Output tile ``out_box`` (x0, y0, x1, y1) in saved-image pixels."""
        cd = self.cd
        ox0, oy0, ox1, oy1 = out_box
        rgb = self.render_window(tx, ty, (ox0 * cd, oy0 * cd, ox1 * cd, oy1 * cd))
        return _shrink(rgb, cd)


def _paint(img: np.ndarray, colour: np.ndarray, where: np.ndarray) -> None:
    """``img[where] = colour[where]`` in place (OpenCV's masked copy: ~10x numpy's)."""
    cv2.copyTo(colour, where.view(np.uint8), img)


def _shrink(rgb: np.ndarray, cd: int) -> np.ndarray:
    """Exact ``cd`` x ``cd`` block mean (input sides are multiples of ``cd``)."""
    if cd == 1:
        return rgb
    h, w = rgb.shape[0] // cd, rgb.shape[1] // cd
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)


def _resolve_level(slide: Slide, vis_level: int) -> int:
    level = vis_level if vis_level >= 0 else slide.best_level_for_downsample(AUTO_VIS_DOWNSAMPLE)
    slide.check_level(level)
    return level


def _plan(
    slide: Slide,
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    spec: HeatmapSpec,
    tissue: TissueContours | np.ndarray | None,
) -> tuple[_Plan, float, int]:
    level = _resolve_level(slide, spec.vis_level)
    ds = slide.level_downsamples[level]
    coords = np.asarray(l0_coords).reshape(-1, 2)
    flat = np.asarray(scores).reshape(-1)
    if len(flat) != len(coords):
        raise ValueError(f"{len(flat)} scores for {len(coords)} coords; they must pair up")
    if flat.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {flat.dtype}")
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("scores contain NaN or inf; a heatmap needs finite attention scores")
    threshold = binarize_threshold(spec.binary_thresh, len(flat)) if spec.binarize else 0.0
    keep, vis_xy, vis_ps, region = vis_geometry(
        coords, patch_size_l0, ds, spec.roi, slide.level_dimensions[level]
    )
    if region[0] <= 0 or region[1] <= 0:
        raise ValueError(f"roi {spec.roi} is empty at vis level {level} (region {region})")
    kept = flat[keep]
    pct = to_percentiles(kept) if spec.use_percentiles else kept
    values, above = patch_values(pct / 100, threshold, binarize=spec.binarize)
    scale = (1.0 / float(ds[0]), 1.0 / float(ds[1]))
    top_left = (0, 0) if spec.roi is None else (int(spec.roi[0]), int(spec.roi[1]))
    seg_offset = (np.asarray(top_left, dtype=np.float64) * np.asarray(scale) * -1).astype(np.int32)
    use_tissue = tissue if spec.segment else None
    if isinstance(use_tissue, np.ndarray) and use_tissue.shape != (region[1], region[0]):
        raise ValueError(
            f"tissue mask shape {use_tissue.shape} != region (h, w) {(region[1], region[0])}"
        )
    rects = _rects(vis_xy, vis_ps, region)
    visible = (rects[:, 0] < rects[:, 2]) & (rects[:, 1] < rects[:, 3])  # others add nothing
    plan = _Plan(
        slide=slide,
        level=level,
        scale=scale,
        downsample=(float(ds[0]), float(ds[1])),
        l0_top_left=top_left,
        region=region,
        cd=int(spec.custom_downsample),
        blank=spec.blank_canvas,
        alpha=float(spec.alpha),
        lut=colormap_lut(spec.cmap),
        binarize=spec.binarize,
        rects=rects[visible],
        fixed=_to_fixed(values[visible]),
        above=above[visible],
        ksize=gaussian_ksize(vis_ps, spec.overlap) if spec.blur else None,
        tissue=use_tissue,
        use_holes=spec.use_holes,
        seg_offset=(int(seg_offset[0]), int(seg_offset[1])),
    )
    return plan, threshold, int(keep.sum())


# --------------------------------------------------------------------------------------------
# Streaming engine and sinks
# --------------------------------------------------------------------------------------------


def _atomic_target(path: Path) -> Path:
    """A unique temp name beside ``path`` that keeps its extension (``.name.tmp-XXXX.jpg``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    except OSError as err:
        raise OutputError(f"{path}: cannot write here ({err.strerror or err})") from None
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot move the finished file into place ({err})") from None


def _write_bytes(path: Path, data: bytes | memoryview | np.ndarray) -> None:
    tmp = _atomic_target(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: writing failed ({err.strerror or err})") from None
    _commit(tmp, path)


def _image_format(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext in ("jpg", "jpeg", "png", "tif", "tiff"):
        return ext
    raise OutputError(f"{path}: unsupported image extension (use jpg, jpeg, png, tif or tiff)")


def _encode(img: np.ndarray, fmt: str) -> bytes:
    """Encode like CLAM's PIL save: ``jpg`` → quality 100, ``jpeg`` → PIL's default 75 (both
    4:2:0, byte-identical to PIL's libjpeg output), ``png`` → zlib level 6."""
    import imagecodecs

    if fmt == "jpg":
        return bytes(imagecodecs.jpeg8_encode(img, level=100))
    if fmt == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(img, level=75))
    return bytes(imagecodecs.png_encode(img, level=6))


class _Sink:
    """Receives the saved image strip by strip (rows in order)."""

    def push(self, y0: int, strip: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> Path | None:  # pragma: no cover - interface
        raise NotImplementedError

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Drop partial output after a failure."""


class _ArraySink(_Sink):
    """Holds the whole image (JPEG/PNG need it); optionally encodes it to ``path``."""

    def __init__(self, width: int, height: int, path: Path | None, fmt: str = "") -> None:
        self.image = np.empty((height, width, 3), dtype=np.uint8)
        self.path, self.fmt = path, fmt

    def strip_view(self, y0: int, y1: int) -> np.ndarray:
        return self.image[y0:y1]

    def push(self, y0: int, strip: np.ndarray) -> None:
        view = self.image[y0 : y0 + strip.shape[0]]
        if not np.shares_memory(view, strip):
            view[...] = strip

    def close(self) -> Path | None:
        if self.path is None:
            return None
        _write_bytes(self.path, _encode(self.image, self.fmt))
        return self.path


class _TiffSink(_Sink):
    """Streams strips into a tiled TIFF on a writer thread; with ``pyramid`` also writes
    reduced levels (2x block means, separate pages with subfiletype=1, not SubIFDs).

    Memory stays at a few tile rows: each reduced level is spooled to a raw temp file while
    the level above is written, then streamed back for its own page.
    """

    def __init__(
        self, path: Path, width: int, height: int, *, mpp: float | None, pyramid: bool
    ) -> None:
        self.path, self.width, self.height = path, width, height
        self.mpp, self.pyramid = mpp, pyramid
        self.tmp = _atomic_target(path)
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.spools: list[Path] = []
        self.thread = threading.Thread(target=self._run, name=f"tiff-{path.name}", daemon=True)
        self.thread.start()

    def push(self, y0: int, strip: np.ndarray) -> None:
        while True:
            if self.error is not None or not self.thread.is_alive():
                self._raise()
            try:
                self.queue.put(strip, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> Path:
        while self.thread.is_alive():  # the writer may already be done with level 0's rows
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()
        if self.error is not None:
            self._raise()
        _commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)
            self.thread.join(timeout=10)
        self.tmp.unlink(missing_ok=True)
        for spool in self.spools:
            spool.unlink(missing_ok=True)

    def _raise(self) -> None:
        err = self.error
        self.abort()
        if isinstance(err, OutputError):
            raise err
        raise OutputError(f"{self.path}: TIFF writing failed ({err})") from err

    # writer thread ---------------------------------------------------------------------------

    def _strips_from_queue(self) -> Iterator[np.ndarray]:
        while True:
            strip = self.queue.get()
            if strip is None:
                return
            if self.error is not None:
                raise RuntimeError("aborted")
            yield strip

    def _run(self) -> None:
        import tifffile

        try:
            w, h = self.width, self.height
            bigtiff = w * h * 3 * (4 / 3 if self.pyramid else 1) > 2**31
            with tifffile.TiffWriter(self.tmp, bigtiff=bigtiff) as tw:
                source: Iterator[np.ndarray] = self._strips_from_queue()
                level = 0
                while True:
                    last = not self.pyramid or max(w, h) <= TIFF_TILE or min(w, h) < 2
                    spool = None if last else self._new_spool()
                    tiles = _tiff_tiles(source, w, h, spool)
                    self._write_page(tw, tiles, w, h, level)
                    # tifffile stops pulling after the last tile: close the generators so the
                    # spool is flushed (and a read-back spool deleted) before the next page
                    tiles.close()
                    if level:
                        source.close()  # type: ignore[attr-defined]
                    if spool is None:
                        break
                    w, h, level = w // 2, h // 2, level + 1
                    source = _read_spool(spool, w, h)
        except BaseException as err:  # noqa: BLE001 - reported to the producer
            self.error = err
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _new_spool(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.level-")
        os.close(fd)
        spool = Path(name)
        self.spools.append(spool)
        return spool

    def _write_page(self, tw: Any, tiles: Iterator[np.ndarray], w: int, h: int, level: int) -> None:
        kwargs: dict[str, Any] = {
            "shape": (h, w, 3),
            "dtype": np.uint8,
            "tile": (TIFF_TILE, TIFF_TILE),
            "photometric": "rgb",
            "metadata": None,
        }
        if self.pyramid:
            kwargs.update(
                compression="jpeg",
                compressionargs={"level": PYRAMID_JPEG_QUALITY, "outcolorspace": "rgb"},
                subsampling=(1, 1),
                subfiletype=0 if level == 0 else 1,
            )
        if self.mpp:
            per_cm = 1e4 / (self.mpp * 2**level)
            kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        if level == 0:
            kwargs["software"] = "clam-heat"
        tw.write(tiles, **kwargs)


def _tiff_tiles(
    strips: Iterator[np.ndarray], width: int, height: int, spool: Path | None
) -> Iterator[np.ndarray]:
    """Re-chunk row strips into TIFF tiles (row-major, zero-padded); spool 2x reductions."""
    t = TIFF_TILE
    carry = np.zeros((0, width, 3), dtype=np.uint8)
    rows_done = 0
    fh = open(spool, "wb") if spool is not None else None  # noqa: SIM115 - closed below
    try:

        def emit(block: np.ndarray) -> Iterator[np.ndarray]:
            if fh is not None:
                even_h, even_w = block.shape[0] // 2 * 2, width // 2 * 2
                if even_h:
                    small = cv2.resize(
                        np.ascontiguousarray(block[:even_h, :even_w]),
                        (even_w // 2, even_h // 2),
                        interpolation=cv2.INTER_AREA,
                    )
                    fh.write(np.ascontiguousarray(small).tobytes())
            for x in range(0, width, t):
                tile = block[:, x : x + t]
                if tile.shape[0] != t or tile.shape[1] != t:
                    padded = np.zeros((t, t, 3), dtype=np.uint8)
                    padded[: tile.shape[0], : tile.shape[1]] = tile
                    tile = padded
                yield np.ascontiguousarray(tile)

        for strip in strips:
            carry = np.concatenate([carry, strip], axis=0) if len(carry) else strip
            while len(carry) >= t:
                yield from emit(carry[:t])
                rows_done += t
                carry = carry[t:]
        if rows_done + len(carry) != height:
            raise RuntimeError(f"got {rows_done + len(carry)} rows for a {height}-row page")
        if len(carry):
            yield from emit(carry)
    finally:
        if fh is not None:
            fh.close()


def _read_spool(spool: Path, width: int, height: int) -> Iterator[np.ndarray]:
    """Stream a spooled level back in TIFF-tile-row strips, deleting the file at the end."""
    row_bytes = width * 3
    try:
        with open(spool, "rb") as fh:
            done = 0
            while done < height:
                n = min(TIFF_TILE, height - done)
                data = fh.read(n * row_bytes)
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, width, 3)
                done += n
    finally:
        spool.unlink(missing_ok=True)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up on first use (None elsewhere)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS after each strip (glibc only).

    Tile temporaries freed by worker threads otherwise stay in glibc's per-thread arenas, which
    shows up as ~100 MB of extra RSS on a 75 Mpx render; one ``malloc_trim`` per strip costs
    about a millisecond.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _tile_shape(tile_size: int, sinks: Sequence[_Sink]) -> tuple[int, int]:
    """Output tile (w, h): square when the whole image is kept anyway; otherwise one TIFF tile
    row high, so the strips in flight (and RSS) stay a few TIFF rows whatever the slide size."""
    if any(isinstance(s, _ArraySink) for s in sinks):
        return tile_size, tile_size
    return max(2 * tile_size, TIFF_TILE), TIFF_TILE


def _stream(
    render_tile: Callable[[int, int, tuple[int, int, int, int]], np.ndarray],
    width: int,
    height: int,
    tile: tuple[int, int],
    sinks: Sequence[_Sink],
    workers: int,
) -> None:
    """Render output tiles on a thread pool and feed every sink whole strips, in order.

    With the whole image in memory two strips are in flight, so the pool never idles at a strip
    boundary; streaming-only (TIFF) strips are thin and many tiles wide, so one at a time keeps
    memory down. A strip is pushed to the sinks as soon as all its tiles are done.
    """
    array_sink = next((s for s in sinks if isinstance(s, _ArraySink)), None)
    tile_w, tile_h = tile
    n_workers = workers or helper_threads()
    in_flight: deque[tuple[int, np.ndarray, list[Future[None]]]] = deque()
    # a strip in the whole-image buffer costs nothing extra; a standalone strip is memory
    lookahead = 1 if array_sink is not None else 0

    def one(strip: np.ndarray, tx: int, ty: int, box: tuple[int, int, int, int]) -> None:
        strip[:, box[0] : box[2]] = render_tile(tx, ty, box)

    def flush_oldest() -> None:
        y0, strip, futures = in_flight.popleft()
        for future in futures:
            future.result()
        for sink in sinks:
            sink.push(y0, strip)
        _release_free_memory()

    try:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            try:
                for ty, y0 in enumerate(range(0, height, tile_h)):
                    y1 = min(y0 + tile_h, height)
                    if array_sink is not None:
                        strip = array_sink.strip_view(y0, y1)
                    else:
                        strip = np.empty((y1 - y0, width, 3), dtype=np.uint8)
                    futures = [
                        pool.submit(one, strip, tx, ty, (x0, y0, min(x0 + tile_w, width), y1))
                        for tx, x0 in enumerate(range(0, width, tile_w))
                    ]
                    in_flight.append((y0, strip, futures))
                    if len(in_flight) > lookahead:
                        flush_oldest()
                while in_flight:
                    flush_oldest()
            except BaseException:
                for _, _, futures in in_flight:
                    for future in futures:
                        future.cancel()
                raise
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def _make_sinks(
    out_path: Path | None,
    pyramid_tiff_path: Path | None,
    width: int,
    height: int,
    out_mpp: float | None,
    keep_image: bool,
) -> list[_Sink]:
    sinks: list[_Sink] = []
    fmt = _image_format(out_path) if out_path is not None else ""
    if fmt in ("jpg", "jpeg") and max(width, height) > JPEG_MAX_SIDE:
        raise OutputError(
            f"{out_path}: a {width}x{height} px image is too large for JPEG (max "
            f"{JPEG_MAX_SIDE} px a side); use save_ext png or tiff, a coarser vis_level or "
            "custom_downsample"
        )
    if keep_image or fmt in ("jpg", "jpeg", "png"):
        path = out_path if fmt in ("jpg", "jpeg", "png") else None
        sinks.append(_ArraySink(width, height, path, fmt))
    try:
        if fmt in ("tif", "tiff"):
            assert out_path is not None
            sinks.append(_TiffSink(out_path, width, height, mpp=out_mpp, pyramid=False))
        if pyramid_tiff_path is not None:
            sinks.append(_TiffSink(pyramid_tiff_path, width, height, mpp=out_mpp, pyramid=True))
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return sinks


def _finish(sinks: Sequence[_Sink]) -> tuple[Path, ...]:
    paths = []
    try:
        for sink in sinks:
            p = sink.close()
            if p is not None:
                paths.append(p)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return tuple(paths)


def _out_mpp(slide: Slide, level: int, cd: int) -> float | None:
    if slide.mpp is None:
        return None
    return float(slide.mpp) * float(slide.level_downsamples[level][0]) * cd


def render_heatmap(
    slide: Slide,
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    spec: HeatmapSpec,
    *,
    tissue: TissueContours | np.ndarray | None = None,
    out_path: str | os.PathLike[str] | None = None,
    pyramid_tiff_path: str | os.PathLike[str] | None = None,
    keep_image: bool = False,
) -> RenderResult:
    """Draw CLAM's heatmap of ``scores`` over ``slide``, tile by tile, and save it.

    Parameters
    ----------
    slide : Slide
    l0_coords : (N, 2) int ndarray
        Level-0 top-left (x, y) of each patch.
    scores : (N,) or (N, 1) float ndarray
        Raw attention (with ``spec.use_percentiles``) or CLAM-scale percentiles (0-100).
    patch_size_l0 : int or (w, h)
        Level-0 footprint of a patch (CLAM's ``vis_patch_size``).
    spec : HeatmapSpec
    tissue : TissueContours, (h, w) bool ndarray or None
        Tissue for ``spec.segment`` (contours in level-0 px, or a mask over the region at the
        vis level). None: no masking.
    out_path : path, optional
        ``.jpg`` (quality 100), ``.jpeg``, ``.png`` or ``.tif``/``.tiff``; written atomically.
    pyramid_tiff_path : path, optional
        Also write the image as a pyramidal JPEG tiled TIFF with MPP (OpenSlide/QuPath).
    keep_image : bool
        Return the (h, w, 3) uint8 image in the result (costs its memory).

    Returns
    -------
    RenderResult
        The saved image is ``(int(w / cd), int(h / cd))`` for a vis region of (w, h).
    """
    start = time.perf_counter()
    plan, threshold, n_kept = _plan(slide, l0_coords, scores, patch_size_l0, spec, tissue)
    cd = plan.cd
    width, height = plan.region[0] // cd, plan.region[1] // cd
    if width < 1 or height < 1:
        raise ValueError(f"custom_downsample {cd} leaves no pixels of the {plan.region} region")
    sinks = _make_sinks(
        Path(out_path) if out_path is not None else None,
        Path(pyramid_tiff_path) if pyramid_tiff_path is not None else None,
        width,
        height,
        _out_mpp(slide, plan.level, cd),
        keep_image,
    )
    try:
        tile = _tile_shape(int(spec.tile_size), sinks)
        plan.bucket(tile, (-(-width // tile[0]), -(-height // tile[1])))
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    _stream(plan.render_tile, width, height, tile, sinks, spec.workers)
    paths = _finish(sinks)
    image = next((s.image for s in sinks if isinstance(s, _ArraySink)), None)
    return RenderResult(
        shape=(height, width),
        vis_level=plan.level,
        threshold=threshold,
        n_patches=n_kept,
        paths=paths,
        seconds=time.perf_counter() - start,
        image=image if keep_image else None,
    )


def heatmap_image(
    slide: Slide,
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    spec: HeatmapSpec,
    *,
    tissue: TissueContours | np.ndarray | None = None,
) -> np.ndarray:
    """The heatmap as an (h, w, 3) uint8 RGB array, nothing written (for tests and notebooks)."""
    result = render_heatmap(
        slide, l0_coords, scores, patch_size_l0, spec, tissue=tissue, keep_image=True
    )
    assert result.image is not None
    return result.image


def save_orig(
    slide: Slide,
    level: int,
    custom_downsample: int,
    path: str | os.PathLike[str],
    *,
    tile_size: int = 1024,
    workers: int = 0,
) -> Path:
    """Save the plain slide at ``level`` shrunk by ``custom_downsample`` (CLAM's
    ``<id>_orig_<level>``), read tile by tile; format from the extension."""
    level = _resolve_level(slide, level)
    cd = int(custom_downsample)
    if cd < 1:
        raise ValueError(f"custom_downsample = {custom_downsample}: must be an int >= 1")
    lw, lh = slide.level_dimensions[level]
    width, height = lw // cd, lh // cd
    if width < 1 or height < 1:
        raise ValueError(f"custom_downsample {cd} leaves no pixels of level {level} ({lw}x{lh})")
    dx, dy = slide.level_downsamples[level]

    def tile_fn(tx: int, ty: int, box: tuple[int, int, int, int]) -> np.ndarray:
        ox0, oy0, ox1, oy1 = box
        vx0, vy0 = ox0 * cd, oy0 * cd
        size = ((ox1 - ox0) * cd, (oy1 - oy0) * cd)
        rgb = slide.read_region((int(round(vx0 * dx)), int(round(vy0 * dy))), level, size)
        return _shrink(rgb, cd)

    out = Path(path)
    sinks = _make_sinks(out, None, width, height, _out_mpp(slide, level, cd), False)
    _stream(tile_fn, width, height, _tile_shape(int(tile_size), sinks), sinks, workers)
    _finish(sinks)
    return out


# ============================================================================================
# GeoJSON for QuPath
# ============================================================================================


def _json_numbers(values: np.ndarray) -> np.ndarray:
    """Shortest round-trip decimal strings (vectorised, StringDType); NaN/inf → null."""
    arr = np.asarray(values)
    out = arr.astype(np.dtypes.StringDType())
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            out[bad] = "null"
    return out


def write_attention_geojson(
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    path: str | os.PathLike[str],
    *,
    chunk: int = 100_000,
) -> Path:
    """Write patch squares with their attention as a GeoJSON FeatureCollection for QuPath.

    One Feature per patch: a closed level-0 Polygon and properties
    ``{"objectType": "tile", "measurements": {"attention": s, "percentile": p}}`` (p = CLAM
    rank percentile, 0-100), which QuPath shows as measurement maps. Text is built with numpy
    string operations in chunks and written atomically.
    """
    coords = np.asarray(l0_coords, dtype=np.int64).reshape(-1, 2)
    flat = np.asarray(scores).reshape(-1)
    if len(flat) != len(coords):
        raise ValueError(f"{len(flat)} scores for {len(coords)} coords; they must pair up")
    pw, ph = (int(v) for v in np.broadcast_to(np.asarray(patch_size_l0), (2,)))
    pct = to_percentiles(flat) if len(flat) and not np.isnan(flat).any() else flat * np.nan
    out = Path(path)
    tmp = _atomic_target(out)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"type": "FeatureCollection", "features": [\n')
            for start in range(0, len(coords), chunk):  # chunks of patches, not single ones
                c = coords[start : start + chunk]
                x0, y0 = _json_numbers(c[:, 0]), _json_numbers(c[:, 1])
                x1, y1 = _json_numbers(c[:, 0] + pw), _json_numbers(c[:, 1] + ph)
                s = _json_numbers(flat[start : start + chunk])
                p = _json_numbers(pct[start : start + chunk])
                ring = (
                    "[["
                    + x0
                    + ", "
                    + y0
                    + "], ["
                    + x1
                    + ", "
                    + y0
                    + "], ["
                    + x1
                    + ", "
                    + y1
                    + "], ["
                    + x0
                    + ", "
                    + y1
                    + "], ["
                    + x0
                    + ", "
                    + y0
                    + "]]"
                )
                feats = (
                    '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": ['
                    + ring
                    + ']}, "properties": {"objectType": "tile", "measurements": {"attention": '
                    + s
                    + ', "percentile": '
                    + p
                    + "}}}"
                )
                if start:
                    fh.write(",\n")
                fh.write(",\n".join(feats.tolist()))
            fh.write("\n]}\n")
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: writing failed ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, out)
    return out
