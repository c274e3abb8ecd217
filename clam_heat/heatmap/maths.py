"""CLAM's heatmap rules as pure functions: percentiles, thresholds, geometry, colour, blending.

No I/O and no slides: every function maps arrays to arrays (or numbers), with the CLAM rule in
one sentence and a doctest. Frames: ``l0_`` level-0 pixels, ``vis_`` pixels of the heatmap's
region at the vis level (see :mod:`clam_heat.heatmap`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from ..colormaps import colormap_lut

__all__ = [
    "AUTO_VIS_DOWNSAMPLE",
    "apply_colormap",
    "binarize_threshold",
    "blend",
    "colormap_index",
    "colormap_lut",
    "gaussian_ksize",
    "l0_to_read",
    "patch_values",
    "percentile_of_scores",
    "to_percentiles",
    "vis_geometry",
]

#: Vis level chosen for ``vis_level = -1`` (CLAM: best level for downsample 32).
AUTO_VIS_DOWNSAMPLE = 32.0


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
    #192). One sort of the reference and one of the scores, then two binary searches of the
    sorted scores: O((M + N) log N), not CLAM's O(M x N) loop.

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
    # binary searches of sorted queries walk the reference in order (cache friendly): 10M
    # scores against 10M take ~3 s, against ~25 s for the same searches in random order
    by_score = np.argsort(s, kind="stable")
    queries = s[by_score]
    left = np.searchsorted(ordered, queries, side="left")
    right = np.searchsorted(ordered, queries, side="right")
    total = np.empty(len(s), dtype=np.int64)
    total[by_score] = left + right + (left < right)
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
    """Patch squares in the vis frame, as CLAM computes them.

    CLAM's rule: docs/rules/heatmaps.md#drawing, steps 3-4.

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


def l0_to_read(vis: int, l0_origin: int, downsample: float) -> int:
    """The level-0 coordinate (one axis) at which to read vis pixel ``vis`` of a region whose
    top-left is ``l0_origin``, so that a region read in tiles equals CLAM's single read.

    CLAM reads the region once, ``read_region(l0_origin, level, size)``; a reader puts level-0
    ``x`` at level pixel ``floor(x / downsample)``, so vis pixel ``v`` is level pixel
    ``floor(l0_origin / downsample) + v``. The answer is ``l0_origin + round(v * downsample)``
    (exact on integer pyramids), moved into the level-0 range that maps to that level pixel:
    on a non-integer pyramid (a scanner's 4.0066) the plain rounding can land one level pixel
    short, which shifted every tile's canvas but the first.

    Examples
    --------
    >>> l0_to_read(256, 0, 4.0), l0_to_read(3, 131, 2.0), l0_to_read(0, 131, 4.0066)
    (1024, 137, 131)
    >>> l0_to_read(1, 0, 4.0066)  # round(4.0066) = 4 would read level pixel 0 again
    5
    """
    pixel = math.floor(l0_origin / downsample) + vis
    lowest = math.ceil(pixel * downsample)
    highest = max(lowest, math.ceil((pixel + 1) * downsample) - 1)
    return min(max(l0_origin + round(vis * downsample), lowest), highest)


def gaussian_ksize(vis_patch_size: Sequence[int], overlap: float) -> tuple[int, int]:
    """CLAM's blur kernel (kx, ky): ``int(ps * (1 - overlap)) * 2 + 1`` per axis.

    >>> gaussian_ksize((64, 64), 0.5)
    (65, 65)
    """
    k = (np.asarray(vis_patch_size, dtype=np.float64) * (1 - overlap)).astype(int) * 2 + 1
    return int(k[0]), int(k[1])


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
