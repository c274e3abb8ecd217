"""The analytic truth of a demo slide: tissue and tumour as zero super-level sets of smooth
fields (rotated ellipses plus low-frequency sine noise) in level-0 pixels.

Every tile of every level is rendered from these fields at its own level-0 coordinates, and the
masks of :class:`DemoSlide` rasterise the same fields on any downsample grid, so the ground truth
comes for free. ``l0_`` values are level-0 pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Downsamples of the pyramid levels (Aperio-like 4x steps plus the 32x level CLAM's -1 picks).
LEVEL_DOWNSAMPLES: tuple[int, ...] = (1, 4, 16, 32)


_FEATURE_SPACE_SEED = 20240613  # shared by all bags, so one model fits every demo slide


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


def _satellites(
    blobs: _Ellipses,
    blob: np.ndarray,
    direction: np.ndarray,
    radius: np.ndarray,
    size: np.ndarray,
    theta: np.ndarray,
    stretch: np.ndarray | float = 1.0,
) -> _Ellipses:
    """Ellipses inside blobs ``blob``: centred ``radius`` semi-axes from the blob's centre towards
    ``direction`` (rad), semi-axes ``size`` times the blob's (the second also times ``stretch``)."""
    return _Ellipses(
        blobs.cx[blob] + radius * blobs.a[blob] * np.cos(direction),
        blobs.cy[blob] + radius * blobs.b[blob] * np.sin(direction),
        size * blobs.a[blob],
        size * blobs.b[blob] * stretch,
        theta,
    )


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
    hole_stretch = rng.uniform(0.8, 1.2, n_holes)
    hole_theta = rng.uniform(0, math.pi, n_holes)
    holes = _satellites(blobs, hole_blob, hole_dir, hole_r, hole_size, hole_theta, hole_stretch)

    n_tum = int(rng.integers(1, 3)) if tumour else 0
    tum_blob = np.arange(n_tum) % n
    tum_dir = np.full(n_tum, 0.0)
    for i, blob in enumerate(tum_blob):
        away = hole_dir[hole_blob == blob]
        tum_dir[i] = (away[0] + math.pi) if len(away) else rng.uniform(0, 2 * math.pi)
    tum_r = rng.uniform(0.2, 0.35, n_tum)
    tum_size = rng.uniform(0.42, 0.55, n_tum)
    tum_theta = rng.uniform(0, math.pi, n_tum)
    tumours = _satellites(blobs, tum_blob, tum_dir, tum_r, tum_size, tum_theta)
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
