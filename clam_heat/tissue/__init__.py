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

from ..lazy import lazy_exports

#: Each public name and the module that defines it. Loaded on first use (PEP 562): a stage's
#: fingerprint reads :class:`SegmentationParams` without importing OpenCV.
_EXPORTS: dict[str, str] = {
    "TissueContours": "contours",
    "contours_to_geojson": "contours",
    "load_geojson": "contours",
    "rasterize_tissue": "contours",
    "save_geojson": "contours",
    "center_shift_for_overlap": "grid",
    "grid_coords": "grid",
    "patch_in_tissue": "grid",
    "draw_overview": "overview",
    "save_overview_jpg": "overview",
    "AUTO_LEVEL_DOWNSAMPLE": "params",
    "CONTOUR_FNS": "params",
    "ContourFn": "params",
    "SegmentationParams": "params",
    "area_unit": "segment",
    "resolve_level": "segment",
    "segment_array": "segment",
    "segment_slide": "segment",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
