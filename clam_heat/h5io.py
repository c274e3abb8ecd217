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
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_path
from .errors import FeatureError, message_line

if TYPE_CHECKING:
    import h5py

__all__ = [
    "MAX_PATCHES",
    "bag_dataset",
    "bag_shape",
    "check_coords_header",
    "check_features_header",
    "check_finite_rows",
    "open_bag_file",
    "read_bag_dataset",
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


# ------------------------------------------------------------------ reading feature bags
# Every header (shape, dtype, count) is checked before its data is read: memory is bounded by
# runner_arguments.max_patches, not by what a file declares.


def open_bag_file(path: Path) -> h5py.File:
    """A feature (or coords) H5 opened read-only, or a FeatureError naming it."""
    import h5py

    if not path.is_file():
        raise FeatureError(f"{path}: features file not found (check runner_arguments.features_dir)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = message_line(err, "unreadable")
        raise FeatureError(
            f"{path}: not a readable HDF5 file ({reason}); re-extract the features or remove the "
            "slide from the process list"
        ) from None


#: ``runner_arguments.max_patches``'s default: the largest bag read (a bag's memory is bounded
#: by this and its width, whatever the file declares).
MAX_PATCHES = 2_000_000

#: Rows of a bag checked for NaN/Inf at a time (the check never holds an (N, D) mask).
_CHECK_ROWS = 65_536


def bag_dataset(path: Path, handle: h5py.File, name: str) -> h5py.Dataset:
    """The dataset ``name`` (never read here), or a FeatureError naming the H5 and the key."""
    import h5py

    try:
        node = handle[name]
    except KeyError:  # a dangling soft or external link: the name is listed, its target gone
        raise FeatureError(
            f"{path}: '{name}' is a link to a missing object (a dangling soft or external "
            "link); re-extract the features"
        ) from None
    if not isinstance(node, h5py.Dataset):
        raise FeatureError(f"{path}: '{name}' is a group, not a dataset (re-extract the features)")
    return node


def bag_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A (1, N, X) shape seen as (N, X), as the reader squeezes it."""
    return shape[1:] if len(shape) == 3 and shape[0] == 1 else shape


def read_bag_dataset(path: Path, node: h5py.Dataset, dtype: Any = None) -> np.ndarray:
    """The whole dataset, squeezed to 2-D where it is (1, N, X); cast to ``dtype`` while
    reading (one array in memory, not the stored one and its copy)."""
    name = node.name.rsplit("/", 1)[-1]
    try:
        if dtype is not None and node.dtype != dtype:
            with np.errstate(over="ignore"):  # overflow becomes Inf, reported by the caller
                raw = node.astype(dtype)[()]
        else:
            raw = node[()]
        raw = np.asarray(raw)
    except (OSError, ValueError, TypeError) as err:
        raise FeatureError(
            f"{path}: dataset '{name}' cannot be read ({message_line(err)}); the file may be "
            "truncated, re-extract the features"
        ) from None
    return raw[0] if raw.ndim == 3 and raw.shape[0] == 1 else raw


def check_features_header(path: Path, node: h5py.Dataset, max_patches: int) -> int:
    """Shape and dtype of ``features`` checked before a byte of it is read; returns N."""
    shape = bag_shape(tuple(node.shape))
    if len(shape) != 2:
        raise FeatureError(
            f"{path}: 'features' has shape {tuple(node.shape)}, expected (N, D) or (1, N, D) "
            "(re-extract the features with TRIDENT or CLAM)"
        )
    if node.dtype.kind not in "fiu":
        raise FeatureError(
            f"{path}: 'features' has non-numeric dtype {node.dtype} (re-extract the features)"
        )
    n, width = shape
    if n == 0:
        raise FeatureError(
            f"{path}: empty bag (0 patches); the slide had no tissue patches, remove it from the "
            "process list or re-run patching"
        )
    if width == 0:
        raise FeatureError(f"{path}: 'features' has width 0 (re-extract the features)")
    if n > max_patches:
        raise FeatureError(
            f"{path}: 'features' declares {n} patches, above runner_arguments.max_patches "
            f"({max_patches}); raise max_patches if the bag is real (memory grows with it), "
            "else re-extract the features"
        )
    return int(n)


def check_coords_header(path: Path, coords_path: Path, node: h5py.Dataset, n: int) -> None:
    """Shape, dtype and count of ``coords`` checked before it is read."""
    where = "" if coords_path == path else f" (from {coords_path})"
    shape = bag_shape(tuple(node.shape))
    if len(shape) != 2 or shape[1] != 2:
        raise FeatureError(
            f"{path}: 'coords'{where} has shape {tuple(node.shape)}, expected (N, 2) or "
            "(1, N, 2) level-0 (x, y) (re-run patching)"
        )
    if node.dtype.kind not in "fiu":
        raise FeatureError(f"{path}: 'coords'{where} has non-numeric dtype {node.dtype}")
    if shape[0] != n:
        raise FeatureError(
            f"{path}: features has {n} rows but coords{where} has {shape[0]} "
            "(features and coords come from different patching runs; re-extract, or point "
            "runner_arguments.patches_dir at the matching coords)"
        )


def check_finite_rows(path: Path, features: np.ndarray) -> np.ndarray:
    """(N, D) float32 without NaN/Inf (checked a block of rows at a time), or a FeatureError."""
    n_bad = 0
    for start in range(0, features.shape[0], _CHECK_ROWS):
        block = features[start : start + _CHECK_ROWS]
        n_bad += int((~np.isfinite(block).all(axis=1)).sum())
    if n_bad:
        raise FeatureError(
            f"{path}: {n_bad} of {features.shape[0]} feature rows contain NaN or Inf "
            "(re-extract the features, e.g. without fp16 overflow)"
        )
    return np.ascontiguousarray(features)
