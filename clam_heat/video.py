"""Fly-through video of one slide's attention (``clam-heat video CONFIG --slide ID``).

The camera starts on the whole slide while the heatmap fades in over the tissue, then flies to
the top-k attention regions in order of attention (smooth zoom and pan, zooming out on the way
when two regions are far apart), holds on each, and flies back out. Written with OpenCV's MPEG-4
writer (``mp4v``), no extra dependency.

Coordinate frames (as :mod:`clam_heat.slide`): ``l0_`` level-0 pixels, ``l_`` pixels of the
level being read, frame pixels are the video's. A :class:`View` is a level-0 centre and width;
each frame reads its view at the level that fits it (never a level-0 canvas), levels small
enough to hold whole are read once and cut from. The overlay comes from the blockmap scores
(percentiles, as CLAM draws them), painted once on a small patch-resolution canvas and warped
per frame.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import atomic_path
from .errors import ClamHeatError
from .heatmap import apply_colormap, to_percentiles

__all__ = ["VideoError", "VideoInfo", "View", "make_flythrough", "plan_frames", "top_regions"]

#: RGB outside the slide.
BACKGROUND = (20, 20, 20)
#: Whole pyramid levels up to this many pixels are read once and cut from.
CACHE_LEVEL_PIXELS = 16_000_000
#: In-flight frames may upsample a level by up to this factor: motion hides it, reads shrink 4x.
FLY_UPSAMPLE = 2.0
#: Overlay canvas resolution: pixels per patch side (capped so the canvas stays small).
MAP_PIXELS_PER_PATCH = 8
MAP_MAX_PIXELS = 16_000_000
#: Share of the video spent on the opening overview (heatmap fading in) and on the way back.
INTRO, OUTRO_FLY, OUTRO_HOLD = 0.15, 0.08, 0.04


class VideoError(ClamHeatError):
    """The video cannot be made (unknown slide, no writer, nothing to show)."""


# --------------------------------------------------------------------------------------------
# Pure geometry and timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What one frame shows: level-0 centre (``l0_cx``, ``l0_cy``) and level-0 width."""

    l0_cx: float
    l0_cy: float
    l0_width: float


def whole_view(l0_dims: tuple[int, int], size: tuple[int, int], margin: float = 1.02) -> View:
    """The view that shows the whole slide in a ``size`` = (w, h) frame, with a small margin.

    >>> whole_view((4000, 3000), (1280, 720))
    View(l0_cx=2000.0, l0_cy=1500.0, l0_width=5440.0)
    """
    l0_w, l0_h = l0_dims
    aspect = size[0] / size[1]
    return View(l0_w / 2, l0_h / 2, max(l0_w, l0_h * aspect) * margin)


def ease(t: float) -> float:
    """Smoothstep easing on [0, 1]: zero speed at both ends.

    >>> ease(0.0), ease(0.5), ease(1.0), ease(2.0)
    (0.0, 0.5, 1.0, 1.0)
    """
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def fly(a: View, b: View, t: float, *, see_both: float = 1.3) -> View:
    """The view a fraction ``t`` of the way from ``a`` to ``b``: eased pan, zoom on a log scale,
    widened mid-way (up to ``see_both`` x their distance) when the two are far apart.

    >>> a, b = View(0, 0, 100), View(1000, 0, 100)
    >>> fly(a, b, 0.0) == a, fly(a, b, 1.0) == b
    (True, True)
    >>> fly(a, b, 0.5)
    View(l0_cx=500.0, l0_cy=0.0, l0_width=1300.0...)
    """
    e = ease(t)
    if e in (0.0, 1.0):  # exact ends, so a hold after a flight is one run of equal views
        return a if e == 0.0 else b
    log_w = (1 - e) * math.log(a.l0_width) + e * math.log(b.l0_width)
    mid = 0.5 * (math.log(a.l0_width) + math.log(b.l0_width))
    need = math.log(max(math.hypot(b.l0_cx - a.l0_cx, b.l0_cy - a.l0_cy) * see_both, 1.0))
    if need > mid:
        log_w += (need - mid) * math.sin(math.pi * e)
    return View(
        a.l0_cx + e * (b.l0_cx - a.l0_cx), a.l0_cy + e * (b.l0_cy - a.l0_cy), math.exp(log_w)
    )


def top_regions(
    l0_coords: np.ndarray, scores: np.ndarray, patch_size_l0: int, k: int, min_distance: float
) -> list[tuple[float, float]]:
    """Level-0 centres of up to ``k`` high-attention patches, best first, each at least
    ``min_distance`` from those already chosen (so every stop shows a new region).

    >>> xy = np.array([[0, 0], [100, 0], [1000, 0], [2000, 0]])
    >>> top_regions(xy, np.array([0.9, 0.8, 0.7, 0.1]), 100, 2, 500)
    [(50.0, 50.0), (1050.0, 50.0)]
    """
    coords = np.asarray(l0_coords, dtype=np.float64).reshape(-1, 2) + patch_size_l0 / 2
    chosen: list[np.ndarray] = []
    for i in np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable"):
        if len(chosen) >= k:
            break
        if all(np.hypot(*(coords[i] - c)) >= min_distance for c in chosen):
            chosen.append(coords[i])
    return [(float(x), float(y)) for x, y in chosen]


def _split(n: int, weights: Sequence[float]) -> list[int]:
    """Frame counts proportional to ``weights`` that add up to exactly ``n``.

    >>> _split(10, [1, 1, 1])
    [3, 4, 3]
    """
    edges = np.rint(np.cumsum([0.0, *weights]) / sum(weights) * n).astype(int)
    return np.diff(edges).tolist()


def plan_frames(
    overview: View, stops: Sequence[View], n_frames: int
) -> tuple[list[View], list[float], list[tuple[int, int]]]:
    """Every frame's view and heatmap strength (0..1), plus each stop's (first, last) hold frame.

    Timeline: overview with the heatmap fading in, then fly + hold per stop, fly back, hold.

    >>> views, heat, holds = plan_frames(View(50, 50, 100), [View(10, 10, 10)], 20)
    >>> len(views), heat[0], heat[-1], holds
    (20, 0.0, 1.0, [(10, 17)])
    >>> views[holds[0][0]] == View(10, 10, 10), views[0] == views[-1] == View(50, 50, 100)
    (True, True)
    """
    if not stops:
        segments: list[tuple[str, View, View]] = [("hold", overview, overview)]
        weights = [1.0]
    else:
        share = (1.0 - INTRO - OUTRO_FLY - OUTRO_HOLD) / len(stops) / 2
        segments, weights = [("hold", overview, overview)], [INTRO]
        here = overview
        for stop in stops:
            segments += [("fly", here, stop), ("hold", stop, stop)]
            weights += [share, share]
            here = stop
        segments += [("fly", here, overview), ("hold", overview, overview)]
        weights += [OUTRO_FLY, OUTRO_HOLD]
    counts = _split(n_frames, weights)
    intro = max(counts[0] - 1, 1)
    views: list[View] = []
    holds: list[tuple[int, int]] = []
    for i, ((kind, a, b), count) in enumerate(zip(segments, counts, strict=True)):
        if kind == "hold" and 0 < i < len(segments) - 1 and count:
            holds.append((len(views), len(views) + count - 1))
        views += [a if kind == "hold" else fly(a, b, (j + 1) / count) for j in range(count)]
    heat = [ease(f / intro) for f in range(n_frames)]
    return views, heat, holds


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _paint_map(
    l0_coords: np.ndarray, values01: np.ndarray, patch_size_l0: int, l0_dims: tuple[int, int]
) -> tuple[float, np.ndarray, np.ndarray]:
    """Patch values on a small canvas: (level-0 px per canvas px, (h, w) values, (h, w) cover)."""
    from .compare import patch_canvas

    l0_w, l0_h = l0_dims
    ds = patch_size_l0 / MAP_PIXELS_PER_PATCH
    ds = max(ds, math.sqrt(l0_w * l0_h / MAP_MAX_PIXELS), 1.0)
    shape = (math.ceil(l0_h / ds), math.ceil(l0_w / ds))
    mean, covered = patch_canvas(l0_coords, values01, patch_size_l0, ds, shape)
    return ds, mean, covered


class _Renderer:
    """Frames of one slide: view reads at the fitting level plus the warped overlay."""

    def __init__(
        self,
        slide: Any,
        blockmap: tuple[np.ndarray, np.ndarray, int],
        size: tuple[int, int],
        cmap: str,
        alpha: float,
    ) -> None:
        scores, coords, patch_l0 = blockmap
        self.slide, self.size, self.alpha = slide, size, alpha
        values = to_percentiles(scores) / 100.0
        self.map_ds, mean, covered = _paint_map(coords, values, patch_l0, slide.dimensions)
        self.colour = apply_colormap(mean, cmap)
        self.cover = covered.astype(np.float32)
        self._levels: dict[int, np.ndarray] = {}

    def cache_levels(self) -> None:
        """Read once every level small enough to keep whole (before threads start)."""
        for level, (w, h) in enumerate(self.slide.level_dimensions):
            if w * h <= CACHE_LEVEL_PIXELS:
                self._levels[level] = self.slide.read_region((0, 0), level, (w, h))

    def _pixels(self, level: int, l_box: tuple[int, int, int, int]) -> np.ndarray:
        l_x0, l_y0, l_x1, l_y1 = l_box
        if level in self._levels:
            return self._levels[level][l_y0:l_y1, l_x0:l_x1]
        dx, dy = self.slide.level_downsamples[level]
        l0_xy = (round(l_x0 * dx), round(l_y0 * dy))
        return self.slide.read_region(l0_xy, level, (l_x1 - l_x0, l_y1 - l_y0))

    def base(self, view: View, *, sharp: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tissue, overlay colour and overlay cover of one view, each (h, w[, 3]); ``sharp``
        reads the finest level needed, else a level up to :data:`FLY_UPSAMPLE` coarser."""
        fw, fh = self.size
        scale = view.l0_width / fw  # level-0 px per frame px
        l0_x0, l0_y0 = view.l0_cx - fw * scale / 2, view.l0_cy - fh * scale / 2
        out = np.empty((fh, fw, 3), np.uint8)
        out[:] = BACKGROUND
        level = self.slide.best_level_for_downsample(scale * (1.0 if sharp else FLY_UPSAMPLE))
        dx, dy = self.slide.level_downsamples[level]
        l_w, l_h = self.slide.level_dimensions[level]
        l_x0 = max(int(math.floor(l0_x0 / dx)), 0)
        l_y0 = max(int(math.floor(l0_y0 / dy)), 0)
        l_x1 = min(int(math.ceil((l0_x0 + fw * scale) / dx)) + 1, l_w)
        l_y1 = min(int(math.ceil((l0_y0 + fh * scale) / dy)) + 1, l_h)
        if l_x1 > l_x0 and l_y1 > l_y0:
            src = self._pixels(level, (l_x0, l_y0, l_x1, l_y1))
            sx, sy = dx, dy  # level-0 px per source px
            shrink = int(scale / max(dx, dy))
            if shrink >= 2:  # minify by whole steps first (area average), warp the rest
                small = (max(src.shape[1] // shrink, 1), max(src.shape[0] // shrink, 1))
                sx *= src.shape[1] / small[0]
                sy *= src.shape[0] / small[1]
                src = cv2.resize(src, small, interpolation=cv2.INTER_AREA)
            m = np.array(
                [
                    [sx / scale, 0, (l_x0 * dx - l0_x0) / scale],
                    [0, sy / scale, (l_y0 * dy - l0_y0) / scale],
                ]
            )
            cv2.warpAffine(
                src,
                m,
                (fw, fh),
                dst=out,
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_TRANSPARENT,
            )
        k = self.map_ds / scale
        m = np.array([[k, 0, -l0_x0 / scale], [0, k, -l0_y0 / scale]])
        colour = cv2.warpAffine(self.colour, m, (fw, fh), flags=cv2.INTER_LINEAR)
        cover = cv2.warpAffine(self.cover, m, (fw, fh), flags=cv2.INTER_LINEAR)
        return out, colour, cover

    def frames(self, view: View, heats: Sequence[float]) -> list[np.ndarray]:
        """BGR frames of one view at each heatmap strength (equal strengths share one array);
        a view shown once is in flight and read coarser."""
        tissue, colour, cover = self.base(view, sharp=len(heats) > 1)
        done: dict[float, np.ndarray] = {}
        for heat in heats:
            if heat not in done:
                a = (cover * (heat * self.alpha))[..., None]
                mixed = tissue + a * (colour.astype(np.float32) - tissue)
                rgb = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
                done[heat] = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        return [done[h] for h in heats]


def _runs(views: Sequence[View], heats: Sequence[float]) -> list[tuple[View, list[float]]]:
    """Consecutive frames with the same view, grouped (holds are rendered once).

    >>> v, w = View(0, 0, 1), View(1, 0, 1)
    >>> [(r[0] == v, r[1]) for r in _runs([v, v, w], [0.0, 0.5, 1.0])]
    [(True, [0.0, 0.5]), (False, [1.0])]
    """
    runs: list[tuple[View, list[float]]] = []
    for view, heat in zip(views, heats, strict=True):
        if runs and runs[-1][0] == view:
            runs[-1][1].append(heat)
        else:
            runs.append((view, [heat]))
    return runs


def _ordered(
    renderer: _Renderer, runs: list[tuple[View, list[float]]], workers: int
) -> Iterator[np.ndarray]:
    """Frames in order, rendered by ``workers`` threads a few runs ahead (bounded memory)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[list[np.ndarray]]] = deque()
        for view, heats in runs:
            pending.append(pool.submit(renderer.frames, view, heats))
            if len(pending) > 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What :func:`make_flythrough` wrote."""

    path: Path
    n_frames: int
    fps: float
    size: tuple[int, int]
    overview: View
    regions: list[tuple[float, float]] = field(default_factory=list)
    holds: list[tuple[int, int]] = field(default_factory=list)
    render_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps


def _video_inputs(config_path: str | Path, slide_id: str) -> tuple[Path, Path, str]:
    """The slide file, its blockmap H5 and the run's colormap (the one run lookup)."""
    from .compare import run_outputs
    from .config import load_config

    runs = run_outputs(config_path)
    if slide_id not in runs:
        known = ", ".join(sorted(runs)[:8]) or "none"
        raise VideoError(
            f"{config_path}: slide {slide_id!r} has no finished inference (finished: {known}); "
            "run `clam-heat run` on this config first"
        )
    cmap = load_config(config_path).heatmap_arguments.cmap
    return runs[slide_id].slide_path, runs[slide_id].blockmap, str(cmap)


def make_flythrough(
    config_path: str | Path,
    slide_id: str,
    out: str | Path,
    *,
    seconds: float = 20.0,
    fps: float = 25.0,
    size: tuple[int, int] = (1280, 720),
    topk: int = 5,
    zoom_patches: float = 8.0,
    alpha: float = 0.5,
    cmap: str | None = None,
    workers: int | None = None,
) -> VideoInfo:
    """Write an MP4 flying over ``slide_id``'s top-``topk`` attention regions.

    ``zoom_patches`` is how many patches wide a region's close-up is; ``alpha`` the overlay's
    full strength; ``cmap`` defaults to the run's ``heatmap_arguments.cmap``.
    """
    from .h5io import read_scores
    from .slide import open_slide

    fw, fh = int(size[0]), int(size[1])
    if fw < 16 or fh < 16 or fw % 2 or fh % 2:
        raise VideoError(f"size must be even and at least 16x16 px, got {fw}x{fh}")
    n_frames = round(seconds * fps)
    if n_frames < 2:
        raise VideoError(f"seconds x fps must give at least 2 frames, got {seconds} x {fps}")
    slide_path, blockmap, run_cmap = _video_inputs(config_path, slide_id)
    scores, coords, patch_l0 = read_scores(blockmap)
    if len(scores) == 0:
        raise VideoError(f"{blockmap}: no patches, nothing to fly over")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        overview = whole_view(slide.dimensions, (fw, fh))
        close = min(zoom_patches * patch_l0, overview.l0_width)
        centres = top_regions(coords, scores, patch_l0, topk, min_distance=0.75 * close)
        stops = [View(x, y, close) for x, y in centres]
        views, heats, holds = plan_frames(overview, stops, n_frames)
        renderer = _Renderer(slide, (scores, coords, patch_l0), (fw, fh), cmap or run_cmap, alpha)
        renderer.cache_levels()
        with atomic_path(target) as tmp:
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (fw, fh))
            if not writer.isOpened():
                raise VideoError(f"{target}: OpenCV cannot open an MPEG-4 writer (mp4v)")
            try:
                n_workers = workers or min(4, os.cpu_count() or 1)
                for frame in _ordered(renderer, _runs(views, heats), n_workers):
                    writer.write(frame)
            finally:
                writer.release()
    return VideoInfo(
        path=target,
        n_frames=n_frames,
        fps=float(fps),
        size=(fw, fh),
        overview=overview,
        regions=centres,
        holds=holds,
        render_seconds=time.perf_counter() - start,
    )
