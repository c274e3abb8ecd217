"""The live viewer (``clam-heat view``) and ``clam-heat render``: :mod:`.entries` (what a row
shows), :mod:`.maps` (a row's maps, their style, the region command), :mod:`.tiles` (slide and
map tile sources), :mod:`.server` (HTTP only), :mod:`.pages` (the HTML and the vendored
OpenSeadragon) and :mod:`.review` (the review notes CSV). Nothing here imports torch."""

from .server import ViewerServer, open_viewer, viewer_entries
from .tiles_old import TILE_SIZE, open_heatmap_layer

__all__ = ["TILE_SIZE", "ViewerServer", "open_heatmap_layer", "open_viewer", "viewer_entries"]
