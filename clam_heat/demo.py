"""Deterministic demo data: pyramidal H&E-like TIFFs, TRIDENT features and a CLAM checkpoint.

Everything is generated from a seed, so tests, ``clam-heat demo`` and benchmarks get the same
files every time without shipping scanner data. The slide's content is *analytic*: tissue and
tumour are the zero super-level sets of smooth fields (rotated ellipses plus low-frequency sine
noise) defined in level-0 pixels, which gives

* streaming generation: every tile of every level is rendered from the fields evaluated at that
  tile's own level-0 coordinates, so a 40000x30000 slide never exists in memory as a whole;
* ground truth for free: :meth:`DemoSlide.tissue_mask` and :meth:`DemoSlide.tumour_mask`
  rasterise the same fields on any downsample grid, and features know which patches are tumour.

Coordinate frames follow :mod:`clam_heat.slide`: ``l0_`` values are level-0 pixels, ``l_`` values
are pixels of the level being written.

This module writes TIFFs with tifffile; reading them back is :mod:`clam_heat.slide`'s job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import OutputError

__all__ = [
    "DEMO_SIZES",
    "DemoBag",
    "DemoProject",
    "DemoSlide",
    "level0_magnification",
    "make_demo_features",
    "make_demo_project",
    "make_demo_slide",
    "train_demo_checkpoint",
]

#: Level-0 (width, height) of each named demo size.
DEMO_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (4096, 3072),
    "small": (12000, 9000),
    "large": (40000, 30000),
}

#: Downsamples of the pyramid levels (Aperio-like 4x steps plus the 32x level CLAM's -1 picks).
LEVEL_DOWNSAMPLES: tuple[int, ...] = (1, 4, 16, 32)

#: Bumped whenever generated content changes, so cached demo projects are regenerated.
DEMO_FORMAT_VERSION = 2

#: Training steps per nominal second of ``train_demo_checkpoint(seconds=...)``.
STEPS_PER_SECOND = 100

#: Largest bag used per training step; larger bags are subsampled (seeded).
MAX_TRAIN_BAG = 512

#: Shift of tumour features along the shared tumour direction (latent noise has unit std).
TUMOUR_SHIFT = 3.0

#: Demo features vary in this many latent directions (plus small isotropic noise), like real
#: encoder features, which live near a low-dimensional subspace.
FEATURE_RANK = 16

_TEXTURE_PERIOD = 1024  # level-0 px; power of two so every 4x level divides it
_FEATURE_SPACE_SEED = 20240613  # shared by all bags, so one model fits every demo slide
_LABEL_NAMES = ("normal", "tumour")
_PROJECT_MPP = 0.5

# RGB palette (uint8-ish floats): glass, eosin-rich tissue, haematoxylin nuclei, tumour.
_GLASS = np.array([243.0, 242.0, 240.0])
_EOSIN = np.array([234.0, 170.0, 203.0])
_NUCLEUS = np.array([118.0, 68.0, 158.0])
_TUMOUR_BASE = np.array([198.0, 128.0, 190.0])
_TUMOUR_NUCLEUS = np.array([78.0, 38.0, 128.0])


# ----------------------------------------------------------------------------- analytic shapes


@dataclass(frozen=True)
class _Ellipses:
    """Rotated ellipses in level-0 px: centres ``cx``, ``cy``, semi-axes ``a``, ``b``, angle."""

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray

    def max_inside(self, l0_x: np.ndarray, l0_y: np.ndarray) -> np.ndarray:
        """``max_i (1 - q_i)`` where ``q_i`` is the squared normalised distance to ellipse i.

        Positive inside at least one ellipse. ``l0_x`` and ``l0_y`` broadcast against each other
        (a row and a column give a grid). Returns float64 of the broadcast shape; -inf when empty.
        """
        shape = np.broadcast_shapes(np.shape(l0_x), np.shape(l0_y))
        out = np.full(shape, -np.inf)
        for cx, cy, a, b, t in zip(self.cx, self.cy, self.a, self.b, self.theta, strict=True):
            dx, dy = l0_x - cx, l0_y - cy
            c, s = math.cos(t), math.sin(t)
            u = (c / a) * dx + (s / a) * dy
            v = (c / b) * dy - (s / b) * dx
            np.maximum(out, 1.0 - (u * u + v * v), out=out)
        return out


@dataclass(frozen=True)
class _Waves:
    """Low-frequency noise: a normalised sum of plane sine waves (wave vectors in rad/px)."""

    kx: np.ndarray
    ky: np.ndarray
    phase: np.ndarray

    def __call__(self, l0_x: np.ndarray, l0_y: np.ndarray) -> np.ndarray:
        """Noise with unit standard deviation over the plane, broadcast like the inputs."""
        total: np.ndarray | float = 0.0
        for kx, ky, ph in zip(self.kx, self.ky, self.phase, strict=True):
            total = total + np.sin(kx * l0_x + ky * l0_y + ph)
        return np.asarray(total) * math.sqrt(2.0 / len(self.kx))


@dataclass(frozen=True)
class _Shapes:
    """The analytic truth of one demo slide (see :func:`_make_shapes`)."""

    blobs: _Ellipses
    holes: _Ellipses
    tumours: _Ellipses
    tissue_noise: _Waves
    tumour_noise: _Waves
    tissue_amp: float = 0.13
    tumour_amp: float = 0.2

    def fields(self, l0_x: np.ndarray, l0_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumour) fields at level-0 points; tissue where > 0, tumour where both > 0."""
        tissue = self.blobs.max_inside(l0_x, l0_y) + self.tissue_amp * self.tissue_noise(l0_x, l0_y)
        if len(self.holes.cx):
            np.minimum(tissue, -self.holes.max_inside(l0_x, l0_y), out=tissue)
        if len(self.tumours.cx):
            tumour = self.tumours.max_inside(l0_x, l0_y) + self.tumour_amp * self.tumour_noise(
                l0_x, l0_y
            )
        else:
            tumour = np.full(tissue.shape, -1.0)
        return tissue, tumour


def _make_waves(rng: np.random.Generator, scale: float, n: int = 6) -> _Waves:
    """``n`` waves of 1.5-4 cycles per ``scale`` px in random directions."""
    cycles = rng.uniform(1.5, 4.0, n)
    angle = rng.uniform(0.0, 2 * math.pi, n)
    k = 2 * math.pi * cycles / scale
    return _Waves(k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * math.pi, n))


def _make_shapes(width: int, height: int, seed: int, tumour: bool) -> _Shapes:
    """Lay out 2-3 tissue blobs side by side, a hole or two, and 1-2 tumour regions.

    Everything scales with the slide size, so every demo size looks alike at its own 32x level.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDE30]))
    n = int(rng.integers(2, 4))
    cell = width / n
    cx = (np.arange(n) + 0.5) * cell + rng.uniform(-0.08, 0.08, n) * cell
    cy = height * (0.5 + rng.uniform(-0.06, 0.06, n))
    a = cell * rng.uniform(0.30, 0.38, n)
    b = height * rng.uniform(0.26, 0.34, n)
    theta = rng.uniform(-0.35, 0.35, n)
    blobs = _Ellipses(cx, cy, a, b, theta)

    # Holes and tumours sit at opposite offsets from their blob's centre, so they rarely meet.
    n_holes = int(rng.integers(1, 3))
    hole_blob = rng.permutation(n)[:n_holes]
    hole_dir = rng.uniform(0, 2 * math.pi, n_holes)
    hole_r = rng.uniform(0.35, 0.5, n_holes)
    hole_size = rng.uniform(0.13, 0.2, n_holes)
    holes = _Ellipses(
        cx[hole_blob] + hole_r * a[hole_blob] * np.cos(hole_dir),
        cy[hole_blob] + hole_r * b[hole_blob] * np.sin(hole_dir),
        hole_size * a[hole_blob],
        hole_size * b[hole_blob] * rng.uniform(0.8, 1.2, n_holes),
        rng.uniform(0, math.pi, n_holes),
    )

    n_tum = int(rng.integers(1, 3)) if tumour else 0
    tum_blob = np.arange(n_tum) % n
    tum_dir = np.full(n_tum, 0.0)
    for i, blob in enumerate(tum_blob):
        away = hole_dir[hole_blob == blob]
        tum_dir[i] = (away[0] + math.pi) if len(away) else rng.uniform(0, 2 * math.pi)
    tum_r = rng.uniform(0.2, 0.35, n_tum)
    tum_size = rng.uniform(0.42, 0.55, n_tum)
    tumours = _Ellipses(
        cx[tum_blob] + tum_r * a[tum_blob] * np.cos(tum_dir),
        cy[tum_blob] + tum_r * b[tum_blob] * np.sin(tum_dir),
        tum_size * a[tum_blob],
        tum_size * b[tum_blob],
        rng.uniform(0, math.pi, n_tum),
    )
    scale = float(max(width, height))
    return _Shapes(blobs, holes, tumours, _make_waves(rng, scale), _make_waves(rng, scale / 2))


def _pyramid_dims(width: int, height: int) -> tuple[tuple[int, int], ...]:
    """(w, h) of each written level: :data:`LEVEL_DOWNSAMPLES` while both sides stay >= 1 px.

    >>> _pyramid_dims(4096, 3072)
    ((4096, 3072), (1024, 768), (256, 192), (128, 96))
    >>> _pyramid_dims(40, 30)
    ((40, 30), (10, 7), (2, 1))
    """
    return tuple(
        _level_dims(width, height, ds)
        for ds in LEVEL_DOWNSAMPLES
        if ds == 1 or (width // ds >= 1 and height // ds >= 1)
    )


def _level_dims(
    width: int, height: int, downsample: float | tuple[float, float]
) -> tuple[int, int]:
    """(w, h) of the grid at ``downsample``: floor of the level-0 size, at least 1 px.

    A measured downsample such as ``W0 / Wi`` maps back to ``Wi`` exactly (the epsilon absorbs
    float rounding).

    >>> _level_dims(40000, 30000, 32), _level_dims(40000, 30000, (40000 / 1250, 30000 / 937))
    ((1250, 937), (1250, 937))
    """
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample  # type: ignore[misc]
    if not (dx > 0 and dy > 0):
        raise ValueError(f"downsample must be > 0, got {downsample!r}")
    return max(1, int(width / dx + 1e-6)), max(1, int(height / dy + 1e-6))


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DemoSlide:
    """A generated slide and its analytic ground truth.

    ``level_dimensions`` are the (w, h) of the written pyramid levels (level 0 first).
    """

    path: Path
    width: int
    height: int
    mpp: float
    seed: int
    has_tumour: bool
    level_dimensions: tuple[tuple[int, int], ...]
    _shapes: _Shapes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        shapes = _make_shapes(self.width, self.height, self.seed, self.has_tumour)
        object.__setattr__(self, "_shapes", shapes)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.width, self.height

    @property
    def name(self) -> str:
        """Slide id (file name without extension)."""
        return self.path.name.split(".")[0]

    def tissue_mask(self, downsample: float | tuple[float, float]) -> np.ndarray:
        """Tissue truth on the grid of ``downsample`` (scalar or per-axis (dx, dy)).

        Returns bool (h, w) with ``(w, h) = floor(W0 / dx), floor(H0 / dy)``; pixel (i, j) is
        the truth at its centre, level-0 ``((j + 0.5) * W0 / w, (i + 0.5) * H0 / h)``, the
        same sampling the pyramid level of that downsample was rendered with.
        """
        return self._masks(downsample)[0]

    def tumour_mask(self, downsample: float | tuple[float, float]) -> np.ndarray:
        """Tumour truth (always inside tissue), bool (h, w) on the grid of ``downsample``."""
        return self._masks(downsample)[1]

    def truth_at(self, l0_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in_tissue, in_tumour), each bool (N,), at level-0 points ``l0_xy`` (N, 2) = (x, y)."""
        pts = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
        tissue, tumour = self._shapes.fields(pts[:, 0], pts[:, 1])
        return tissue > 0, (tissue > 0) & (tumour > 0)

    def _masks(self, downsample: float | tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        w, h = _level_dims(self.width, self.height, downsample)
        l0_x = (np.arange(w) + 0.5) * (self.width / w)
        tissue = np.empty((h, w), dtype=bool)
        tumour = np.empty((h, w), dtype=bool)
        rows = max(1, 4_000_000 // w)  # bound the float temporaries on huge grids
        for y0 in range(0, h, rows):
            l0_y = (np.arange(y0, min(h, y0 + rows)) + 0.5)[:, None] * (self.height / h)
            t, u = self._shapes.fields(l0_x[None, :], l0_y)
            tissue[y0 : y0 + rows] = t > 0
            tumour[y0 : y0 + rows] = (t > 0) & (u > 0)
        return tissue, tumour


@dataclass(frozen=True)
class DemoBag:
    """A written TRIDENT features file and its per-patch truth.

    ``coords``: (N, 2) int64 level-0 top-left (x, y), row-major. ``is_tumour``: (N,) bool,
    patch centre inside tumour.
    """

    path: Path
    coords: np.ndarray
    is_tumour: np.ndarray


@dataclass(frozen=True)
class DemoProject:
    """A complete demo folder ready for ``clam-heat run <folder>/config.yaml``."""

    folder: Path
    config_path: Path
    slide_ids: tuple[str, ...]
    labels: tuple[str, ...]
    slide_paths: tuple[Path, ...]
    feature_paths: tuple[Path, ...]
    checkpoint_path: Path
    process_list_path: Path
    slides: tuple[DemoSlide, ...]
    bags: tuple[DemoBag, ...]


# ------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a unique, not yet existing temp path beside ``path``; move it into place on success.

    The writer creates the temp file itself (normal permissions); on any failure it is removed,
    so readers only ever see complete files.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"{path.parent}: cannot create folder ({err.strerror or err}); check permissions"
        ) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- textures


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


# ------------------------------------------------------------------------------- level render


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


# --------------------------------------------------------------------------------- public API


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
    with _atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
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


def level0_magnification(mpp: float) -> int:
    """TRIDENT's nominal scan magnification for a level-0 MPP (bucketed, spec formats §1.4).

    >>> level0_magnification(0.5), level0_magnification(0.25), level0_magnification(0.2527)
    (20, 40, 40)
    """
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    raise ValueError(f"mpp {mpp} is too coarse for TRIDENT's magnification buckets (< 2.4)")


def _feature_space(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared by all demo bags of width ``dim``: latent basis (r, dim) with orthonormal rows and
    the unit tumour direction (dim,), both float64."""
    rng = np.random.default_rng(np.random.SeedSequence([_FEATURE_SPACE_SEED, dim]))
    rank = min(FEATURE_RANK, dim)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    direction = rng.standard_normal(dim)
    return basis, direction / np.linalg.norm(direction)


def _grid_truth(slide: DemoSlide, patch_size_level0: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-patch grid: coords (N, 2) int64 level-0 top-lefts with centre in tissue, row-major,
    and their tumour flags (N,) bool."""
    ps = patch_size_level0
    l0_x = np.arange(0, slide.width - ps + 1, ps, dtype=np.int64)
    l0_y = np.arange(0, slide.height - ps + 1, ps, dtype=np.int64)
    tissue, tumour = slide._shapes.fields(
        (l0_x + ps / 2)[None, :].astype(np.float64), (l0_y + ps / 2)[:, None].astype(np.float64)
    )
    iy, ix = np.nonzero(tissue > 0)  # row-major: y outer, x inner
    coords = np.stack([l0_x[ix], l0_y[iy]], axis=1).astype(np.int64).reshape(-1, 2)
    return coords, tumour[iy, ix] > 0


def make_demo_features(
    slide: DemoSlide,
    path: str | Path,
    *,
    patch_size_level0: int = 256,
    feature_dim: int = 64,
    seed: int = 0,
    target_magnification: int = 20,
) -> DemoBag:
    """Write a TRIDENT-format features H5 for ``slide`` (spec formats §1.2-1.3).

    Patches form a row-major grid of ``patch_size_level0`` squares whose centre lies in tissue.
    Features are seeded Gaussian noise in a shared :data:`FEATURE_RANK`-dimensional subspace plus
    small isotropic noise; patches whose centre is in tumour are shifted by :data:`TUMOUR_SHIFT`
    along one shared direction, so an attention model can learn to find them.
    """
    import h5py

    path = Path(path)
    if patch_size_level0 < 1 or feature_dim < 1:
        raise ValueError("patch_size_level0 and feature_dim must be >= 1")
    mag0 = level0_magnification(slide.mpp)
    coords, is_tumour = _grid_truth(slide, patch_size_level0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFEA7]))
    basis, direction = _feature_space(feature_dim)
    feats = rng.standard_normal((len(coords), len(basis))) @ basis
    feats += 0.3 * rng.standard_normal((len(coords), feature_dim))
    feats += TUMOUR_SHIFT * is_tumour[:, None] * direction[None, :]
    feats = feats.astype(np.float32)

    attrs = {
        "patch_size": int(round(patch_size_level0 * target_magnification / mag0)),
        "patch_size_level0": int(patch_size_level0),
        "level0_magnification": mag0,
        "target_magnification": target_magnification,
        "overlap": 0,
        "name": slide.name,
        "savetodir": str(path.parent),
        "level0_width": int(slide.width),
        "level0_height": int(slide.height),
    }
    with _atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        dset = h5.create_dataset("features", data=feats)
        dset.attrs.update({"name": slide.name, "savetodir": str(path.parent), "encoder": "demo"})
        cset = h5.create_dataset("coords", data=coords, maxshape=(None, 2))
        cset.attrs.update(attrs)
    return DemoBag(path, coords, is_tumour)


def train_demo_checkpoint(
    bags: Sequence[tuple[np.ndarray, int]],
    path: str | Path,
    *,
    feature_dim: int = 64,
    n_classes: int = 2,
    seed: int = 0,
    seconds: float = 3.0,
    legacy_keys: bool = False,
) -> Path:
    """Train a gated CLAM_SB (small) briefly and save its ``state_dict`` to ``path``.

    Bag-level cross-entropy with Adam, one bag per step in a seeded shuffled order. ``seconds`` is
    a nominal budget turned into a fixed step count (:data:`STEPS_PER_SECOND`), so the weights
    are reproducible whatever the machine's speed. Bags above :data:`MAX_TRAIN_BAG` patches are
    subsampled per step. The global torch RNG state is left untouched. ``legacy_keys`` writes
    the layout of CLAM's own demo checkpoint (``attention_net.module.*`` plus an int64
    ``instance_loss_fn.labels``); both load with ``torch.load(..., weights_only=True)``.
    """
    import torch

    from .models import ClamSB

    path = Path(path)
    if not bags:
        raise ValueError("bags is empty: pass at least one (features, label) pair")
    for i, (feats, label) in enumerate(bags):
        if feats.ndim != 2 or feats.shape[1] != feature_dim or len(feats) == 0:
            raise ValueError(f"bag {i}: features must be (N>0, {feature_dim}), got {feats.shape}")
        if not 0 <= int(label) < n_classes:
            raise ValueError(f"bag {i}: label {label} is not in 0..{n_classes - 1}")
    steps = max(1, round(seconds * STEPS_PER_SECOND))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EA1]))
    tensors = [torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)) for f, _ in bags]
    labels = [torch.tensor([int(lab)]) for _, lab in bags]

    threads = torch.get_num_threads()
    try:
        # Tiny matmuls: one thread is several times faster than two, and reproducible.
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ClamSB(gate=True, size_arg="small", n_classes=n_classes, embed_dim=feature_dim)
            optim = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-5)
            loss_fn = torch.nn.CrossEntropyLoss()
            model.train()
            order: list[int] = []
            for _ in range(steps):
                if not order:
                    order = rng.permutation(len(bags)).tolist()
                i = order.pop()
                h = tensors[i]
                if len(h) > MAX_TRAIN_BAG:
                    pick = np.sort(rng.choice(len(h), MAX_TRAIN_BAG, replace=False))
                    h = h[torch.from_numpy(pick)]
                loss = loss_fn(model(h)[0], labels[i])
                optim.zero_grad()
                loss.backward()
                optim.step()
            model.eval()
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)

    if legacy_keys:
        state = {
            (k.replace("attention_net.", "attention_net.module.", 1)): v for k, v in state.items()
        }
        state["instance_loss_fn.labels"] = torch.arange(2, dtype=torch.int64)
    with _atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _write_text(path: Path, text: str) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


#: Segmentation preset for the demo slides: CLAM's bwh_biopsy values (small a_t/a_h, since a
#: tiny demo slide holds only ~50 "512x512 level-0 patches" of area; create_heatmaps' built-in
#: a_t of 50 would filter out every contour).
_DEMO_PRESET = (
    "seg_level,sthresh,mthresh,close,use_otsu,a_t,a_h,max_n_holes,vis_level,line_thickness,"
    "white_thresh,black_thresh,use_padding,contour_fn,keep_ids,exclude_ids\n"
    "-1,15,11,2,FALSE,1,1,2,-1,50,5,50,TRUE,four_pt,none,none\n"
)


def _demo_config(feature_dim: int) -> dict[str, object]:
    """CLAM's seven heatmap-config blocks (template values, demo paths) plus runner_arguments."""
    return {
        "exp_arguments": {
            "n_classes": 2,
            "save_exp_code": "demo",
            "raw_save_dir": "heatmaps/heatmap_raw_results",
            "production_save_dir": "heatmaps/heatmap_production_results",
            "batch_size": 256,
        },
        "data_arguments": {
            "data_dir": "slides",
            "data_dir_key": "source",
            "process_list": "demo.csv",
            "preset": "presets/demo.csv",
            "slide_ext": ".tiff",
            "label_dict": {name: i for i, name in enumerate(_LABEL_NAMES)},
        },
        "patching_arguments": {
            "patch_size": 256,
            "overlap": 0,
            "patch_level": 0,
            "custom_downsample": 1,
        },
        "encoder_arguments": {"model_name": "resnet50_trunc", "target_img_size": 224},
        "model_arguments": {
            "ckpt_path": "ckpts/s_0_checkpoint.pt",
            "model_type": "clam_sb",
            "initiate_fn": "initiate_model",
            "model_size": "small",
            "drop_out": 0.0,
            "embed_dim": feature_dim,
        },
        "heatmap_arguments": {
            "vis_level": -1,
            "alpha": 0.4,
            "blank_canvas": False,
            "save_orig": True,
            "save_ext": "jpg",
            "use_ref_scores": True,
            "blur": False,
            "use_center_shift": True,
            "use_roi": False,
            "calc_heatmap": False,
            "binarize": False,
            "binary_thresh": -1,
            "custom_downsample": 1,
            "cmap": "jet",
        },
        "sample_arguments": {
            "samples": [
                {"name": "topk_high_attention", "sample": True, "seed": 1, "k": 15, "mode": "topk"}
            ]
        },
        "runner_arguments": {
            "features_dir": "features",
            "device": "auto",
            "results_dir": "heatmaps/results",
        },
    }


def _slide_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % (2**31))


def make_demo_project(
    folder: str | Path,
    *,
    n_slides: int = 5,
    size: Literal["tiny", "small", "large"] = "tiny",
    seed: int = 0,
    feature_dim: int = 64,
) -> DemoProject:
    """Write (or reuse) a complete CLAM-style demo project under ``folder``.

    Layout: ``slides/demo_NNN.tiff``, ``features/demo_NNN.h5`` (TRIDENT), ``ckpts/
    s_0_checkpoint.pt`` (CLAM_SB trained on these bags), ``process_lists/demo.csv``
    (``slide_id,label``), ``config.yaml`` (all paths relative to the folder) and an empty
    ``heatmaps/`` for outputs. Odd-numbered slides are tumour-free (label ``normal``).
    ``demo_manifest.json`` records the parameters; it is written last, so a call with the same
    parameters reuses a complete project and anything else regenerates it.
    """
    import yaml

    if size not in DEMO_SIZES:
        raise ValueError(f"size must be one of {sorted(DEMO_SIZES)}, got {size!r}")
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    folder = Path(folder)
    width, height = DEMO_SIZES[size]
    ids = tuple(f"demo_{i:03d}" for i in range(n_slides))
    has_tumour = tuple(i % 2 == 0 for i in range(n_slides))
    labels = tuple(_LABEL_NAMES[int(t)] for t in has_tumour)
    slide_paths = tuple(folder / "slides" / f"{sid}.tiff" for sid in ids)
    feature_paths = tuple(folder / "features" / f"{sid}.h5" for sid in ids)
    ckpt = folder / "ckpts" / "s_0_checkpoint.pt"
    plist = folder / "process_lists" / "demo.csv"
    config_path = folder / "config.yaml"
    manifest_path = folder / "demo_manifest.json"
    manifest = {
        "format_version": DEMO_FORMAT_VERSION,
        "n_slides": n_slides,
        "size": size,
        "seed": seed,
        "feature_dim": feature_dim,
    }
    outputs = (
        *slide_paths,
        *feature_paths,
        ckpt,
        plist,
        config_path,
        folder / "presets" / "demo.csv",
    )

    reuse = False
    with contextlib.suppress(OSError, ValueError):
        reuse = json.loads(manifest_path.read_text()) == manifest and all(
            p.is_file() for p in outputs
        )
    if reuse:
        slides = tuple(
            DemoSlide(
                p,
                width,
                height,
                _PROJECT_MPP,
                _slide_seed(seed, i),
                has_tumour[i],
                _pyramid_dims(width, height),
            )
            for i, p in enumerate(slide_paths)
        )
        bags = tuple(_read_bag(s, p) for s, p in zip(slides, feature_paths, strict=True))
    else:
        manifest_path.unlink(missing_ok=True)
        for sub, ext in (("slides", ".tiff"), ("features", ".h5")):
            for stale in (folder / sub).glob(f"demo_*{ext}"):
                if stale.stem not in ids:
                    stale.unlink()
        slides = tuple(
            make_demo_slide(
                p,
                width=width,
                height=height,
                seed=_slide_seed(seed, i),
                mpp=_PROJECT_MPP,
                tumour=has_tumour[i],
            )
            for i, p in enumerate(slide_paths)
        )
        bags = tuple(
            make_demo_features(s, p, feature_dim=feature_dim, seed=_slide_seed(seed, i))
            for i, (s, p) in enumerate(zip(slides, feature_paths, strict=True))
        )
        train = _training_bags(
            [_read_features(b.path) for b in bags], [b.is_tumour for b in bags], has_tumour, seed
        )
        train_demo_checkpoint(train, ckpt, feature_dim=feature_dim, seed=seed)
        rows = "".join(f"{sid},{lab}\n" for sid, lab in zip(ids, labels, strict=True))
        _write_text(plist, "slide_id,label\n" + rows)
        _write_text(folder / "presets" / "demo.csv", _DEMO_PRESET)
        header = "# clam-heat demo config: CLAM create_heatmaps.py blocks, paths relative here\n"
        body = yaml.safe_dump(_demo_config(feature_dim), sort_keys=False)
        _write_text(config_path, header + "---\n" + body)
        (folder / "heatmaps").mkdir(parents=True, exist_ok=True)
        _write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    (folder / "heatmaps").mkdir(parents=True, exist_ok=True)
    return DemoProject(
        folder=folder,
        config_path=config_path,
        slide_ids=ids,
        labels=labels,
        slide_paths=slide_paths,
        feature_paths=feature_paths,
        checkpoint_path=ckpt,
        process_list_path=plist,
        slides=slides,
        bags=bags,
    )


def _training_bags(
    features: Sequence[np.ndarray],
    is_tumour: Sequence[np.ndarray],
    has_tumour: Sequence[bool],
    seed: int,
    n_mixed: int = 40,
) -> list[tuple[np.ndarray, int]]:
    """Bags to train the demo checkpoint on, labelled 1 when they hold tumour patches.

    Each slide's own bag; for tumour slides, the same bag without its tumour patches (label 0);
    and ``n_mixed`` bags drawn from the pooled patches, alternately with and without a few tumour
    patches. Normal patches then occur in both classes, so only attention on tumour patches can
    separate them: the attention learns where tumour is, not which slide it saw.
    """
    bags: list[tuple[np.ndarray, int]] = []
    for feats, tumour, slide_has in zip(features, is_tumour, has_tumour, strict=True):
        if len(feats):
            bags.append((feats, int(slide_has and bool(tumour.any()))))
        if tumour.any() and (~tumour).any():
            bags.append((feats[~tumour], 0))
    pos = np.concatenate([f[t] for f, t in zip(features, is_tumour, strict=True)])
    neg = np.concatenate([f[~t] for f, t in zip(features, is_tumour, strict=True)])
    if len(pos) == 0 or len(neg) == 0:
        return bags
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBA65]))
    for j in range(n_mixed):
        n = int(rng.integers(min(20, len(neg)), min(200, len(neg)) + 1))
        bag = neg[rng.choice(len(neg), n, replace=False)]
        if j % 2 == 0:
            k = int(rng.integers(1, min(len(pos), 40) + 1))
            bag = np.concatenate([bag, pos[rng.choice(len(pos), k, replace=False)]])
        bags.append((bag, int(j % 2 == 0)))
    return bags


def _read_features(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as h5:
        return np.asarray(h5["features"][:], dtype=np.float32)


def _read_bag(slide: DemoSlide, path: Path) -> DemoBag:
    """Rebuild a :class:`DemoBag` from its H5 coords and the slide's analytic truth."""
    import h5py

    with h5py.File(path, "r") as h5:
        coords = np.asarray(h5["coords"][:], dtype=np.int64).reshape(-1, 2)
        ps = int(h5["coords"].attrs["patch_size_level0"])
    return DemoBag(path, coords, slide.truth_at(coords + ps / 2)[1])
