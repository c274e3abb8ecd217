"""The heatmap stage's exports: files written beside the production heatmap, from the same
render (the pyramidal TIFF) or the same scores (the QuPath GeoJSON).

Each row ties a writer of :data:`clam_heat.heatmap.writers.EXPORTS` (same name) to the
``runner_arguments`` switch that turns it on and to its file name in :mod:`clam_heat.rows`. A new
export (say attention to Zarr) is a writer there, a row here, its switch in the config schema
and its name in ``rows.py``; the heatmap stage picks it up (outputs, fingerprint, run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import HeatmapConfig
from ..rows import RowContext, attention_geojson_path, pyramid_heatmap_path

__all__ = ["HEATMAP_EXPORTS", "HeatmapExport", "export_paths", "export_switches"]


@dataclass(frozen=True)
class HeatmapExport:
    """One export of the heatmap stage."""

    #: the writer's name in ``heatmap.writers.EXPORTS`` (and the key in the stage fingerprint)
    name: str
    #: the ``runner_arguments`` field (bool) that turns it on
    switch: str
    #: where the row's file goes
    path: Callable[[RowContext], Path]


#: In the order the stage reports its outputs.
HEATMAP_EXPORTS: tuple[HeatmapExport, ...] = (
    HeatmapExport("pyramid_tiff", "write_pyramid_tiff", pyramid_heatmap_path),
    HeatmapExport("geojson", "write_geojson", attention_geojson_path),
)


def export_switches(cfg: HeatmapConfig) -> dict[str, bool]:
    """Each export's name -> whether the config turns it on (part of the stage fingerprint)."""
    return {e.name: bool(getattr(cfg.runner_arguments, e.switch)) for e in HEATMAP_EXPORTS}


def export_paths(ctx: RowContext) -> dict[str, Path]:
    """The row's file of each export the config turns on, by export name."""
    on = export_switches(ctx.cfg)
    return {e.name: e.path(ctx) for e in HEATMAP_EXPORTS if on[e.name]}
