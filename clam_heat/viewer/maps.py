"""The maps of a row and how they are drawn: discovery by file name, loading into a
:class:`~clam_heat.heatmap.region.ScoreIndex`, the live style, and ``clam-heat render``.

A row's maps are the score files beside its blockmap in ``<raw>/``: ``<id>_blockmap.h5``
(``attention``), the overlap pass (``attention (overlap)``), ``<id>_class_<name>_blockmap.h5``
(``class <name>``) and any other ``<id>_<method>_blockmap.h5`` (an attribution method, named
``<method>``), all in CLAM's score layout. Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import OutputError

if TYPE_CHECKING:
    from ..config import HeatmapConfig
    from ..heatmap.region import ScoreIndex
    from ..rows import RowContext

__all__ = [
    "BLOCKMAP_SUFFIX",
    "MapSource",
    "Style",
    "discover_maps",
    "load_index",
    "production_style",
    "render_region",
]

BLOCKMAP_SUFFIX = "_blockmap.h5"
SCALES = ("percentile", "raw", "cohort")


@dataclass(frozen=True)
class MapSource:
    """One drawable map of a row: its name on the page and the score file it is drawn from."""

    name: str
    path: Path
    #: a colormap this map is better read with (the comparison's diverging one), or None
    cmap: str | None = None
    #: with ``other``: the map is the percentile difference ``path - other`` (matched patches)
    other: Path | None = None
    #: the scale it opens on (None: the run's)
    scale: str | None = None


def discover_maps(ctx: RowContext, other_ids: frozenset[str] = frozenset()) -> list[MapSource]:
    """The row's maps, by file pattern (see the module docstring), attention first.

    ``other_ids`` are the run's other slide ids: ``s1_x_blockmap.h5`` is slide ``s1_x``'s
    attention, not a method ``x`` of ``s1``, when ``s1_x`` is a row too.
    """
    from ..rows import blockmap_h5_path, overlap_h5_path

    maps: list[MapSource] = []
    main = blockmap_h5_path(ctx)
    if main.is_file():
        maps.append(MapSource("attention", main))
    if ctx.cfg.heatmap_arguments.calc_heatmap and (overlap := overlap_h5_path(ctx)).is_file():
        maps.append(MapSource("attention (overlap)", overlap))
    prefix = f"{ctx.slide_id}_"
    try:
        names = sorted(p.name for p in ctx.raw_dir.iterdir())
    except OSError:
        names = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(BLOCKMAP_SUFFIX)):
            continue
        middle = name[len(prefix) : -len(BLOCKMAP_SUFFIX)]
        if not middle or any(f"{prefix}{middle}".startswith(o) for o in other_ids - {ctx.slide_id}):
            continue
        label = f"class {middle[6:]}" if middle.startswith("class_") else middle
        maps.append(MapSource(label, ctx.raw_dir / name))
    return maps


def load_index(source: MapSource | Path) -> ScoreIndex:
    """A map's scores, indexed (one line naming the file when it is unreadable)."""
    from ..h5io import read_scores
    from ..heatmap.region import ScoreIndex

    path = source if isinstance(source, Path) else source.path
    try:
        scores, coords, patch = read_scores(path)
        if isinstance(source, MapSource) and source.other is not None:
            from ..compare import match_coords, percentile_difference

            other, coords_b, patch_b = read_scores(source.other)
            ia, ib = match_coords(coords, coords_b)
            diff = percentile_difference(scores[ia], other[ib])
            return ScoreIndex(coords[ia], diff, min(patch, patch_b))
        return ScoreIndex(coords, scores, patch)
    except (OSError, KeyError, ValueError, TypeError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OutputError(f"{path}: cannot read its scores ({why}); rerun its stage") from None


@dataclass(frozen=True)
class Style:
    """How a map is drawn; every field is a live control of the page (none reruns anything).

    ``threshold`` is on the drawn [0, 1] scale (patches below add 0 and are not painted, CLAM's
    rule); ``scale`` is ``percentile`` (the slide's), ``cohort`` or ``raw``.
    """

    cmap: str = "jet"
    alpha: float = 0.4
    threshold: float = 0.0
    binarize: bool = False
    blur: bool = False
    overlap: float = 0.0
    scale: str = "percentile"
    segment: bool = True

    def checked(self) -> Style:
        from ..heatmap import colormap_lut

        try:
            colormap_lut(self.cmap)
        except ValueError as err:
            raise OutputError(f"cmap: {err}") from None
        if self.scale not in SCALES:
            raise OutputError(f"scale {self.scale!r}: use one of {', '.join(SCALES)}")
        if not (0 <= self.alpha <= 1 and 0 <= self.threshold <= 1 and 0 <= self.overlap < 1):
            raise OutputError("alpha and threshold must be in [0, 1], overlap in [0, 1)")
        return self


def production_style(cfg: HeatmapConfig, n_patches: int) -> Style:
    """The style of the run's production image (its ``heatmap_arguments``)."""
    from ..heatmap import binarize_threshold

    hm = cfg.heatmap_arguments
    threshold = binarize_threshold(hm.binary_thresh, max(n_patches, 1)) if hm.binarize else 0.0
    return Style(
        cmap=hm.cmap,
        alpha=hm.alpha,
        threshold=threshold,
        binarize=hm.binarize,
        blur=hm.blur,
        overlap=cfg.patching_arguments.overlap,
        scale="cohort" if hm.score_scale == "cohort" else "percentile",
        segment=cfg.runner_arguments.segment_heatmap,
    )


def values01(index: ScoreIndex, style: Style, cohort_file: Path | None) -> np.ndarray:
    """The map's scores on [0, 1] under ``style.scale`` (the cohort scale needs the run's
    cohort file, written by ``clam-heat run``)."""
    from ..heatmap.region import scores01

    if style.scale != "cohort":
        return scores01(index, style.scale)
    if cohort_file is None or not cohort_file.is_file():
        raise OutputError(
            f"{cohort_file}: no cohort scores; the cohort scale needs a run with "
            "score_scale: cohort (or pick the percentile scale)"
        )
    from ..cohort import cohort_percentiles

    return scores01(index, "cohort", cohort=cohort_percentiles(cohort_file, index.scores))


# -------------------------------------------------------------------------------- render


def _window(
    region: tuple[int, int, int, int], downsample: tuple[float, float], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A level-0 (x, y, w, h) region as the level pixels that cover it, inside the level."""
    x, y, w, h = region
    dx, dy = downsample
    x0, y0 = max(0, math.floor(x / dx)), max(0, math.floor(y / dy))
    x1, y1 = min(size[0], math.ceil((x + w) / dx)), min(size[1], math.ceil((y + h) / dy))
    if x1 <= x0 or y1 <= y0:
        raise OutputError(f"--region {x},{y},{w},{h}: outside the slide (level size {size})")
    return x0, y0, x1, y1


def render_region(
    cfg: HeatmapConfig,
    slide_id: str,
    *,
    region: tuple[int, int, int, int] | None,
    level: int,
    out: Path,
    map_name: str | None = None,
    overrides: dict[str, Any] | None = None,
    overlay: bool = True,
    legend: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """``clam-heat render``: one region of one row's map at one pyramid level, to ``out``.

    ``region`` is level-0 (x, y, w, h) (None: the whole slide); ``level`` -1 is the run's
    ``vis_level``. Drawn with the production rules (so at the production level the pixels are
    the production image's), any style field overridden by ``overrides``; streamed tile by
    tile, so the region may be larger than memory. Returns the file and its metadata.
    """
    import json

    from ..heatmap.meta import image_meta
    from ..heatmap.plan import resolve_vis_level
    from ..heatmap.region import RegionView, describe, patch_paint, write_region
    from ..process_list import read_process_list
    from ..rows import build_contexts, segmentation_geojson_path

    if not cfg.process_list_path.is_file():
        raise OutputError(f"{cfg.process_list_path}: no process list yet; run the config first")
    ctxs = {c.slide_id: c for c in build_contexts(cfg, read_process_list(cfg.process_list_path))}
    if slide_id not in ctxs:
        raise OutputError(f"--slide {slide_id!r} is not a row of {cfg.process_list_path}")
    ctx = ctxs[slide_id]
    maps = {m.name: m for m in discover_maps(ctx, frozenset(ctxs))}
    if not maps:
        raise OutputError(f"{ctx.raw_dir}: no scores for {slide_id!r}; run the config first")
    name = map_name or next(iter(maps))
    if name not in maps:
        raise OutputError(f"--map {name!r}: {slide_id!r} has {', '.join(maps)}")
    index = load_index(maps[name])
    style = replace(production_style(cfg, len(index)), **(overrides or {})).checked()
    slide = ctx.slide()
    level = resolve_vis_level(slide, cfg.heatmap_arguments.vis_level if level < 0 else level)
    size = tuple(int(v) for v in slide.level_dimensions[level])
    ds = tuple(float(v) for v in slide.level_downsamples[level])
    x0, y0, x1, y1 = _window(region or (0, 0, *slide.dimensions), ds, size)  # type: ignore[arg-type]
    tissue = None
    if style.segment and (seg := segmentation_geojson_path(ctx)).is_file():
        from ..tissue import load_geojson

        tissue = load_geojson(seg)
    from ..rows import cohort_scores_path

    paint = patch_paint(
        values01(index, style, cohort_scores_path(cfg)), style.threshold, binarize=style.binarize
    )
    view = RegionView(
        index,
        paint,
        ds,
        size,
        cmap=style.cmap,
        alpha=style.alpha,
        blur=style.blur,
        overlap=style.overlap,
        tissue=tissue,
        slide=slide,
        level=level,
        blank=cfg.heatmap_arguments.blank_canvas or not overlay,
    )
    described = describe(index, style.scale)
    meta = image_meta(
        style.cmap,
        map_name=name,
        scale=style.scale,
        low=described["low"],
        high=described["high"],
        threshold=style.threshold,
    )
    bar = _legend_strip(x1 - x0, style.cmap, name, described) if legend else None
    mpp = None if slide.mpp is None else float(slide.mpp) * ds[0]
    write_region(view, (x0, y0, x1, y1), out, meta=meta, mpp=mpp, footer=bar)
    return out, json.loads(meta)


def _legend_strip(width: int, cmap: str, name: str, described: dict[str, Any]) -> np.ndarray:
    """A colour bar under the image: the colormap across the width, its ends and the map."""
    import cv2

    from ..heatmap import apply_colormap

    h = 44
    strip = np.full((h, width, 3), 255, np.uint8)
    margin = min(60, width // 8)
    inner = max(1, width - 2 * margin)
    strip[4:20, margin : margin + inner] = apply_colormap(np.linspace(0, 1, inner), cmap)[None]
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    low, high = f"{described['low']:g}", f"{described['high']:g}"
    cv2.putText(strip, low, (margin, 38), font, 0.45, black, 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(high, font, 0.45, 1)
    cv2.putText(strip, high, (max(0, margin + inner - tw), 38), font, 0.45, black, 1, cv2.LINE_AA)
    label = f"{name} ({described['scale']}, {cmap})"
    (tw, _), _ = cv2.getTextSize(label, font, 0.45, 1)
    cv2.putText(strip, label, (max(0, (width - tw) // 2), 38), font, 0.45, black, 1, cv2.LINE_AA)
    return strip


def check_region(text: str) -> tuple[int, int, int, int]:
    """``X,Y,W,H`` (level-0 px, W and H > 0) from the command line."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise OutputError(f"--region {text!r}: give X,Y,W,H in level-0 pixels") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise OutputError(f"--region {text!r}: X, Y >= 0 and W, H > 0")
    return x, y, w, h
