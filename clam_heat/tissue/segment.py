"""CLAM's ``segmentTissue``: HSV saturation, median blur, fixed or Otsu threshold, closing,
two-level contours, area filters in 512x512 level-0 patches, ``max_n_holes``, id selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import SegmentationError
from .contours import TissueContours
from .params import AUTO_LEVEL_DOWNSAMPLE, SegmentationParams

if TYPE_CHECKING:
    from ..slide import Slide


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
    """CLAM's contour filter on findContours output; returns kept indices and holes.

    See docs/rules/heatmaps.md#contour-filter.

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
    """CLAM's keep/exclude rule, ids in ascending order; bad ids raise.

    See docs/rules/heatmaps.md#contour-selection.

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
    """Segment tissue in a segmentation-level image, CLAM's ``segmentTissue``.

    See docs/rules/heatmaps.md#segmentation.

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
