"""Slide reading: the only module that touches OpenSlide.

Coordinate frames (as in openslide's deepzoom): ``l0_`` values are level-0 pixels, ``l_`` values
are pixels of the level being read. :meth:`Slide.read_region` takes a level-0 top-left and a size
in level pixels, exactly like ``openslide.OpenSlide.read_region``, but returns an RGB ``ndarray``.

:class:`ArraySlide` serves a numpy image as a pyramid with the same protocol, so the pipeline's
maths can be tested without a scanner file (the test seam, like openslide's ``ImageSlide``).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .errors import SlideError

#: Whole-level reads above this many pixels are refused (CLAM has no guard; see
#: docs/rules/heatmaps.md#whole-level-reads).
MAX_LEVEL_READ_PIXELS = 400_000_000

#: Relative tolerance when matching a requested downsample to a level ("32x" may report 32.03).
DOWNSAMPLE_TOLERANCE = 0.01

__all__ = [
    "ArraySlide",
    "MAX_LEVEL_READ_PIXELS",
    "OpenSlideSlide",
    "Slide",
    "best_level_for_downsample",
    "open_slide",
]


def best_level_for_downsample(
    level_downsamples: tuple[tuple[float, float], ...], downsample: float
) -> int:
    """Largest level whose downsample is <= ``downsample`` (within 1 %), else 0.

    This is OpenSlide's rule, which CLAM uses for ``seg_level``/``vis_level`` = -1, made
    tolerant so that a nominal 32x level reporting 32.03 still counts as 32x.

    >>> best_level_for_downsample(((1.0, 1.0), (4.0, 4.0), (16.02, 16.0), (32.03, 32.1)), 32)
    3
    >>> best_level_for_downsample(((1.0, 1.0), (4.0, 4.0)), 2)
    0
    """
    best = 0
    limit = downsample * (1.0 + DOWNSAMPLE_TOLERANCE)
    for level, (dx, dy) in enumerate(level_downsamples):
        if max(dx, dy) <= limit:
            best = level
    return best


class Slide(ABC):
    """A multi-resolution slide with level-0 based addressing (see module docstring)."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float | None
    magnification: float | None

    @property
    def name(self) -> str:
        """File name without its extension."""
        return self.path.name.split(".")[0] if self.path.suffix else self.path.name

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[tuple[float, float], ...]:
        """Per-axis downsample of each level, measured as (W0/Wi, H0/Hi) as CLAM does."""
        w0, h0 = self.level_dimensions[0]
        return tuple((w0 / w, h0 / h) for w, h in self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        return best_level_for_downsample(self.level_downsamples, downsample)

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise SlideError(
                self.path,
                f"level {level} does not exist (slide has levels 0..{self.level_count - 1})",
                "use -1 for automatic level choice or a smaller level",
            )

    @abstractmethod
    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` = (w, h) level pixels whose top-left is ``l0_xy`` (level 0).

        Returns an (h, w, 3) uint8 RGB array; areas outside the slide are black (alpha dropped,
        as CLAM's ``.convert('RGB')`` does).
        """

    def read_level(self, level: int) -> np.ndarray:
        """The whole level as (h, w, 3) uint8; refused above :data:`MAX_LEVEL_READ_PIXELS`."""
        self.check_level(level)
        w, h = self.level_dimensions[level]
        if w * h > MAX_LEVEL_READ_PIXELS:
            raise SlideError(
                self.path,
                f"level {level} is {w}x{h} px, too large to read whole",
                "choose a coarser level (e.g. seg_level/vis_level -1)",
            )
        return self.read_region((0, 0), level, (w, h))

    @property
    def memory_bytes(self) -> int:
        """Bytes of pixels held in memory (0 for file-backed slides, which read on demand)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the underlying handle."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_dimensions})"


def _float_property(props: dict[str, str], *keys: str) -> float | None:
    for key in keys:
        value = props.get(key)
        if value in (None, ""):
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number) and number > 0:
            return number
    return None


@functools.cache
def _argb_reader() -> tuple[Any, Any]:
    """OpenSlide's raw ``openslide_read_region`` (filling a caller's uint32 buffer, errors
    checked) and the pointer type it takes, or ``(None, None)`` where it cannot be used.

    openslide-python's public ``read_region`` fills the same buffer, converts it in place and
    wraps it in a PIL image, which costs two more full copies of the region (one to
    ``ndarray``, one to drop alpha): 11 bytes per pixel at peak instead of 7, and ~0.3 ms per
    256 px patch. The raw function is private to openslide-python (present since 1.0), so a
    release without it, or a big-endian host, falls back to the public path.
    """
    import ctypes
    import sys

    from openslide import lowlevel

    func = getattr(lowlevel, "_read_region", None)
    if func is None or sys.byteorder != "little":
        return None, None
    return func, ctypes.POINTER(ctypes.c_uint32)


def argb_to_rgb(argb: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied ARGB pixels (native uint32) as (..., 3) uint8 RGB.

    Byte for byte what openslide-python's PIL image gives once alpha is dropped: opaque pixels
    are unpacked; translucent ones are un-premultiplied as ``255 * c // a`` kept to 8 bits;
    fully transparent ones (outside the slide: all zero) are left as they are.

    >>> argb_to_rgb(np.array([0xFF102030, 0x80402010, 0], dtype=np.uint32)).tolist()
    [[16, 32, 48], [127, 63, 31], [0, 0, 0]]
    """
    bgra = argb.view(np.uint8).reshape(*argb.shape, 4)  # little-endian words: B, G, R, A
    rgb = bgra[..., 2::-1].copy()
    alpha = bgra[..., 3]
    translucent = alpha != 255
    if translucent.any():
        a = alpha[translucent].astype(np.uint32)
        stored = bgra[translucent]
        straight = ((255 * stored[:, 2::-1].astype(np.uint32)) // np.maximum(a, 1)[:, None]) & 0xFF
        straight = straight.astype(np.uint8)
        transparent = a == 0
        straight[transparent] = stored[transparent][:, :3]  # untouched bytes, read as R, G, B
        rgb[translucent] = straight
    return rgb


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide (SVS, generic tiled TIFF, NDPI, MRXS, DICOM, ...)."""

    def __init__(self, path: str | Path) -> None:
        import openslide

        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(self.path, "slide file not found", "check data_dir and slide_ext")
        size = self.path.stat().st_size
        if size == 0:
            raise SlideError(
                self.path, "0 bytes", "re-copy it; an interrupted copy or download leaves it empty"
            )
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as err:  # unsupported formats are a subclass
            cut = _cut_short(self.path, size)
            if cut:
                raise SlideError(self.path, f"{size} bytes, {cut}", "re-copy it") from None
            if isinstance(err, openslide.OpenSlideUnsupportedFormatError):
                reason = "unsupported or unrecognised slide format"
                fix = "convert it to a pyramidal tiled TIFF or remove it from the process list"
            else:
                reason = "OpenSlide cannot open the file"
                fix = "the file may be corrupt or truncated; re-export or remove it"
            detail = str(err).replace("\n", " ")
            raise SlideError(self.path, f"{reason} ({detail})", fix) from None
        props = dict(self._osr.properties)
        self.properties = props
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.mpp = _float_property(props, "openslide.mpp-x", "aperio.MPP")
        self.magnification = _float_property(props, "openslide.objective-power")

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        self.check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.zeros((max(h, 0), max(w, 0), 3), dtype=np.uint8)
        x, y = int(l0_xy[0]), int(l0_xy[1])
        try:
            read_argb, uint32_pointer = _argb_reader()
            if read_argb is None:
                return np.asarray(self._osr.read_region((x, y), level, (w, h)))[..., :3].copy()
            argb = np.empty((h, w), dtype=np.uint32)
            read_argb(self._osr._osr, argb.ctypes.data_as(uint32_pointer), x, y, level, w, h)
        except openslide.OpenSlideError as err:
            raise SlideError(
                self.path,
                f"reading pixels failed at level {level} {tuple(l0_xy)} ({err})".replace("\n", " "),
                "the file is corrupt; re-export the slide or remove it from the process list",
            ) from None
        return argb_to_rgb(argb)

    def close(self) -> None:
        self._osr.close()


class ArraySlide(Slide):
    """An in-memory pyramid built from an RGB array, following the :class:`Slide` protocol.

    Levels are made by block-averaging by ``level_factor`` until the image is small, so the
    pyramid's geometry is like a scanner file's. Used by unit tests and by pure-maths checks.
    """

    def __init__(
        self,
        image: np.ndarray,
        *,
        mpp: float | None = 0.5,
        n_levels: int = 3,
        level_factor: int = 4,
        path: str | Path = "array",
    ) -> None:
        if image.ndim != 3 or image.shape[2] < 3:
            raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
        self.path = Path(path)
        self.mpp = mpp
        self.magnification = None if mpp is None else round(10.0 / mpp, 3)
        levels = [np.ascontiguousarray(image[..., :3].astype(np.uint8))]
        for _ in range(1, n_levels):
            prev = levels[-1]
            h, w = prev.shape[0] // level_factor, prev.shape[1] // level_factor
            if h < 1 or w < 1:
                break
            cropped = prev[: h * level_factor, : w * level_factor].astype(np.float32)
            blocks = cropped.reshape(h, level_factor, w, level_factor, 3).mean(axis=(1, 3))
            levels.append(np.round(blocks).astype(np.uint8))
        self._levels = levels
        self.level_dimensions = tuple((lv.shape[1], lv.shape[0]) for lv in levels)

    @property
    def memory_bytes(self) -> int:
        return sum(level.nbytes for level in self._levels)

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        self.check_level(level)
        dx, dy = self.level_downsamples[level]
        w, h = int(size[0]), int(size[1])
        out = np.zeros((max(h, 0), max(w, 0), 3), dtype=np.uint8)
        data = self._levels[level]
        l_x, l_y = int(l0_xy[0] // dx), int(l0_xy[1] // dy)
        x0, y0 = max(l_x, 0), max(l_y, 0)
        x1, y1 = min(l_x + w, data.shape[1]), min(l_y + h, data.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - l_y : y1 - l_y, x0 - l_x : x1 - l_x] = data[y0:y1, x0:x1]
        return out


def open_slide(path: str | Path) -> Slide:
    """Open a slide file with OpenSlide; every failure is a :class:`SlideError` naming it."""
    return OpenSlideSlide(path)


_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _cut_short(path: Path, size: int) -> str:
    """Why a TIFF-based slide (TIFF, SVS, NDPI, ...) looks truncated, or "" if it does not.

    A TIFF header with a directory or image data beyond the end of the file is what an
    interrupted copy leaves; such a file needs re-copying, not converting.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if head not in _TIFF_MAGIC:
        return ""
    import logging

    import tifffile

    damaged = "cut short or damaged: a TIFF header but its directories cannot be read"
    tiff_log = logging.getLogger("tifffile")
    complaints: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = complaints.append  # type: ignore[method-assign]
    tiff_log.addHandler(catcher)
    propagate, tiff_log.propagate = tiff_log.propagate, False  # its complaints are ours to word
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                ends = [int(o) + int(c) for o, c in zip(offsets, counts, strict=False)]
                if ends and max(ends) > size:
                    return f"cut short: its image data runs to byte {max(ends)}"
    except Exception:  # noqa: BLE001 - any parse failure of a TIFF header file means damage
        return damaged
    finally:
        tiff_log.removeHandler(catcher)
        tiff_log.propagate = propagate
    return damaged if complaints else ""
