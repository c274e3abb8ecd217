"""Small image helpers shared by the ``docs/make_*_pictures.py`` scripts (run from the repository
root, e.g. ``python docs/make_explain_pictures.py``; this folder is then on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_at_height(path: Path, height: int = 260) -> np.ndarray:
    """The image at ``path`` (BGR) scaled to ``height`` pixels, aspect kept."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    scale = height / image.shape[0]
    return cv2.resize(image, (max(1, int(image.shape[1] * scale)), height), cv2.INTER_AREA)


def labelled(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` under a white bar carrying ``text``."""
    bar = np.full((26, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, image])
