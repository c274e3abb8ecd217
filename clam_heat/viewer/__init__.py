"""The live viewer (``clam-heat view``) and ``clam-heat render``: :mod:`.entries` (what a row
shows), :mod:`.maps` (a row's maps, their style, the region command), :mod:`.tiles` (slide and
map tile sources), :mod:`.app` (the answers, no HTTP), :mod:`.server` (HTTP only),
:mod:`.pages` (the HTML and the vendored OpenSeadragon) and :mod:`.review` (the review notes
CSV). Nothing here imports torch."""

from .app import ViewerApp
from .entries import ViewerEntry, compare_entries, pair_entry, viewer_entries
from .launch import open_viewer, run_app
from .maps import MapSource, Style, discover_maps, render_region
from .server import ViewerServer
from .tiles import TILE

__all__ = [
    "TILE",
    "MapSource",
    "Style",
    "ViewerApp",
    "ViewerEntry",
    "ViewerServer",
    "compare_entries",
    "discover_maps",
    "open_viewer",
    "pair_entry",
    "render_region",
    "run_app",
    "viewer_entries",
]
