"""The tile streaming engine: :func:`render_heatmap`, :func:`heatmap_image` and
:func:`save_orig`.

Output tiles are rendered on a small thread pool (each from the render plan, independent of the
others) and whole strips of the saved image are pushed, top to bottom, to the sinks that
:func:`~clam_heat.heatmap.writers.open_sinks` chose for the output paths. The engine knows no
file format: a sink either holds the whole image (the strips are then views into it) or takes
strips of its preferred height (``Sink.strip_rows``). Memory: a small JPEG/PNG output holds
its whole RGB image once (encoded from memory, the fastest for small images); above
:data:`~clam_heat.heatmap.writers.STREAM_MIN_PIXELS` JPEG/PNG are streamed through a TIFF
spool and libvips, as TIFF outputs are streamed, so memory grows with the image width and the
number of patches, not with its area.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..threads import helper_threads
from .maths import l0_to_read
from .plan import HeatmapSpec, RenderResult, make_plan, resolve_vis_level, shrink
from .writers import EXPORTS, Sink, SinkFactory, open_sinks

if TYPE_CHECKING:
    from ..slide import Slide
    from ..tissue import TissueContours

    #: :func:`render_heatmap`'s positional inputs: slide, level-0 coords, scores, patch
    #: footprint, spec.
    RenderInputs = tuple[Slide, np.ndarray, np.ndarray, int | Sequence[int], HeatmapSpec]

__all__ = ["heatmap_image", "render_heatmap", "save_orig"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up on first use (None elsewhere)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS after each strip (glibc only).

    Tile temporaries freed by worker threads otherwise stay in glibc's per-thread arenas, which
    shows up as ~100 MB of extra RSS on a 75 Mpx render; one ``malloc_trim`` per strip costs
    about a millisecond.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _tile_shape(tile_size: int, sinks: Sequence[Sink]) -> tuple[int, int]:
    """Output tile (w, h): square when the whole image is kept anyway; otherwise as high as the
    sinks' preferred strip (one TIFF tile row), so the strips in flight (and RSS) stay a few
    rows whatever the slide size."""
    if any(s.image is not None for s in sinks):
        return tile_size, tile_size
    rows = max((s.strip_rows for s in sinks), default=0) or tile_size
    return max(2 * tile_size, rows), rows


def _stream(
    render_tile: Callable[[int, int, tuple[int, int, int, int]], np.ndarray],
    width: int,
    height: int,
    tile: tuple[int, int],
    sinks: Sequence[Sink],
    workers: int,
) -> None:
    """Render output tiles on a thread pool and feed every sink whole strips, in order.

    With the whole image in memory two strips are in flight, so the pool never idles at a strip
    boundary; streaming-only (TIFF) strips are thin and many tiles wide, so one at a time keeps
    memory down. A strip is pushed to the sinks as soon as all its tiles are done.
    """
    whole = next((s.image for s in sinks if s.image is not None), None)
    tile_w, tile_h = tile
    n_workers = workers or helper_threads()
    in_flight: deque[tuple[int, np.ndarray, list[Future[None]]]] = deque()
    # a strip in the whole-image buffer costs nothing extra; a standalone strip is memory
    lookahead = 1 if whole is not None else 0

    def one(strip: np.ndarray, tx: int, ty: int, box: tuple[int, int, int, int]) -> None:
        strip[:, box[0] : box[2]] = render_tile(tx, ty, box)

    def flush_oldest() -> None:
        y0, strip, futures = in_flight.popleft()
        for future in futures:
            future.result()
        for sink in sinks:
            sink.push(y0, strip)
        _release_free_memory()

    try:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            try:
                for ty, y0 in enumerate(range(0, height, tile_h)):
                    y1 = min(y0 + tile_h, height)
                    if whole is not None:
                        strip = whole[y0:y1]
                    else:
                        strip = np.empty((y1 - y0, width, 3), dtype=np.uint8)
                    futures = [
                        pool.submit(one, strip, tx, ty, (x0, y0, min(x0 + tile_w, width), y1))
                        for tx, x0 in enumerate(range(0, width, tile_w))
                    ]
                    in_flight.append((y0, strip, futures))
                    if len(in_flight) > lookahead:
                        flush_oldest()
                while in_flight:
                    flush_oldest()
            except BaseException:
                for _, _, futures in in_flight:
                    for future in futures:
                        future.cancel()
                raise
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def _finish(sinks: Sequence[Sink]) -> tuple[Path, ...]:
    paths = []
    try:
        for sink in sinks:
            p = sink.close()
            if p is not None:
                paths.append(p)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return tuple(paths)


def _out_mpp(slide: Slide, level: int, cd: int) -> float | None:
    if slide.mpp is None:
        return None
    return float(slide.mpp) * float(slide.level_downsamples[level][0]) * cd


def _with_pyramid(
    exports: Mapping[Path, SinkFactory] | None, pyramid_tiff_path: str | os.PathLike[str] | None
) -> dict[Path, SinkFactory]:
    """``exports`` plus the pyramidal TIFF at ``pyramid_tiff_path`` (when given)."""
    out = dict(exports or {})
    if pyramid_tiff_path is not None:
        factory = EXPORTS["pyramid_tiff"].sink
        assert factory is not None
        out[Path(pyramid_tiff_path)] = factory
    return out


def render_heatmap(
    slide: Slide,
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    spec: HeatmapSpec,
    *,
    tissue: TissueContours | np.ndarray | None = None,
    out_path: str | os.PathLike[str] | None = None,
    pyramid_tiff_path: str | os.PathLike[str] | None = None,
    exports: Mapping[Path, SinkFactory] | None = None,
    keep_image: bool = False,
    meta: str | None = None,
) -> RenderResult:
    """Draw CLAM's heatmap of ``scores`` over ``slide``, tile by tile, and save it.

    Parameters
    ----------
    slide : Slide
    l0_coords : (N, 2) int ndarray
        Level-0 top-left (x, y) of each patch.
    scores : (N,) or (N, 1) float ndarray
        Raw attention (with ``spec.use_percentiles``) or CLAM-scale percentiles (0-100).
    patch_size_l0 : int or (w, h)
        Level-0 footprint of a patch (CLAM's ``vis_patch_size``).
    spec : HeatmapSpec
    tissue : TissueContours, (h, w) bool ndarray or None
        Tissue for ``spec.segment`` (contours in level-0 px, or a mask over the region at the
        vis level). None: no masking.
    out_path : path, optional
        ``.jpg`` (quality 100), ``.jpeg``, ``.png`` or ``.tif``/``.tiff``; written atomically.
    pyramid_tiff_path : path, optional
        Also write the image as a pyramidal JPEG tiled TIFF with MPP (OpenSlide/QuPath): the
        ``pyramid_tiff`` export of :data:`~clam_heat.heatmap.writers.EXPORTS`.
    exports : {path: sink factory}, optional
        More files fed from the same strips (image exports, e.g. ``EXPORTS[name].sink``).
    keep_image : bool
        Return the (h, w, 3) uint8 image in the result (costs its memory).
    meta : str, optional
        Text the files carry (colormap and score range as JSON, see :func:`image_meta`).

    Returns
    -------
    RenderResult
        The saved image is ``(int(w / cd), int(h / cd))`` for a vis region of (w, h).
    """
    start = time.perf_counter()
    plan, threshold, n_kept = make_plan(slide, l0_coords, scores, patch_size_l0, spec, tissue)
    cd = plan.cd
    width, height = plan.region[0] // cd, plan.region[1] // cd
    if width < 1 or height < 1:
        raise ValueError(f"custom_downsample {cd} leaves no pixels of the {plan.region} region")
    sinks = open_sinks(
        Path(out_path) if out_path is not None else None,
        width,
        height,
        mpp=_out_mpp(slide, plan.level, cd),
        exports=_with_pyramid(exports, pyramid_tiff_path),
        keep_image=keep_image,
        meta=meta,
    )
    try:
        tile = _tile_shape(int(spec.tile_size), sinks)
        plan.bucket(tile, (-(-width // tile[0]), -(-height // tile[1])))
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    _stream(plan.render_tile, width, height, tile, sinks, spec.workers)
    paths = _finish(sinks)
    image = next((s.image for s in sinks if s.image is not None), None)
    return RenderResult(
        shape=(height, width),
        vis_level=plan.level,
        threshold=threshold,
        n_patches=n_kept,
        paths=paths,
        seconds=time.perf_counter() - start,
        image=image if keep_image else None,
    )


def heatmap_image(
    *inputs: *RenderInputs, tissue: TissueContours | np.ndarray | None = None
) -> np.ndarray:
    """The heatmap as an (h, w, 3) uint8 RGB array, nothing written (for tests and notebooks);
    ``inputs`` and ``tissue`` as for :func:`render_heatmap`."""
    result = render_heatmap(*inputs, tissue=tissue, keep_image=True)
    assert result.image is not None
    return result.image


def save_orig(
    slide: Slide,
    level: int,
    custom_downsample: int,
    path: str | os.PathLike[str],
    *,
    tile_size: int = 1024,
    workers: int = 0,
) -> Path:
    """Save the plain slide at ``level`` shrunk by ``custom_downsample`` (CLAM's
    ``<id>_orig_<level>``), read tile by tile; format from the extension."""
    level = resolve_vis_level(slide, level)
    cd = int(custom_downsample)
    if cd < 1:
        raise ValueError(f"custom_downsample = {custom_downsample}: must be an int >= 1")
    lw, lh = slide.level_dimensions[level]
    width, height = lw // cd, lh // cd
    if width < 1 or height < 1:
        raise ValueError(f"custom_downsample {cd} leaves no pixels of level {level} ({lw}x{lh})")
    dx, dy = slide.level_downsamples[level]

    def tile_fn(tx: int, ty: int, box: tuple[int, int, int, int]) -> np.ndarray:
        ox0, oy0, ox1, oy1 = box
        vx0, vy0 = ox0 * cd, oy0 * cd
        size = ((ox1 - ox0) * cd, (oy1 - oy0) * cd)
        rgb = slide.read_region((l0_to_read(vx0, 0, dx), l0_to_read(vy0, 0, dy)), level, size)
        return shrink(rgb, cd)

    out = Path(path)
    sinks = open_sinks(out, width, height, mpp=_out_mpp(slide, level, cd))
    _stream(tile_fn, width, height, _tile_shape(int(tile_size), sinks), sinks, workers)
    _finish(sinks)
    return out
