"""CLAM's HDF5 layouts, written atomically (through :mod:`clam_heat.atomic`) and read back.

* ``<id>.h5`` features files: ``features`` (N, D) float32 + ``coords`` (N, 2) int64;
* score files (``<id>_blockmap.h5``, ``<id>_<overlap>_roi_<use_roi>.h5``): ``attention_scores``
  (N, 1) float32 + ``coords`` (N, 2) int64.

Coordinates are level-0 (x, y) top-left corners (``coords_l0``), as in every CLAM/TRIDENT file.
Provenance goes into attributes; non-scalar values are stored as JSON text. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import FeatureError

__all__ = [
    "as_coords",
    "read_scores",
    "write_blockmap",
    "write_features_h5",
    "write_scores_h5",
]


def as_coords(coords_l0: np.ndarray) -> np.ndarray:
    """Check level-0 (N, 2) coordinates (whole pixels) and return them as C-contiguous int64."""
    coords = np.asarray(coords_l0)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureError(f"coords must have shape (N, 2) (level-0 x, y), got {coords.shape}")
    if (
        coords.size
        and not np.issubdtype(coords.dtype, np.integer)
        and not (np.all(np.isfinite(coords)) and np.all(coords == np.round(coords)))
    ):
        raise FeatureError("coords must be whole level-0 pixel positions")
    return np.ascontiguousarray(coords, dtype=np.int64)


def _attr_value(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | np.integer | np.floating | np.bool_):
        return value
    return json.dumps(value, default=str)


def _write_h5_atomic(
    path: Path,
    datasets: dict[str, np.ndarray],
    *,
    attrs: Mapping[str, Any] | None,
    coords_attrs: Mapping[str, Any] | None,
) -> None:
    """Write datasets (and attributes) to a temp file beside ``path``, then move it into place.

    ``attrs`` go on the file root (e.g. the encoder fingerprint, a prediction), ``coords_attrs``
    on ``coords`` (e.g. ``patch_size_level0``, which the readers understand); non-scalar values
    are stored as JSON text."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for key, data in datasets.items():
            h5.create_dataset(key, data=data)
        for key, value in (attrs or {}).items():
            h5.attrs[key] = _attr_value(value)
        for key, value in (coords_attrs or {}).items():
            h5["coords"].attrs[key] = _attr_value(value)


def _check_rows(path: Path, values: np.ndarray, coords: np.ndarray, what: str) -> np.ndarray:
    coords = as_coords(coords)
    if values.shape[0] != coords.shape[0]:
        raise FeatureError(
            f"{path}: {values.shape[0]} {what} rows but {coords.shape[0]} coords; they must match"
        )
    return coords


def write_features_h5(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    attrs: Mapping[str, Any] | None = None,
    coords_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """CLAM's raw ``<id>.h5``: ``features`` (N, D) float32 + ``coords`` (N, 2) int64, atomic;
    ``attrs`` on the root, ``coords_attrs`` on ``coords``."""
    path = Path(path)
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise FeatureError(f"{path}: features must be 2-D (N, D), got shape {feats.shape}")
    coords = _check_rows(path, feats, coords, "feature")
    datasets = {"features": feats.astype(np.float32), "coords": coords}
    _write_h5_atomic(path, datasets, attrs=attrs, coords_attrs=coords_attrs)
    return path


def write_scores_h5(
    path: str | Path,
    scores: np.ndarray,
    coords: np.ndarray,
    *,
    attrs: Mapping[str, Any] | None = None,
    coords_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """CLAM's score file (``_blockmap.h5``, ``<id>_<overlap>_roi_<use_roi>.h5``), atomic.

    ``attention_scores`` (N, 1) float32 from ``scores`` (N,) or (N, 1); ``coords`` (N, 2) int64;
    ``attrs`` on the root, ``coords_attrs`` on ``coords``.
    """
    path = Path(path)
    values = np.asarray(scores, dtype=np.float32)
    if values.ndim > 2 or (values.ndim == 2 and values.shape[1] != 1) or values.ndim == 0:
        raise FeatureError(f"{path}: scores must have shape (N,) or (N, 1), got {values.shape}")
    values = values.reshape(-1, 1)
    coords = _check_rows(path, values, coords, "score")
    datasets = {"attention_scores": values, "coords": coords}
    _write_h5_atomic(path, datasets, attrs=attrs, coords_attrs=coords_attrs)
    return path


def write_blockmap(
    path: str | Path, scores: np.ndarray, coords: np.ndarray, prediction: Mapping[str, Any]
) -> Path:
    """CLAM's ``_blockmap.h5`` with the prediction stored beside the scores as provenance
    (``prediction`` attribute, JSON) and the patch size on ``coords``."""
    return write_scores_h5(
        path,
        scores,
        coords,
        attrs={"prediction": json.dumps(dict(prediction))},
        coords_attrs={"patch_size_level0": int(prediction["patch_size_level0"])},
    )


def read_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores (N,) float32, level-0 coords (N, 2) int64 and the level-0 patch size of a score
    file (blockmap or overlap H5)."""
    import h5py

    with h5py.File(path, "r") as h5:
        scores = np.asarray(h5["attention_scores"][:], dtype=np.float32).reshape(-1)
        coords = np.asarray(h5["coords"][:], dtype=np.int64).reshape(-1, 2)
        size = int(h5["coords"].attrs["patch_size_level0"])
    return scores, coords, size
