"""Saved-image formats: the one table of heatmap image extensions.

The config accepts these as ``save_ext`` (:data:`clam_heat.config.SAVE_EXTS`), the heatmap
writers build their sink table from it (:data:`clam_heat.heatmap.writers.SINKS`: one sink per
extension, by ``kind``) and the doctor sizes outputs with it. It imports nothing, so the config
can read it without loading the drawing code. A new format is one row here and, for a new
``kind``, one sink class in :mod:`clam_heat.heatmap.writers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["IMAGE_FORMATS", "ImageFormat"]


@dataclass(frozen=True)
class ImageFormat:
    """One saved-image format."""

    #: the writer family (``heatmap.writers`` keys its sinks by it): jpeg, png or tiff
    kind: str
    #: bytes per pixel of a typical saved heatmap (the doctor's disk estimate; content decides)
    bytes_per_pixel: float
    #: keyword options of the sink (e.g. JPEG quality)
    options: dict[str, Any] = field(default_factory=dict)


#: Formats by extension (lower case, no dot). JPEG quality: 100 for ``.jpg``, PIL's default 75
#: for ``.jpeg`` (as CLAM's outputs).
IMAGE_FORMATS: dict[str, ImageFormat] = {
    "jpg": ImageFormat("jpeg", 0.3, {"quality": 100}),
    "jpeg": ImageFormat("jpeg", 0.3, {"quality": 75}),
    "png": ImageFormat("png", 1.2),
    "tiff": ImageFormat("tiff", 3.0),
    "tif": ImageFormat("tiff", 3.0),
}
