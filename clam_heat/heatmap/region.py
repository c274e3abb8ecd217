"""On-demand heatmap regions: any window of any map at any downsample, from the scores.

The production writer (:mod:`~clam_heat.heatmap.render`) resolves a :class:`RenderPlan` once for
the whole vis level and streams every tile of it. A viewer (or a figure of one region) needs the
same picture for a few windows at many zooms: :class:`ScoreIndex` indexes a slide's patches once
(a spatial grid over the level-0 coords), and :class:`RegionView` builds, per window, a small
:class:`RenderPlan` holding only the patches that touch it, then draws it with the plan's own
code (cells, tissue blocks, blend). Patch values are resolved once per map and style
(:class:`PatchPaint`, exact fixed-point integers with the slide-wide scale), so a window drawn
here at the production ``vis_level`` equals the production image's pixels, and at finer
downsamples patch edges fall on exact pixels (``ceil(l0 / downsample)``, CLAM's rule).

Frames: ``l0_`` level-0 pixels; ``vis_`` pixels at the view's downsample, (0, 0) at the slide's
top-left (no ROI shift).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from . import maths
from .cells import Fixed, patch_rects, to_fixed, window_cells
from .plan import MASK_CACHE_BLOCKS, RenderPlan

if TYPE_CHECKING:
    from ..slide import Slide
    from ..tissue import TissueContours

__all__ = [
    "GRID_PATCHES",
    "MaskCache",
    "Merged",
    "PatchPaint",
    "RegionView",
    "ScoreIndex",
    "patch_paint",
    "merge_patches",
    "scores01",
    "write_region",
]

#: Side of a grid cell of :class:`ScoreIndex`, in patch sides: a query touches a few cells.
GRID_PATCHES = 4


class ScoreIndex:
    """One map's scores of one slide, indexed once by a grid over the level-0 coords.

    A query returns the patches whose footprint touches a level-0 box by reading only the grid
    cells under it (each grid row is one contiguous slice of the sorted ids), never scanning all
    patches. Percentiles and ranks are computed on first use and kept.
    """

    def __init__(
        self, l0_coords: np.ndarray, scores: np.ndarray, patch_size_l0: int | Sequence[int]
    ) -> None:
        coords = np.asarray(l0_coords, dtype=np.int64).reshape(-1, 2)
        flat = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(flat) != len(coords):
            raise ValueError(f"{len(flat)} scores for {len(coords)} coords; they must pair up")
        if not np.isfinite(flat).all():
            raise ValueError("scores contain NaN or inf; a map needs finite scores")
        ps = np.broadcast_to(np.asarray(patch_size_l0, dtype=np.int64), (2,))
        self.coords, self.scores = coords, flat
        self.patch = (int(ps[0]), int(ps[1]))
        self.cell = max(1, max(self.patch) * GRID_PATCHES)
        lo = coords.min(axis=0) if len(coords) else np.zeros(2, np.int64)
        hi = coords.max(axis=0) if len(coords) else np.zeros(2, np.int64)
        self.origin = (int(lo[0]), int(lo[1]))
        self.grid = (int((hi[0] - lo[0]) // self.cell) + 1, int((hi[1] - lo[1]) // self.cell) + 1)
        gx = (coords[:, 0] - lo[0]) // self.cell
        gy = (coords[:, 1] - lo[1]) // self.cell
        cid = gy * self.grid[0] + gx
        self.order = np.argsort(cid, kind="stable")
        self.starts = np.searchsorted(cid[self.order], np.arange(self.grid[0] * self.grid[1] + 1))
        self._lock = threading.Lock()
        self._pct: np.ndarray | None = None
        self._rank: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def query(self, l0_box: tuple[float, float, float, float]) -> np.ndarray:
        """Ids (ascending) of the patches whose footprint meets level-0 ``(x0, y0, x1, y1)``."""
        x0, y0, x1, y1 = l0_box
        pw, ph = self.patch
        # top-lefts in (x0 - pw, x1) x (y0 - ph, y1) touch the box
        gx0 = max(0, math.floor((x0 - pw - self.origin[0]) / self.cell))
        gx1 = min(self.grid[0] - 1, math.floor((x1 - self.origin[0]) / self.cell))
        gy0 = max(0, math.floor((y0 - ph - self.origin[1]) / self.cell))
        gy1 = min(self.grid[1] - 1, math.floor((y1 - self.origin[1]) / self.cell))
        if gx0 > gx1 or gy0 > gy1:
            return np.zeros(0, dtype=np.int64)
        rows = np.arange(gy0, gy1 + 1) * self.grid[0]
        lo, hi = self.starts[rows + gx0], self.starts[rows + gx1 + 1]
        if len(rows) == 1:
            ids = self.order[lo[0] : hi[0]]
        else:
            ids = np.concatenate([self.order[a:b] for a, b in zip(lo, hi, strict=True)])
        c = self.coords[ids]
        ok = (c[:, 0] > x0 - pw) & (c[:, 0] < x1) & (c[:, 1] > y0 - ph) & (c[:, 1] < y1)
        return np.sort(ids[ok])

    def patch_at(self, l0_x: float, l0_y: float) -> int | None:
        """The patch under a level-0 point (the one whose centre is nearest), or None."""
        ids = self.query((l0_x, l0_y, l0_x + 1, l0_y + 1))
        if not len(ids):
            return None
        centre = self.coords[ids] + np.asarray(self.patch) / 2
        return int(ids[np.argmin(((centre - (l0_x, l0_y)) ** 2).sum(axis=1))])

    @property
    def percentiles(self) -> np.ndarray:
        """CLAM's slide percentiles of the scores (0-100], computed once."""
        with self._lock:
            if self._pct is None:
                self._pct = maths.to_percentiles(self.scores)
            return self._pct

    @property
    def ranks(self) -> np.ndarray:
        """1 for the highest score, N for the lowest (ties share the best rank)."""
        with self._lock:
            if self._rank is None:
                ordered = np.sort(self.scores)
                self._rank = len(ordered) - np.searchsorted(ordered, self.scores, "right") + 1
            return self._rank

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self._pct, self._rank) if a is not None)
        return self.coords.nbytes + self.scores.nbytes + self.order.nbytes + extra


def scores01(index: ScoreIndex, scale: str, *, cohort: np.ndarray | None = None) -> np.ndarray:
    """The map's scores on [0, 1] as drawn: ``percentile`` (CLAM's slide percentiles / 100),
    ``cohort`` (``cohort``: the cohort percentiles 0-100, computed by the caller) or ``raw``
    (min-max over the slide; signed maps symmetric about 0, so 0 sits at the colormap's centre).

    >>> idx = ScoreIndex(np.array([[0, 0], [4, 0]]), np.array([-1.0, 3.0]), 4)
    >>> scores01(idx, "raw").round(3).tolist(), scores01(idx, "percentile").tolist()
    ([0.333, 1.0], [0.5, 1.0])
    """
    if scale == "percentile":
        return index.percentiles / 100
    if scale == "cohort":
        if cohort is None:
            raise ValueError("the cohort scale needs the cohort percentiles")
        return np.asarray(cohort, dtype=np.float64) / 100
    if scale != "raw":
        raise ValueError(f"scale {scale!r}: use percentile, cohort or raw")
    s = index.scores
    if not len(s):
        return s
    lo, hi = float(s.min()), float(s.max())
    if lo < 0:
        bound = max(-lo, hi) or 1.0
        return (s / bound + 1) / 2
    return (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)


@dataclass(frozen=True)
class PatchPaint:
    """Per-patch overlay values of one map under one style, for the whole slide (CLAM's
    :func:`~clam_heat.heatmap.maths.patch_values`, as exact fixed-point integers)."""

    fixed: Fixed
    above: np.ndarray
    threshold: float
    binarize: bool


def patch_paint(values01: np.ndarray, threshold: float, *, binarize: bool = False) -> PatchPaint:
    """CLAM's per-patch rule on [0, 1] scores: below ``threshold`` adds 0 and is not painted."""
    values, above = maths.patch_values(values01, threshold, binarize=binarize)
    return PatchPaint(to_fixed(values), above, float(threshold), binarize)


@dataclass(frozen=True)
class Merged:
    """All patches of a map at one downsample, equal rectangles merged (their fixed-point
    values summed, ``counts`` patches each, ``above`` when any is): at coarse zooms thousands
    of patches land on the same few pixels, and one merged rectangle sums exactly as they do."""

    rects: np.ndarray
    fixed: Fixed
    above: np.ndarray
    counts: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.rects.nbytes + 2 * self.fixed.hi.nbytes + self.above.nbytes + self.counts.nbytes


def merge_patches(
    index: ScoreIndex,
    paint: PatchPaint,
    downsample: tuple[float, float],
    region: tuple[int, int],
) -> Merged:
    """:class:`Merged` of every patch at ``downsample`` (one pass, integer sums: exact)."""
    _, vis_xy, vis_ps, _ = maths.vis_geometry(index.coords, index.patch, downsample, None, region)
    lo = vis_xy.min(axis=0) if len(vis_xy) else np.zeros(2, np.int64)
    span = int(vis_xy[:, 0].max() - lo[0] + 1) if len(vis_xy) else 1
    key = (vis_xy[:, 1] - lo[1]) * span + (vis_xy[:, 0] - lo[0])
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    hi_sum = np.zeros(len(first), np.int64)
    lo_sum = np.zeros(len(first), np.int64)
    np.add.at(hi_sum, inverse, paint.fixed.hi)
    np.add.at(lo_sum, inverse, paint.fixed.lo)
    counts = np.bincount(inverse, minlength=len(first)).astype(np.int32)
    above = np.bincount(inverse, weights=paint.above, minlength=len(first)) > 0
    rects = patch_rects(vis_xy[first], vis_ps, region)
    return Merged(rects, Fixed(hi_sum, lo_sum, paint.fixed.shift), above, counts)


class MaskCache:
    """Tissue-mask blocks shared by the windows of one slide at one downsample (bounded LRU)."""

    def __init__(self, blocks: int = MASK_CACHE_BLOCKS) -> None:
        self.blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.lock = threading.Lock()
        self.limit = blocks


@dataclass
class RegionView:
    """One map of one slide drawn at one downsample: any window of it, on demand.

    ``slide`` and ``level`` give the canvas (the slide's pixels at a real pyramid level, for
    :meth:`rgb`); the viewer draws overlays only (:meth:`rgba`) and needs neither.
    ``region`` is the (w, h) of the whole slide at this downsample.
    """

    index: ScoreIndex
    paint: PatchPaint
    downsample: tuple[float, float]
    region: tuple[int, int]
    cmap: str = "jet"
    alpha: float = 0.4
    blur: bool = False
    overlap: float = 0.0
    tissue: TissueContours | None = None
    use_holes: bool = True
    slide: Slide | None = None
    level: int = 0
    blank: bool = False
    masks: MaskCache = field(default_factory=MaskCache)
    #: the whole map at this downsample with equal rectangles merged (coarse zooms), or None
    merged: Merged | None = None

    @property
    def vis_patch(self) -> np.ndarray:
        return maths.vis_geometry(
            np.zeros((0, 2)), self.index.patch, self.downsample, None, (1, 1)
        )[2]

    @property
    def ksize(self) -> tuple[int, int] | None:
        return maths.gaussian_ksize(self.vis_patch, self.overlap) if self.blur else None

    def plan(self, window: tuple[int, int, int, int]) -> RenderPlan:
        """A render plan holding only the patches that can touch vis ``window`` (blur halo
        included), with the slide-wide fixed-point values (so sums equal the production's)."""
        dx, dy = self.downsample
        k = self.ksize or (1, 1)
        vps = self.vis_patch
        mx, my = 2 * (k[0] // 2) + int(vps[0]) + 2, 2 * (k[1] // 2) + int(vps[1]) + 2
        wx0, wy0, wx1, wy1 = window
        counts = None
        if self.merged is not None:
            m = self.merged
            r = m.rects
            near = (r[:, 0] < wx1 + mx) & (r[:, 2] > wx0 - mx)
            near &= (r[:, 1] < wy1 + my) & (r[:, 3] > wy0 - my)
            ids = np.flatnonzero(near)
            rects, fx, above, counts = r[ids], m.fixed, m.above, m.counts[ids]
        else:
            box = ((wx0 - mx) * dx, (wy0 - my) * dy, (wx1 + mx) * dx, (wy1 + my) * dy)
            ids = self.index.query(box)
            _, vis_xy, vis_ps, _ = maths.vis_geometry(
                self.index.coords[ids], self.index.patch, self.downsample, None, self.region
            )
            rects = patch_rects(vis_xy, vis_ps, self.region)
            fx, above = self.paint.fixed, self.paint.above
        scale = (1.0 / float(dx), 1.0 / float(dy))
        plan = RenderPlan(
            slide=self.slide,  # type: ignore[arg-type]
            level=self.level,
            scale=scale,
            downsample=(float(dx), float(dy)),
            l0_top_left=(0, 0),
            region=self.region,
            cd=1,
            blank=self.blank or self.slide is None,
            alpha=float(self.alpha),
            lut=maths.colormap_lut(self.cmap),
            binarize=self.paint.binarize,
            rects=rects,
            fixed=Fixed(fx.hi[ids], fx.lo[ids], fx.shift),
            above=above[ids],
            counts=counts,
            ksize=self.ksize,
            tissue=self.tissue,
            use_holes=self.use_holes,
            seg_offset=(0, 0),
            ntx=1,
            tile_starts=np.array([0, len(ids)], dtype=np.int64),
            tile_patches=np.arange(len(ids), dtype=np.int64),
            _mask_cache=self.masks.blocks,
            _mask_lock=self.masks.lock,
        )
        return plan

    def rgb(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The production picture of vis ``window`` (x0, y0, x1, y1): colours blended over the
        slide (or white) with CLAM's rules, (h, w, 3) uint8 RGB."""
        return self.plan(window).render_window(0, 0, window)

    def rgba(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The overlay alone, (h, w, 4) uint8 RGBA: the map's colours where painted (score at or
        above the threshold, inside tissue), transparent elsewhere; alpha is left to the page.
        With blur, the overlay values are blurred as CLAM blurs them (the slide is not)."""
        plan = self.plan(window)
        wx0, wy0, wx1, wy1 = window
        w, h = wx1 - wx0, wy1 - wy0
        out = np.zeros((h, w, 4), dtype=np.uint8)
        if not plan.above.any():
            return out
        k = plan.ksize
        rw, rh = self.region
        if k is None:
            o = window
        else:
            rx, ry = k[0] // 2, k[1] // 2
            o = (max(wx0 - rx, 0), max(wy0 - ry, 0), min(wx1 + rx, rw), min(wy1 + ry, rh))
        cells = window_cells(
            plan.rects, plan.fixed, plan.above, o, binarize=plan.binarize, counts=plan.counts
        )
        if not cells.painted.any():
            return out
        values = cells.expand(cells.avg)
        if k is not None:
            values = cv2.GaussianBlur(values, k, 0)
        crop = (slice(wy0 - o[1], wy1 - o[1]), slice(wx0 - o[0], wx1 - o[0]))
        paint = cells.expand(cells.painted)[crop]
        tissue = plan.tissue_window(wx0, wy0, w, h)
        if tissue is not None:
            paint = paint & tissue
        out[..., :3] = plan.colours(values[crop])
        out[~paint] = 0  # transparent pixels carry no colour (premultiplied-alpha drawers)
        out[..., 3] = paint * np.uint8(255)
        return out


def level_region(l0_size: tuple[int, int], downsample: tuple[float, float]) -> tuple[int, int]:
    """The slide's (w, h) at a downsample that is not a pyramid level (OpenSeadragon's powers
    of two): ``ceil(l0 / downsample)``, so every patch edge ``ceil(c / d)`` falls inside."""
    return (
        max(1, math.ceil(l0_size[0] / downsample[0])),
        max(1, math.ceil(l0_size[1] / downsample[1])),
    )


def describe(index: ScoreIndex, scale: str) -> dict[str, Any]:
    """What the colour bar's ends mean for ``scale`` (for metadata and the page)."""
    if scale == "raw" and len(index.scores):
        lo, hi = float(index.scores.min()), float(index.scores.max())
        if lo < 0:
            bound = max(-lo, hi)
            return {"scale": "raw", "low": -bound, "high": bound}
        return {"scale": "raw", "low": lo, "high": hi}
    return {"scale": scale, "low": 0.0, "high": 100.0}


def write_region(
    view: RegionView,
    window: tuple[int, int, int, int],
    out: Path,
    *,
    meta: str | None = None,
    mpp: float | None = None,
    footer: np.ndarray | None = None,
) -> Path:
    """Write vis ``window`` of ``view`` (blended, :meth:`RegionView.rgb`) to ``out`` in its
    extension's format, tile by tile through the production writer's sinks (so a region larger
    than memory streams as a production image does), with ``footer`` rows (a colour bar)
    below it and ``meta`` embedded."""
    from .render import _finish, _stream, _tile_shape
    from .writers import open_sinks

    x0, y0, x1, y1 = window
    width, height = x1 - x0, y1 - y0
    total = height + (0 if footer is None else footer.shape[0])
    sinks = open_sinks(Path(out), width, total, mpp=mpp, meta=meta)

    def tile(tx: int, ty: int, box: tuple[int, int, int, int]) -> np.ndarray:
        bx0, by0, bx1, by1 = box
        rgb = np.empty((by1 - by0, bx1 - bx0, 3), np.uint8)
        top = min(by1, height)
        if by0 < top:
            rgb[: top - by0] = view.rgb((x0 + bx0, y0 + by0, x0 + bx1, y0 + top))
        if footer is not None and by1 > height:
            rgb[max(0, height - by0) :] = footer[max(0, by0 - height) : by1 - height, bx0:bx1]
        return rgb

    _stream(tile, width, total, _tile_shape(512, sinks), sinks, 0)
    _finish(sinks)
    return Path(out)
