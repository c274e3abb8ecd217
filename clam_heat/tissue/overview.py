"""CLAM's ``visWSI`` overview (``<id>_mask.jpg``): contours, holes and ids on a whole level.

``vis_*`` values are pixels of the level being drawn; contours come in level 0.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..atomic import write_bytes_atomic
from .contours import TissueContours, _scaled
from .segment import _check_rgb, resolve_level

if TYPE_CHECKING:
    from ..slide import Slide


def draw_overview(
    slide: Slide,
    tc: TissueContours,
    *,
    vis_level: int = -1,
    line_thickness: int = 250,
    number_contours: bool = True,
) -> np.ndarray:
    """The segmentation overview CLAM saves as ``<id>_mask.jpg`` (``visWSI``).

    See docs/rules/heatmaps.md#segmentation-overview.

    Returns an (h, w, 3) uint8 RGB image of the whole ``vis_level`` (-1: best level for 32x):
    tissue contours in green (0, 255, 0), holes in blue (0, 0, 255), line thickness
    ``int(line_thickness * sqrt(sx * sy))`` vis pixels (``line_thickness`` is in level-0 px;
    at least 1), and each contour's index in red at its centroid. CLAM's text (Hershey simplex,
    scale 2, thickness 10) is shrunk on images under 1000 px so it stays readable.
    """
    level = resolve_level(slide, vis_level)
    image = np.ascontiguousarray(slide.read_level(level)).copy()
    if tc.is_empty():
        return image
    dx, dy = slide.level_downsamples[level]
    scale = (1.0 / dx, 1.0 / dy)
    thickness = max(1, int(line_thickness * math.sqrt(scale[0] * scale[1])))
    sc = _scaled(tc, scale)
    h, w = image.shape[:2]
    factor = min(1.0, min(h, w) / 1000.0)
    font_scale = max(0.4, 2.0 * factor)
    font_thickness = max(1, round(10 * factor))
    for idx, contour in enumerate(sc.tissue):  # loop over contours only
        cv2.drawContours(image, [contour], -1, (0, 255, 0), thickness, lineType=cv2.LINE_8)
        if number_contours:
            moments = cv2.moments(contour)
            c_x = int(moments["m10"] / (moments["m00"] + 1e-9))
            c_y = int(moments["m01"] / (moments["m00"] + 1e-9))
            cv2.putText(
                image,
                str(idx),
                (c_x, c_y),
                cv2.FONT_HERSHEY_SIMPLEX,
                font_scale,
                (255, 0, 0),
                font_thickness,
            )
    for holes in sc.holes:
        if holes:
            cv2.drawContours(image, holes, -1, (0, 0, 255), thickness, lineType=cv2.LINE_8)
    return image


def save_overview_jpg(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save an RGB overview as JPEG (quality 75, as CLAM's PIL default), atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buffer, format="JPEG", quality=75)
    return write_bytes_atomic(path, buffer.getvalue())
