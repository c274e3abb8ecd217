"""Tissue segmentation, tissue masks and in-tissue patch grids (CLAM-compatible).

What this reproduces (docs/rules/heatmaps.md#segmentation, docs/rules/heatmaps.md#patch-grids and
docs/rules/heatmaps.md#tissue-mask), in our own code, one concern per module:

* :mod:`.params`: :class:`SegmentationParams`, CLAM's seg/filter/vis keys, validated;
* :mod:`.segment`: :func:`segment_array` / :func:`segment_slide`, CLAM's ``segmentTissue``;
* :mod:`.contours`: :class:`TissueContours`, :func:`rasterize_tissue` (CLAM's ``get_seg_mask``
  for any window, used per heatmap tile) and GeoJSON instead of CLAM's pickle;
* :mod:`.grid`: :func:`grid_coords` / :func:`patch_in_tissue`, CLAM's per-contour patch grid
  and its contour and hole tests, exact (:mod:`.polygon`) but vectorised;
* :mod:`.overview`: :func:`draw_overview`, CLAM's ``visWSI`` overview (``<id>_mask.jpg``).

Coordinate frames: ``l0_*`` are level-0 pixels, ``vis_*`` are pixels of the level being drawn.
"""

from __future__ import annotations

from .contours import (
    TissueContours,
    contours_to_geojson,
    load_geojson,
    rasterize_tissue,
    save_geojson,
)
from .grid import center_shift_for_overlap, grid_coords, patch_in_tissue
from .overview import draw_overview, save_overview_jpg
from .params import AUTO_LEVEL_DOWNSAMPLE, CONTOUR_FNS, ContourFn, SegmentationParams
from .segment import area_unit, resolve_level, segment_array, segment_slide

__all__ = [
    "AUTO_LEVEL_DOWNSAMPLE",
    "CONTOUR_FNS",
    "ContourFn",
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
