"""Tile sources for the page: the slide, any image placed over it, and every map drawn live.

OpenSeadragon's pyramid (as openslide's deepzoom): level ``k`` of ``max_level`` shows the slide
at downsample ``2 ** (max_level - k)``; it is ``ceil(w / d)`` x ``ceil(h / d)`` pixels cut into
:data:`TILE` px tiles. Slide tiles are read from the best pyramid level and shrunk; map tiles
are drawn from the scores by :class:`~clam_heat.heatmap.region.RegionView` at exactly that
downsample (patch edges on exact pixels at any zoom), as RGBA overlays the page blends.

Open slides are reference counted (:class:`OpenSlides`): a slide evicted from the bounded cache
is closed only when the last request reading it is done, so concurrent requests never read a
closed OpenSlide handle. Every cache here is bounded by count or bytes.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import cv2
import numpy as np

from ..errors import SlideError
from ..heatmap.render import _release_free_memory

if TYPE_CHECKING:
    from ..heatmap.region import MaskCache, Merged, PatchPaint, ScoreIndex
    from ..slide import Slide
    from .maps import Style

__all__ = [
    "OPEN_SLIDES",
    "TILE",
    "LruCache",
    "OpenSlides",
    "legend",
    "max_level",
    "open_image",
    "slide_tile",
]

#: Side of a served tile (pixels of its level).
TILE = 256
#: Open slides kept (a slide in use by a request stays open past this until it is released).
OPEN_SLIDES = 8
#: Map tiles of zooms where a patch is at most this many pixels are drawn from the map merged
#: at that zoom (equal rectangles summed once, cached), when the map has more patches than:
MERGE_BELOW_PX = 16
MERGE_ABOVE_PATCHES = 20_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A thread-safe LRU bounded by a total ``size(value)`` (count when ``size`` is None)."""

    def __init__(self, limit: int, size: Callable[[V], int] | None = None) -> None:
        self.limit, self.size = limit, size or (lambda _v: 1)
        self.items: OrderedDict[K, V] = OrderedDict()
        self.total = 0
        self.lock = threading.Lock()
        self.making: dict[K, threading.Lock] = {}

    def get(self, key: K) -> V | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.total -= self.size(old)
            self.items[key] = value
            self.total += self.size(value)
            while self.total > self.limit and len(self.items) > 1:
                _, dropped = self.items.popitem(last=False)
                self.total -= self.size(dropped)
            return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The cached value, or ``make()``'s; concurrent callers of one key make it once (the
        page asks for a dozen tiles of a slide at once: one index build, not twelve)."""
        hit = self.get(key)
        if hit is not None:
            return hit
        with self.lock:
            gate = self.making.setdefault(key, threading.Lock())
        with gate:
            hit = self.get(key)
            if hit is None:
                hit = self.put(key, make())
        with self.lock:
            self.making.pop(key, None)
        return hit


@dataclass
class _Held:
    slide: Slide
    refs: int = 0
    evicted: bool = False


class OpenSlides:
    """Opened slides by key, at most ``limit`` kept; :meth:`hold` lends one to a request.

    Eviction marks a slide; it is closed when its last holder returns it (never under a read).
    """

    def __init__(self, limit: int = OPEN_SLIDES) -> None:
        self.limit = limit
        self.held: OrderedDict[Hashable, _Held] = OrderedDict()
        self.lock = threading.Lock()
        self.opening: dict[Hashable, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(
        self, key: Hashable, path: Path, opener: Callable[[Path], Slide] | None = None
    ) -> Iterator[Slide]:
        held = self._acquire(key, path, opener)
        try:
            yield held.slide
        finally:
            with self.lock:
                held.refs -= 1
                close = held.evicted and held.refs == 0
            if close:
                held.slide.close()

    def _acquire(self, key: Hashable, path: Path, opener: Callable[[Path], Slide] | None) -> _Held:
        from ..slide import open_slide

        with self.lock:
            gate = self.opening.setdefault(key, threading.Lock())
        with gate:  # one opener per slide; others wait for it
            with self.lock:
                held = self.held.get(key)
                if held is not None:
                    held.refs += 1
                    self.held.move_to_end(key)
                    return held
            slide = (opener or open_slide)(path)
            with self.lock:
                held = _Held(slide, refs=1)
                self.held[key] = held
                to_close = []
                while len(self.held) > self.limit:
                    _, old = self.held.popitem(last=False)
                    old.evicted = True
                    if old.refs == 0:
                        to_close.append(old)
            for old in to_close:
                old.slide.close()
            return held

    def close(self) -> None:
        with self.lock:
            items = list(self.held.values())
            self.held.clear()
        for held in items:
            held.evicted = True
            if held.refs == 0:
                held.slide.close()


def max_level(size: tuple[int, int]) -> int:
    """OpenSeadragon's top level for an image of ``size``: ``ceil(log2(longest side))``.

    >>> max_level((4096, 3072)), max_level((1, 1))
    (12, 0)
    """
    return max(0, math.ceil(math.log2(max(size[0], size[1], 1))))


def tile_window(
    size: tuple[int, int], level: int, tx: int, ty: int
) -> tuple[float, tuple[int, int, int, int]] | None:
    """(downsample, window (x0, y0, x1, y1) at that downsample) of a tile, None outside."""
    top = max_level(size)
    if not 0 <= level <= top:
        return None
    ds = float(2 ** (top - level))
    w, h = math.ceil(size[0] / ds), math.ceil(size[1] / ds)
    x0, y0 = tx * TILE, ty * TILE
    if tx < 0 or ty < 0 or x0 >= w or y0 >= h:
        return None
    return ds, (x0, y0, min(x0 + TILE, w), min(y0 + TILE, h))


def slide_tile(slide: Slide, level: int, tx: int, ty: int) -> np.ndarray | None:
    """Tile (tx, ty) of OpenSeadragon level ``level`` of ``slide``, (h, w, 3) uint8 RGB."""
    found = tile_window(slide.dimensions, level, tx, ty)
    if found is None:
        return None
    ds, (x0, y0, x1, y1) = found
    lvl = slide.best_level_for_downsample(ds)
    lds = slide.level_downsamples[lvl]
    lw, lh = slide.level_dimensions[lvl]
    l0x, l0y = round(x0 * ds), round(y0 * ds)
    rw = max(1, min(math.ceil((x1 - x0) * ds / lds[0]), lw - int(l0x / lds[0])))
    rh = max(1, min(math.ceil((y1 - y0) * ds / lds[1]), lh - int(l0y / lds[1])))
    rgb = slide.read_region((l0x, l0y), lvl, (rw, rh))
    out = (x1 - x0, y1 - y0)
    if (rw, rh) != out:
        interp = cv2.INTER_AREA if rw > out[0] else cv2.INTER_NEAREST
        rgb = cv2.resize(rgb, out, interpolation=interp)
    return rgb


def open_image(path: Path) -> Slide:
    """A heatmap image as a slide: a pyramidal TIFF is read tile by tile; any other image
    (JPEG/PNG) is decoded once into an in-memory pyramid."""
    from ..slide import ArraySlide, open_slide

    if path.suffix.lower() in (".tif", ".tiff"):
        with contextlib.suppress(SlideError):
            return open_slide(path)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SlideError(path, "heatmap image cannot be decoded", "pass a PNG, JPEG or TIFF")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    n_levels = 1 + max(0, math.ceil(math.log2(max(rgb.shape[:2]) / 512)))
    return ArraySlide(rgb, mpp=None, n_levels=n_levels, level_factor=2, path=path)


class MapTiles:
    """Every map tile of one run, drawn on request from the scores, with bounded caches:
    indexed maps (by bytes), per-style patch values (by count), tissue contours, mask blocks
    and encoded tiles (by bytes)."""

    def __init__(
        self,
        *,
        index_bytes: int = 256 * 2**20,
        merged_bytes: int = 96 * 2**20,
        tile_bytes: int = 48 * 2**20,
    ) -> None:
        self.indexes: LruCache[Hashable, ScoreIndex] = LruCache(index_bytes, lambda i: i.nbytes)
        self.paints: LruCache[Hashable, PatchPaint] = LruCache(
            index_bytes // 2, lambda p: p.fixed.hi.nbytes * 2 + p.above.nbytes
        )
        self.tissues: LruCache[Hashable, Any] = LruCache(32)
        self.masks: LruCache[Hashable, MaskCache] = LruCache(24)
        self.encoded: LruCache[Hashable, bytes] = LruCache(tile_bytes, len)
        self.merged: LruCache[Hashable, Merged] = LruCache(merged_bytes, lambda m: m.nbytes)

    def index(self, key: Hashable, load: Callable[[], ScoreIndex]) -> ScoreIndex:
        return self.indexes.get_or_make(key, load)

    def paint(
        self, key: Hashable, index: ScoreIndex, style: Style, values: Callable[[], np.ndarray]
    ) -> PatchPaint:
        from ..heatmap.region import patch_paint

        return self.paints.get_or_make(
            (key, style.scale, style.threshold, style.binarize),
            lambda: patch_paint(values(), style.threshold, binarize=style.binarize),
        )

    def rgba(
        self,
        key: Hashable,
        index: ScoreIndex,
        paint: PatchPaint,
        style: Style,
        tissue: Any,
        l0_size: tuple[int, int],
        level: int,
        tx: int,
        ty: int,
    ) -> np.ndarray | None:
        """Map tile (tx, ty) of OpenSeadragon level ``level``, (h, w, 4) uint8 RGBA."""
        from ..heatmap.region import MaskCache, RegionView, level_region, merge_patches

        found = tile_window(l0_size, level, tx, ty)
        if found is None:
            return None
        ds, window = found
        masks = self.masks.get_or_make((key[0], ds), MaskCache)
        region = level_region(l0_size, (ds, ds))
        merged = None
        if max(index.patch) / ds <= MERGE_BELOW_PX and len(index) > MERGE_ABOVE_PATCHES:
            merged = self.merged.get_or_make(
                (key, style.scale, style.threshold, style.binarize, ds),
                lambda: merge_patches(index, paint, (ds, ds), region),
            )
        view = RegionView(
            index,
            paint,
            (ds, ds),
            region,
            cmap=style.cmap,
            blur=style.blur,
            overlap=style.overlap,
            tissue=tissue if style.segment else None,
            masks=masks,
            merged=merged,
        )
        rgba = view.rgba(window)
        _release_free_memory()  # per-tile temporaries freed by request threads stay in glibc
        return rgba


def legend(cmap: str, title: str, low: str, high: str, n: int = 256) -> dict[str, Any]:
    """A colour bar for the page: ``n`` colours of ``cmap`` from low to high (the heatmap's own
    lookup, :func:`clam_heat.heatmap.apply_colormap`), and what its ends mean.

    >>> bar = legend("gray", "score", "0", "1", n=3)
    >>> bar["colors"], bar["cmap"]
    (['#000000', '#808080', '#ffffff'], 'gray')
    """
    from ..heatmap import apply_colormap

    rgb = apply_colormap(np.linspace(0.0, 1.0, n), cmap)
    colors = ["#" + "".join(f"{int(c):02x}" for c in px) for px in rgb]
    return {"cmap": cmap, "title": title, "low": low, "high": high, "colors": colors}
