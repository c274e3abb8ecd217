"""What to draw: :class:`HeatmapSpec`, :class:`RenderResult` and the render plan.

The plan resolves a spec against one slide once (vis level, region, patch rectangles, fixed-point
values, blur kernel, tissue) and then draws any vis window of the heatmap on demand, knowing
nothing of tiles' order or of output files. Frames: ``l0_`` level-0 pixels, ``vis_`` pixels of
the region at the vis level, ``out_`` pixels of the saved image (see :mod:`clam_heat.heatmap`).
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from ..slide import Slide
    from ..tissue import TissueContours

__all__ = [
    "MASK_CACHE_BLOCKS",
    "MASK_TILE",
    "HeatmapSpec",
    "RenderPlan",
    "RenderResult",
    "make_plan",
    "resolve_vis_level",
    "shrink",
]

#: Side of the fixed blocks the tissue mask is rasterised in (vis px), and how many are cached.
MASK_TILE = 1024
MASK_CACHE_BLOCKS = 16


@dataclass(frozen=True)
class HeatmapSpec:
    """How one heatmap is drawn (CLAM ``visHeatmap`` arguments, with CLAM's meanings).

    ``vis_level`` -1 is resolved to the best level for downsample 32 when rendering.
    ``roi`` is level-0 (x1, y1, x2, y2). ``use_percentiles`` is CLAM's
    ``convert_to_percentiles``: without it the scores must already be on CLAM's 0-100 scale
    (e.g. from :func:`percentile_of_scores`). ``tile_size`` is the output tile side (pixels of
    the saved image); ``workers`` threads render tiles (0: two, or one in a local worker limited
    to one CPU thread; see :func:`~clam_heat.threads.helper_threads`).
    """

    vis_level: int = -1
    alpha: float = 0.4
    cmap: str = "jet"
    blank_canvas: bool = False
    blur: bool = False
    overlap: float = 0.0
    binarize: bool = False
    binary_thresh: float = -1.0
    use_percentiles: bool = False
    custom_downsample: int = 1
    segment: bool = True
    use_holes: bool = True
    roi: tuple[int, int, int, int] | None = None
    tile_size: int = 1024
    workers: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.vis_level < -1:
            problems.append(f"vis_level = {self.vis_level}: must be >= -1")
        if not self.alpha >= 0:
            problems.append(f"alpha = {self.alpha}: must be >= 0")
        if not 0 <= self.overlap < 1:
            problems.append(f"overlap = {self.overlap}: must be in [0, 1)")
        if int(self.custom_downsample) != self.custom_downsample or self.custom_downsample < 1:
            problems.append(f"custom_downsample = {self.custom_downsample}: must be an int >= 1")
        if self.tile_size < 16:
            problems.append(f"tile_size = {self.tile_size}: must be >= 16")
        if self.workers < 0:
            problems.append(f"workers = {self.workers}: must be >= 0")
        if self.roi is not None:
            if len(self.roi) != 4:
                problems.append(f"roi = {self.roi}: must be (x1, y1, x2, y2)")
            elif not (self.roi[2] > self.roi[0] and self.roi[3] > self.roi[1]):
                problems.append(f"roi = {self.roi}: needs x2 > x1 and y2 > y1")
        if problems:
            raise ValueError("HeatmapSpec: " + "; ".join(problems))
        maths.colormap_lut(self.cmap)  # fails early on an unknown name


@dataclass(frozen=True)
class RenderResult:
    """What :func:`render_heatmap` produced.

    ``shape`` is the saved image's (h, w); ``image`` is the (h, w, 3) uint8 RGB image only
    when it was asked for (:func:`heatmap_image`).
    """

    shape: tuple[int, int]
    vis_level: int
    threshold: float
    n_patches: int
    paths: tuple[Path, ...]
    seconds: float
    image: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class RenderPlan:
    """Everything a tile needs, resolved once per render."""

    slide: Slide
    level: int
    scale: tuple[float, float]
    downsample: tuple[float, float]
    l0_top_left: tuple[int, int]
    region: tuple[int, int]  # (w, h) vis
    cd: int
    blank: bool
    alpha: float
    lut: np.ndarray
    binarize: bool
    rects: np.ndarray  # (K, 4) vis rects
    fixed: Fixed
    above: np.ndarray
    ksize: tuple[int, int] | None
    tissue: Any
    use_holes: bool
    seg_offset: tuple[int, int]
    # tile buckets
    ntx: int = 0
    tile_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    tile_patches: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: patches per rectangle when equal rectangles were merged (None: one each)
    counts: np.ndarray | None = None
    _mask_cache: OrderedDict[tuple[int, int], np.ndarray] = field(default_factory=OrderedDict)
    _mask_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def halo(self) -> tuple[int, int]:
        if self.ksize is None:
            return 0, 0
        return 2 * (self.ksize[0] // 2), 2 * (self.ksize[1] // 2)

    def bucket(self, tile: tuple[int, int], n_tiles: tuple[int, int]) -> None:
        """Assign each patch to every output tile (w, h) whose (haloed) vis window it touches.

        One vectorised pass: (tile, patch) pairs sorted by tile, so a tile's patches are one
        slice (O(patches in tile) per tile, never a scan of all patches).
        """
        ntx, nty = n_tiles
        self.ntx = ntx
        vtw, vth = tile[0] * self.cd, tile[1] * self.cd
        hx, hy = self.halo
        r = self.rects
        ax, bx = (r[:, 0] - hx) // vtw, (r[:, 2] - 1 + hx) // vtw
        ay, by = (r[:, 1] - hy) // vth, (r[:, 3] - 1 + hy) // vth
        ok = (r[:, 0] < r[:, 2]) & (r[:, 1] < r[:, 3]) & (bx >= 0) & (by >= 0)
        ok &= (ax < ntx) & (ay < nty)
        ax, bx = np.clip(ax, 0, ntx - 1), np.clip(bx, 0, ntx - 1)
        ay, by = np.clip(ay, 0, nty - 1), np.clip(by, 0, nty - 1)
        nx = np.where(ok, bx - ax + 1, 0)
        ny = np.where(ok, by - ay + 1, 0)
        per = nx * ny
        total = int(per.sum())
        pid = np.repeat(np.arange(len(r), dtype=np.int64), per)
        offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
        tx = ax[pid] + offs % nx[pid]
        ty = ay[pid] + offs // nx[pid]
        tid = ty * ntx + tx
        order = np.argsort(tid, kind="stable")
        self.tile_patches = pid[order]
        self.tile_starts = np.searchsorted(tid[order], np.arange(ntx * nty + 1))

    def patches_of(self, tx: int, ty: int) -> np.ndarray:
        t = ty * self.ntx + tx
        return self.tile_patches[self.tile_starts[t] : self.tile_starts[t + 1]]

    def canvas(self, vx0: int, vy0: int, w: int, h: int) -> np.ndarray:
        """Slide pixels (or white) of a vis window, (h, w, 3) uint8 RGB."""
        if self.blank:
            return np.full((h, w, 3), 255, dtype=np.uint8)
        l0_x = maths.l0_to_read(vx0, self.l0_top_left[0], self.downsample[0])
        l0_y = maths.l0_to_read(vy0, self.l0_top_left[1], self.downsample[1])
        return self.slide.read_region((l0_x, l0_y), self.level, (w, h))

    def tissue_window(self, vx0: int, vy0: int, w: int, h: int) -> np.ndarray | None:
        """CLAM's seg mask over a vis window, (h, w) bool (None: no masking).

        Contours are rasterised on a fixed grid of :data:`MASK_TILE` blocks of the region, never
        on the window itself: OpenCV's polygon fill clips edges at the image border, so a mask
        drawn on an arbitrary window is not a crop of the full mask. Composing fixed blocks
        makes every pixel independent of the render tiling (it equals CLAM's full-region mask
        except, at most, a few boundary pixels where a tissue edge crosses a block border).
        """
        if self.tissue is None:
            return None
        mask = np.zeros((h, w), dtype=bool)
        if isinstance(self.tissue, np.ndarray):
            src = self.tissue[vy0 : vy0 + h, vx0 : vx0 + w]
            mask[: src.shape[0], : src.shape[1]] = src
            return mask
        m = MASK_TILE
        for my in range(vy0 // m, (vy0 + h - 1) // m + 1):  # a few blocks per window
            for mx in range(vx0 // m, (vx0 + w - 1) // m + 1):
                block = self._mask_block(mx, my)
                bx0, by0 = mx * m, my * m
                x0, y0 = max(vx0, bx0), max(vy0, by0)
                x1, y1 = min(vx0 + w, bx0 + m), min(vy0 + h, by0 + m)
                mask[y0 - vy0 : y1 - vy0, x0 - vx0 : x1 - vx0] = block[
                    y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0
                ]
        return mask

    def _mask_block(self, mx: int, my: int) -> np.ndarray:
        """One (MASK_TILE, MASK_TILE) block of the tissue mask, cached (threads share it)."""
        key = (mx, my)
        with self._mask_lock:
            hit = self._mask_cache.get(key)
            if hit is not None:
                self._mask_cache.move_to_end(key)
                return hit
        from ..tissue import rasterize_tissue

        # rasterize_tissue shifts by int32(-l0_origin * scale); choose l0_origin so that this
        # is exactly CLAM's region offset minus the block position (always <= 0), float-safe.
        dx = self.seg_offset[0] - mx * MASK_TILE
        dy = self.seg_offset[1] - my * MASK_TILE
        origin = ((0.5 - dx) / self.scale[0], (0.5 - dy) / self.scale[1])
        block = rasterize_tissue(
            self.tissue,
            l0_origin=origin,
            shape=(MASK_TILE, MASK_TILE),
            scale=self.scale,
            use_holes=self.use_holes,
        )
        with self._mask_lock:
            self._mask_cache[key] = block
            while len(self._mask_cache) > MASK_CACHE_BLOCKS:
                self._mask_cache.popitem(last=False)
        return block

    def colours(self, values: np.ndarray) -> np.ndarray:
        return maths.apply_colormap(values, self.lut)

    def render_window(self, tx: int, ty: int, window: tuple[int, int, int, int]) -> np.ndarray:
        """The blended heatmap of one vis window (x0, y0, x1, y1), (h, w, 3) uint8 RGB."""
        vx0, vy0, vx1, vy1 = window
        w, h = vx1 - vx0, vy1 - vy0
        idx = self.patches_of(tx, ty)
        rects, above = self.rects[idx], self.above[idx]
        fixed = Fixed(self.fixed.hi[idx], self.fixed.lo[idx], self.fixed.shift)
        counts = None if self.counts is None else self.counts[idx]
        if self.ksize is None:
            canvas = self.canvas(vx0, vy0, w, h)
            if not above.any():
                return canvas
            cells = window_cells(rects, fixed, above, window, binarize=self.binarize, counts=counts)
            if not cells.painted.any():
                return canvas
            paint = cells.expand(cells.painted)
            tissue = self.tissue_window(vx0, vy0, w, h)
            if tissue is not None:
                paint &= tissue
            img = canvas.copy()
            _paint(img, cells.expand(self.colours(cells.avg)), paint)
            return maths.blend(img, canvas, self.alpha)
        return self._render_blurred(rects, fixed, above, window, counts)

    def _render_blurred(
        self,
        rects: np.ndarray,
        fixed: Fixed,
        above: np.ndarray,
        window: tuple[int, int, int, int],
        counts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Blur needs halos: the overlay blur reads r px around the painted window, and the
        image blur reads r px around the tile, so the overlay is built on tile + 2r."""
        assert self.ksize is not None
        vx0, vy0, vx1, vy1 = window
        rw, rh = self.region
        rx, ry = self.ksize[0] // 2, self.ksize[1] // 2
        # outer window (tile + 2r) for the overlay, inner (tile + r) for the painted image
        o = (
            max(vx0 - 2 * rx, 0),
            max(vy0 - 2 * ry, 0),
            min(vx1 + 2 * rx, rw),
            min(vy1 + 2 * ry, rh),
        )
        i = (max(vx0 - rx, 0), max(vy0 - ry, 0), min(vx1 + rx, rw), min(vy1 + ry, rh))
        cells = window_cells(rects, fixed, above, o, binarize=self.binarize, counts=counts)
        overlay = cv2.GaussianBlur(cells.expand(cells.avg), self.ksize, 0)
        inner = (slice(i[1] - o[1], i[3] - o[1]), slice(i[0] - o[0], i[2] - o[0]))
        paint = cells.expand(cells.painted)[inner]
        iw, ih = i[2] - i[0], i[3] - i[1]
        canvas = self.canvas(i[0], i[1], iw, ih)
        tissue = self.tissue_window(i[0], i[1], iw, ih)
        if tissue is not None:
            paint &= tissue
        img = canvas.copy()
        _paint(img, self.colours(overlay[inner]), np.ascontiguousarray(paint))
        img = cv2.GaussianBlur(img, self.ksize, 0)
        crop = (slice(vy0 - i[1], vy1 - i[1]), slice(vx0 - i[0], vx1 - i[0]))
        return maths.blend(
            np.ascontiguousarray(img[crop]), np.ascontiguousarray(canvas[crop]), self.alpha
        )

    def render_tile(self, tx: int, ty: int, out_box: tuple[int, int, int, int]) -> np.ndarray:
        """Output tile ``out_box`` (x0, y0, x1, y1) in saved-image pixels."""
        cd = self.cd
        ox0, oy0, ox1, oy1 = out_box
        rgb = self.render_window(tx, ty, (ox0 * cd, oy0 * cd, ox1 * cd, oy1 * cd))
        return shrink(rgb, cd)


def _paint(img: np.ndarray, colour: np.ndarray, where: np.ndarray) -> None:
    """``img[where] = colour[where]`` in place (OpenCV's masked copy: ~10x numpy's)."""
    cv2.copyTo(colour, where.view(np.uint8), img)


def shrink(rgb: np.ndarray, cd: int) -> np.ndarray:
    """Exact ``cd`` x ``cd`` block mean (input sides are multiples of ``cd``)."""
    if cd == 1:
        return rgb
    h, w = rgb.shape[0] // cd, rgb.shape[1] // cd
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)


def resolve_vis_level(slide: Slide, vis_level: int) -> int:
    """``vis_level``, with CLAM's -1 made concrete (best level for downsample 32), checked."""
    level = (
        vis_level if vis_level >= 0 else slide.best_level_for_downsample(maths.AUTO_VIS_DOWNSAMPLE)
    )
    slide.check_level(level)
    return level


def make_plan(
    slide: Slide,
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    spec: HeatmapSpec,
    tissue: TissueContours | np.ndarray | None,
) -> tuple[RenderPlan, float, int]:
    """Resolve ``spec`` against ``slide`` once: returns (plan, binarize threshold, patches kept
    by the ROI). Validates the inputs (pairing, finite scores, ROI, tissue mask shape)."""
    level = resolve_vis_level(slide, spec.vis_level)
    ds = slide.level_downsamples[level]
    coords = np.asarray(l0_coords).reshape(-1, 2)
    flat = np.asarray(scores).reshape(-1)
    if len(flat) != len(coords):
        raise ValueError(f"{len(flat)} scores for {len(coords)} coords; they must pair up")
    if flat.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {flat.dtype}")
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("scores contain NaN or inf; a heatmap needs finite attention scores")
    threshold = maths.binarize_threshold(spec.binary_thresh, len(flat)) if spec.binarize else 0.0
    keep, vis_xy, vis_ps, region = maths.vis_geometry(
        coords, patch_size_l0, ds, spec.roi, slide.level_dimensions[level]
    )
    if region[0] <= 0 or region[1] <= 0:
        raise ValueError(f"roi {spec.roi} is empty at vis level {level} (region {region})")
    kept = flat[keep]
    pct = maths.to_percentiles(kept) if spec.use_percentiles else kept
    values, above = maths.patch_values(pct / 100, threshold, binarize=spec.binarize)
    scale = (1.0 / float(ds[0]), 1.0 / float(ds[1]))
    top_left = (0, 0) if spec.roi is None else (int(spec.roi[0]), int(spec.roi[1]))
    seg_offset = (np.asarray(top_left, dtype=np.float64) * np.asarray(scale) * -1).astype(np.int32)
    use_tissue = tissue if spec.segment else None
    if isinstance(use_tissue, np.ndarray) and use_tissue.shape != (region[1], region[0]):
        raise ValueError(
            f"tissue mask shape {use_tissue.shape} != region (h, w) {(region[1], region[0])}"
        )
    rects = patch_rects(vis_xy, vis_ps, region)
    visible = (rects[:, 0] < rects[:, 2]) & (rects[:, 1] < rects[:, 3])  # others add nothing
    plan = RenderPlan(
        slide=slide,
        level=level,
        scale=scale,
        downsample=(float(ds[0]), float(ds[1])),
        l0_top_left=top_left,
        region=region,
        cd=int(spec.custom_downsample),
        blank=spec.blank_canvas,
        alpha=float(spec.alpha),
        lut=maths.colormap_lut(spec.cmap),
        binarize=spec.binarize,
        rects=rects[visible],
        fixed=to_fixed(values[visible]),
        above=above[visible],
        ksize=maths.gaussian_ksize(vis_ps, spec.overlap) if spec.blur else None,
        tissue=use_tissue,
        use_holes=spec.use_holes,
        seg_offset=(int(seg_offset[0]), int(seg_offset[1])),
    )
    return plan, threshold, int(keep.sum())
