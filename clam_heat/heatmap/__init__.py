"""Attention heatmaps: CLAM's drawing maths as pure functions, and a tile-streamed renderer.

Coordinate frames (named as in openslide's deepzoom): ``l0_`` values are level-0 pixels;
``vis_`` values are pixels of the heatmap's *region* at the vis level (the whole vis level, or
the ROI's box there), whose (0, 0) is the region's top-left; ``out_`` values are pixels of the
saved image (the region shrunk by ``custom_downsample``).

CLAM (``WholeSlideImage.visHeatmap``, docs/rules/heatmaps.md#drawing) paints a full-size float
canvas with a Python loop per patch. Here the same picture is produced tile by tile: for each output
tile only the patches that touch it are accumulated, on a compressed grid of *cells* (the rectangles
between consecutive patch edges, inside which the overlay is constant), with integer difference
arrays, so the work per tile is numpy only and memory does not grow with the slide. Per-patch values
are summed in exact fixed-point integers, which makes every pixel independent of the tiling (and
equal to CLAM's sequential float64 sum whenever that sum is exact, e.g. float32 scores).

Deviations from CLAM, all deliberate and documented where they happen:

* ``custom_downsample`` shrinks with an exact block mean (``cv2.INTER_AREA`` on whole
  ``cd`` x ``cd`` blocks) instead of PIL's default bicubic filter, so tiles shrink exactly.
* the blending canvas is the canvas that was painted on (CLAM re-reads it with truncated
  integer downsamples, which misaligns on non-integer pyramids,
  docs/rules/heatmaps.md#exact-blending).
* patch rectangles with negative vis coordinates are clipped at 0 (CLAM's numpy slicing would
  wrap around); such coordinates never come out of a valid patch grid.
* the tissue mask is rasterised in fixed :data:`MASK_TILE` blocks (OpenCV's polygon fill is not
  translation-invariant at image borders), so on regions wider or taller than a block a few
  pixels along tissue edges that cross a block border can differ from CLAM's one-shot mask.
* no tissue (``segment`` with an empty :class:`~clam_heat.tissue.TissueContours`) paints
  nothing instead of crashing; no patches gives the bare canvas.

Memory: a JPEG/PNG output needs its whole RGB image once (encoders take whole images); tiles
are written straight into it. TIFF outputs (:func:`render_heatmap`'s ``pyramid_tiff_path``, or
a ``.tiff`` ``out_path``) are streamed in 256-row strips, so memory grows with the image width
and the number of patches, not with its area.

Layout (imports go down the list; nothing here imports the runner or the stages):

* :mod:`~clam_heat.heatmap.maths`: CLAM's rules as pure functions, no I/O;
* :mod:`~clam_heat.heatmap.cells`: exact overlap accumulation on the cell grid;
* :mod:`~clam_heat.heatmap.writers`: sinks by file extension (a new format = a new sink) and
  the attention GeoJSON, every file through :mod:`clam_heat.atomic`;
* :mod:`~clam_heat.heatmap.plan`: :class:`HeatmapSpec`, :class:`RenderResult` and the plan that
  draws any window (tissue masks via :mod:`clam_heat.tissue`, imported lazily);
* :mod:`~clam_heat.heatmap.render`: the tile streaming engine, :func:`render_heatmap`,
  :func:`heatmap_image`, :func:`save_orig`.
"""

from . import maths
from .cells import accumulate_patches, paint_mask
from .maths import *  # noqa: F403 - CLAM's pure rules are the package's face
from .plan import MASK_TILE, HeatmapSpec, RenderResult
from .render import heatmap_image, render_heatmap, save_orig
from .writers import JPEG_MAX_SIDE, TIFF_TILE, write_attention_geojson

__all__ = [
    *maths.__all__,
    "JPEG_MAX_SIDE",
    "MASK_TILE",
    "TIFF_TILE",
    "HeatmapSpec",
    "RenderResult",
    "accumulate_patches",
    "heatmap_image",
    "paint_mask",
    "render_heatmap",
    "save_orig",
    "write_attention_geojson",
]
