"""Side-by-side slide / heatmap viewer (``clam-heat view``): :mod:`.server` serves the page and
the tiles, :mod:`.tiles` holds the tiled layers and the colour bars."""

from .server import (
    OPEN_IMAGE_BYTES,
    OPEN_SLIDES,
    ViewerEntry,
    ViewerServer,
    compare_entries,
    open_viewer,
    pair_entry,
    viewer_entries,
)
from .tiles import TILE_SIZE, Layer, array_layer, difference_layer, legend, open_heatmap_layer

__all__ = [
    "OPEN_IMAGE_BYTES",
    "OPEN_SLIDES",
    "TILE_SIZE",
    "Layer",
    "ViewerEntry",
    "ViewerServer",
    "array_layer",
    "compare_entries",
    "difference_layer",
    "legend",
    "open_viewer",
    "open_heatmap_layer",
    "pair_entry",
    "viewer_entries",
]
