"""Signed scores onto the heatmap's 0-100 scale with zero at the centre (torch-free)."""

from __future__ import annotations

import numpy as np

__all__ = ["signed_percent"]


def signed_percent(scores: np.ndarray, scale: str = "percentile") -> np.ndarray:
    """``50 + 50 * s / m`` clipped to [0, 100]: zero maps to the colormap's centre, ``m`` is the
    99th percentile of ``|s|`` (``percentile``) or its largest value (``raw``).

    >>> signed_percent(np.array([-2.0, 0.0, 1.0]), "raw")
    array([ 0., 50., 75.])
    >>> signed_percent(np.zeros(2))
    array([50., 50.])
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return s
    size = np.abs(s)
    m = float(size.max()) if scale == "raw" else float(np.percentile(size, 99))
    if m <= 0:
        m = float(size.max())
    if m <= 0:
        return np.full(s.shape, 50.0)
    return np.clip(50.0 + 50.0 * s / m, 0.0, 100.0)
