"""The viewer's tiled layers: a slide or an image placed on the slide's level-0 frame, the
comparison's difference map, and the colour bar of a colormap.

Coordinate frames (as in openslide's deepzoom): ``l0_`` values are level-0 pixels of the slide;
``layer`` pixels are pixels of one level of a pane's pyramid. Each layer is placed on the
slide's level-0 frame by an origin and a per-level downsample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ..errors import SlideError

if TYPE_CHECKING:
    from ..slide import Slide

__all__ = [
    "TILE_SIZE",
    "Layer",
    "array_layer",
    "difference_layer",
    "legend",
    "open_heatmap_layer",
]

#: Side of a served tile, in pixels of the tile's pyramid level.
TILE_SIZE = 512
#: Longest side of the in-memory difference map of a comparison (vis pixels).
DIFFERENCE_SIDE = 2048


@dataclass
class Layer:
    """A tiled pyramid placed on the slide's level-0 frame.

    Pixel (x, y) of level ``k`` covers level-0 ``l0_origin + (x, y) * downsample(k)``, where
    ``downsample(k) = l0_per_px * slide.level_downsamples[k]``.
    """

    slide: Slide
    l0_origin: tuple[float, float] = (0.0, 0.0)
    l0_per_px: tuple[float, float] = (1.0, 1.0)
    #: tile encoding: JPEG for slide pixels, lossless PNG for heatmaps (no second JPEG pass
    #: over colour blocks that the page may magnify many times)
    format: str = "jpg"

    def info(self) -> dict[str, Any]:
        levels = []
        for (w, h), (dx, dy) in zip(
            self.slide.level_dimensions, self.slide.level_downsamples, strict=True
        ):
            levels.append(
                {
                    "width": int(w),
                    "height": int(h),
                    "downsample": [dx * self.l0_per_px[0], dy * self.l0_per_px[1]],
                }
            )
        return {
            "origin": list(self.l0_origin),
            "tile": TILE_SIZE,
            "format": self.format,
            "levels": levels,
        }

    def tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        """Tile (tx, ty) of ``level`` as (h, w, 3) uint8 RGB (edge tiles are smaller), or None."""
        if not 0 <= level < self.slide.level_count:
            return None
        w, h = self.slide.level_dimensions[level]
        x0, y0 = tx * TILE_SIZE, ty * TILE_SIZE
        if tx < 0 or ty < 0 or x0 >= w or y0 >= h:
            return None
        dx, dy = self.slide.level_downsamples[level]
        size = (min(TILE_SIZE, w - x0), min(TILE_SIZE, h - y0))
        return self.slide.read_region((round(x0 * dx), round(y0 * dy)), level, size)

    @property
    def memory_bytes(self) -> int:
        """Bytes of decoded pixels this layer holds (0 when tiles are read from disk)."""
        return self.slide.memory_bytes

    def close(self) -> None:
        self.slide.close()


def _image_pyramid(rgb: np.ndarray, path: Path) -> Slide:
    """An in-memory 2x pyramid of a heatmap image, down to about one tile."""
    from ..slide import ArraySlide

    n_levels = 1 + max(0, math.ceil(math.log2(max(rgb.shape[:2]) / TILE_SIZE)))
    return ArraySlide(rgb, mpp=None, n_levels=n_levels, level_factor=2, path=path)


def open_heatmap_layer(
    path: Path, l0_size: tuple[int, int], l0_box: tuple[int, int, int, int] | None = None
) -> Layer:
    """The heatmap at ``path`` as a layer over a slide of level-0 size ``l0_size``.

    A TIFF that OpenSlide opens (the pyramidal heatmap) is read tile by tile; any other image
    (the production JPEG/PNG) is decoded once. The image covers ``l0_box`` (the ROI) or the
    whole slide; its scale on level 0 follows from the two sizes.
    """
    from ..slide import open_slide

    slide: Slide | None = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            slide = open_slide(path)
        except SlideError:
            slide = None  # a plain (non-tiled) TIFF: decode it below
    if slide is None:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SlideError(path, "heatmap image cannot be decoded", "rerun its heatmap stage")
        slide = _image_pyramid(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), path)
    x1, y1, x2, y2 = l0_box if l0_box is not None else (0, 0, *l0_size)
    width, height = slide.dimensions
    return Layer(
        slide, (float(x1), float(y1)), ((x2 - x1) / width, (y2 - y1) / height), format="png"
    )


def array_layer(
    rgb: np.ndarray, l0_size: tuple[int, int], path: Path | None = None, fmt: str = "png"
) -> Layer:
    """An RGB image covering the whole slide of level-0 size ``l0_size`` (placed by size)."""
    slide = _image_pyramid(rgb, path or Path("memory.png"))
    width, height = slide.dimensions
    return Layer(slide, (0.0, 0.0), (l0_size[0] / width, l0_size[1] / height), format=fmt)


def difference_layer(arrays: dict[str, Any], l0_size: tuple[int, int], cmap: str) -> Layer:
    """The comparison's A - B percentile difference, one colour per patch, over white.

    ``arrays`` is :func:`clam_heat.compare.compare_slide`'s matched scores; the difference is
    mapped from [-1, 1] to [0, 1] so no difference is the diverging colormap's centre.
    """
    from ..compare import overlay, patch_canvas, percentile_difference

    downsample = max(1.0, max(l0_size) / DIFFERENCE_SIDE)
    shape = (max(1, round(l0_size[1] / downsample)), max(1, round(l0_size[0] / downsample)))
    diff = (percentile_difference(arrays["a"], arrays["b"]) + 1.0) / 2.0
    mean, covered = patch_canvas(arrays["coords"], diff, arrays["size"], downsample, shape)
    white = np.full((*shape, 3), 255, np.uint8)
    return array_layer(overlay(white, mean, covered, cmap, alpha=1.0), l0_size)


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
