"""Pyramidal, tiled JPEG TIFFs of synthetic H&E that OpenSlide opens as generic-tiff.

Tiles are rendered strip by strip from the analytic fields (:mod:`.shapes`) and periodic
textures, so a 40000x30000 slide never exists in memory as a whole. ``l_`` values are pixels
of the level being written. Reading the files back is :mod:`clam_heat.slide`'s job.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .output import output_path
from .shapes import _FEATURE_SPACE_SEED, LEVEL_DOWNSAMPLES, DemoSlide, _pyramid_dims, _Shapes

_TEXTURE_PERIOD = 1024  # level-0 px; power of two so every 4x level divides it


# RGB palette (uint8-ish floats): glass, eosin-rich tissue, haematoxylin nuclei, tumour.
_GLASS = np.array([243.0, 242.0, 240.0])


_EOSIN = np.array([234.0, 170.0, 203.0])


_NUCLEUS = np.array([118.0, 68.0, 158.0])


_TUMOUR_BASE = np.array([198.0, 128.0, 190.0])


_TUMOUR_NUCLEUS = np.array([78.0, 38.0, 128.0])


def _periodic_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise on a torus, (size, size) float64, zero mean, unit std.

    Smoothing in the Fourier domain makes the texture tile seamlessly.
    """
    white = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    fr = np.fft.rfftfreq(size)
    gain = np.exp(-2 * (math.pi * sigma_px) ** 2 * (f[:, None] ** 2 + fr[None, :] ** 2))
    out = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(size, size))
    return (out - out.mean()) / (out.std() + 1e-12)


def _base_textures(mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level-0 (glass, tissue, tumour) textures, each (P, P, 3) float32 RGB, periodic.

    Nucleus sizes are in microns, so they scale with ``mpp``; the textures do not depend on the
    slide seed, which lets a multi-slide project synthesise them once.
    """
    rng = np.random.default_rng(_FEATURE_SPACE_SEED)
    p = _TEXTURE_PERIOD
    px = 1.0 / mpp  # pixels per micron
    grain = rng.standard_normal((p, p, 3)).astype(np.float32)
    glass = _GLASS.astype(np.float32) + 1.2 * grain

    stroma = _periodic_noise(rng, p, 5.0 * px).astype(np.float32)[..., None]
    fibre = _periodic_noise(rng, p, 1.2 * px).astype(np.float32)[..., None]
    nuclei = _periodic_noise(rng, p, 2.2 * px).astype(np.float32)
    alpha = np.clip((nuclei - 2.0) * 2.5, 0.0, 1.0)[..., None]
    tissue = _EOSIN + stroma * np.array([4.0, 10.0, 7.0]) + fibre * np.array([3.0, 7.0, 5.0])
    tissue = (1 - alpha) * tissue + alpha * _NUCLEUS + 3.0 * grain

    dense = _periodic_noise(rng, p, 1.8 * px).astype(np.float32)
    alpha = np.clip((dense - 0.9) * 2.5, 0.0, 1.0)[..., None]
    tumour = _TUMOUR_BASE + stroma * np.array([5.0, 8.0, 6.0])
    tumour = (1 - alpha) * tumour + alpha * _TUMOUR_NUCLEUS + 4.0 * grain
    return glass, tissue.astype(np.float32), tumour.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _pyramid_textures(mpp: float, tile: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per level of :data:`LEVEL_DOWNSAMPLES`: (glass, tissue, tumour) uint8 textures.

    A level's texture is the block mean of the level-0 one (what a scanner pyramid would hold),
    period ``P = 1024 / downsample``. When ``tile`` is not a multiple of ``P`` the texture is
    repeated so ``tex[off:off + tile]`` with ``off = l_x % P`` is always in range. Read-only.
    """
    base = _base_textures(mpp)
    levels = []
    for ds in LEVEL_DOWNSAMPLES:
        period = _TEXTURE_PERIOD // ds
        reps = 1 if period % tile == 0 else -(-tile // period) + 1
        textures = []
        for tex in base:
            small = tex.reshape(period, ds, period, ds, 3).mean(axis=(1, 3))
            small = np.clip(np.round(small), 0, 255).astype(np.uint8)
            small = np.ascontiguousarray(np.tile(small, (reps, reps, 1)))
            small.setflags(write=False)
            textures.append(small)
        levels.append(tuple(textures))
    return tuple(levels)


def _node_stride(downsample: float) -> int:
    """Level-px spacing of the exact field samples: about 8 to 32 level-0 px apart."""
    return max(1, min(8, int(32 // downsample)))


def _strip_masks(
    shapes: _Shapes, l_y0: int, rows: int, cols: int, dx: float, dy: float, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and tumour masks, bool (rows, cols), of a level strip starting at level row ``l_y0``.

    The fields are evaluated exactly at the centres of ``stride`` x ``stride`` pixel blocks (one
    extra block of margin on each side) and bilinearly interpolated to every pixel centre, which
    is exact at block centres and far below a pixel elsewhere for these smooth fields.
    """
    import cv2

    ny, nx = rows // stride + 2, cols // stride + 2
    l_node_x = (np.arange(nx) - 0.5) * stride  # level-px position of the node (block centre)
    l_node_y = l_y0 + (np.arange(ny) - 0.5) * stride
    tissue, tumour = shapes.fields((l_node_x * dx)[None, :], (l_node_y * dy)[:, None])
    if stride > 1:
        size = (nx * stride, ny * stride)
        tissue = cv2.resize(tissue.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        tumour = cv2.resize(tumour.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    crop = (slice(stride, stride + rows), slice(stride, stride + cols))
    is_tissue = tissue[crop] > 0
    return is_tissue, is_tissue & (tumour[crop] > 0)


def _level_strips(
    shapes: _Shapes,
    width: int,
    height: int,
    level: int,
    level_wh: tuple[int, int],
    tile: int,
    mpp: float,
) -> Iterator[np.ndarray]:
    """Rows of tiles of one level, each (tile, n_cols * tile, 3) uint8 RGB.

    The nominal downsample picks textures and field sampling; pixel centres use the measured
    per-axis ``W0 / w`` and ``H0 / h`` so the level covers exactly the level-0 extent.
    """
    downsample = LEVEL_DOWNSAMPLES[level]
    l_w, l_h = level_wh
    dx, dy = width / l_w, height / l_h
    glass, tissue_tex, tumour_tex = _pyramid_textures(mpp, tile)[level]
    period = _TEXTURE_PERIOD // downsample
    n_cols, n_rows = -(-l_w // tile), -(-l_h // tile)
    stride = _node_stride(downsample)
    for r in range(n_rows):
        l_y0 = r * tile
        is_tissue, is_tumour = _strip_masks(shapes, l_y0, tile, n_cols * tile, dx, dy, stride)
        any_tissue = is_tissue.reshape(tile, n_cols, tile).any(axis=(0, 2))
        any_tumour = is_tumour.reshape(tile, n_cols, tile).any(axis=(0, 2))
        oy = l_y0 % period
        strip = np.empty((tile, n_cols * tile, 3), dtype=np.uint8)
        for c in range(n_cols):
            ox = (c * tile) % period
            win = (slice(oy, oy + tile), slice(ox, ox + tile))
            cols = slice(c * tile, (c + 1) * tile)
            out = strip[:, cols]
            out[...] = glass[win]
            if any_tissue[c]:
                np.copyto(out, tissue_tex[win], where=is_tissue[:, cols, None])
            if any_tumour[c]:
                np.copyto(out, tumour_tex[win], where=is_tumour[:, cols, None])
        yield strip


def _tiles(strips: Iterator[np.ndarray], tile: int) -> Iterator[np.ndarray]:
    """Split each strip into (tile, tile, 3) tiles, row-major, as tifffile expects."""
    for strip in strips:
        for c in range(strip.shape[1] // tile):
            yield strip[:, c * tile : (c + 1) * tile]


def make_demo_slide(
    path: str | Path,
    *,
    width: int = 4096,
    height: int = 3072,
    seed: int = 0,
    tile: int = 256,
    mpp: float = 0.5,
    quality: int = 85,
    tumour: bool = True,
) -> DemoSlide:
    """Write a pyramidal, tiled JPEG TIFF of synthetic H&E that OpenSlide opens as generic-tiff.

    Levels have downsamples 1, 4, 16 and 32 (while at least 1 px), stored as separate tiled
    pages (``subfiletype=1`` for reduced ones), with the resolution tags that make OpenSlide
    report ``openslide.mpp-x == mpp``. Level 0 is YCbCr 4:2:0 like scanner files; reduced levels
    keep full chroma so tissue edges stay within a pixel of the truth where a pixel is big. Tiles
    are rendered on the fly, so memory stays bounded for any size; the bytes depend only on the
    arguments. ``tumour=False`` gives a tumour-free slide.
    """
    import tifffile

    path = Path(path)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not 0 < mpp < 100:
        raise ValueError(f"mpp must be in (0, 100) microns per pixel, got {mpp}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")

    dims = _pyramid_dims(width, height)
    slide = DemoSlide(path, width, height, float(mpp), seed, bool(tumour), dims)
    bigtiff = width * height * 3 > 2**31 - 2**26
    with output_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for level, (l_w, l_h) in enumerate(dims):
            strips = _level_strips(slide._shapes, width, height, level, (l_w, l_h), tile, mpp)
            tw.write(
                _tiles(strips, tile),
                shape=(l_h, l_w, 3),
                dtype="uint8",
                tile=(tile, tile),
                photometric="rgb",
                subsampling=(2, 2) if level == 0 else (1, 1),
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(1e4 * l_w / (mpp * width), 1e4 * l_h / (mpp * height)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
                software="clam-heat demo",
                maxworkers=2,
                buffersize=16 * 2**20,  # tifffile batches this many bytes of tiles
            )
    return slide
