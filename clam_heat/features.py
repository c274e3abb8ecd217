"""Reading precomputed patch features (TRIDENT and CLAM H5 files) into a validated bag.

A bag is the feature matrix of one slide plus the level-0 top-left corner of every patch and the
patch side in level-0 pixels, which the heatmap needs to paint each patch's footprint. Files come
from several tools that store the patch geometry differently (formats spec §1.2-§1.3, §3.1-§3.2),
so the level-0 patch size is resolved by a fixed order of rules (spec §3.5); the rule that fired
is kept on the bag so the runner can record it:

``override``  the config's ``runner_arguments.patch_size_level0``
``a``         ``coords.attrs['patch_size_level0']`` (TRIDENT; int or float)
``b``         ``patch_size`` x ``level0_magnification`` / ``target_magnification`` (TRIDENT)
``c``         ``patch_size`` x level downsample of ``patch_level`` x ``custom_downsample`` (CLAM)
``d``         rules a-c on a companion coords file (TRIDENT ``patches/<id>_patches.h5`` beside
              ``features_<enc>/``, or CLAM ``<patches_dir>[/patches]/<id>.h5``)
``e``         TRIDENT folder name ``<M>x_<P>px_<O>px_overlap`` + slide magnification from its MPP
``f``         smallest coordinate step (assumes no overlap; warns loudly)

Only this module opens feature files; everything downstream uses :class:`Bag`.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FeatureError, message_line

if TYPE_CHECKING:
    import h5py

    from .slide import Slide

__all__ = [
    "Bag",
    "PatchSizeGuessWarning",
    "find_features_file",
    "load_bag",
    "magnification_from_mpp",
    "patch_size_from_attrs",
    "patch_size_from_spacing",
]

log = logging.getLogger(__name__)

#: TRIDENT's folder name for one patching config, e.g. ``20x_256px_0px_overlap``.
CONFIG_FOLDER = re.compile(r"(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap")

#: TRIDENT's MPP -> nominal magnification buckets (upper bound exclusive, magnification).
MPP_BUCKETS: tuple[tuple[float, float], ...] = (
    (0.16, 80.0),
    (0.2, 60.0),
    (0.3, 40.0),
    (0.6, 20.0),
    (1.2, 10.0),
    (2.4, 5.0),
)

_FIX_OVERRIDE = "set runner_arguments.patch_size_level0"


class PatchSizeGuessWarning(UserWarning):
    """The level-0 patch size was guessed from coordinate spacing (rule f)."""


@dataclass(frozen=True)
class Bag:
    """One slide's features, ready for a MIL model and the heatmap.

    ``features``: (N, D) float32, row i belongs to ``coords_l0[i]``.
    ``coords_l0``: (N, 2) int64, level-0 (x, y) top-left corner of each patch.
    ``patch_size_l0``: patch side in level-0 pixels; ``patch_size_rule`` says which rule of
    the module docstring produced it and ``patch_size_detail`` explains it in words.
    ``overlap_l0``: overlap between neighbouring patches in level-0 pixels when the file says
    (TRIDENT), else ``None``. ``encoder``: the encoder name if known. ``path``: the features
    file; ``coords_path``: the file the coordinates came from (usually the same).
    """

    features: np.ndarray
    coords_l0: np.ndarray
    patch_size_l0: int
    patch_size_rule: str
    encoder: str | None
    path: Path
    patch_size_detail: str = ""
    overlap_l0: int | None = None
    coords_path: Path | None = None

    @property
    def n_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


# ---------------------------------------------------------------------------------------------
# locating files


def find_features_file(slide_id: str, *, features_dir: Path | None, raw_dir: Path) -> Path:
    """The features H5 of ``slide_id``: ``features_dir`` first, then CLAM's raw cache.

    Looks at ``<features_dir>/<id>.h5`` (TRIDENT ``features_<enc>/``),
    ``<features_dir>/h5_files/<id>.h5`` (CLAM ``extract_features_fp``) and ``<raw_dir>/<id>.h5``
    (the per-slide cache CLAM's heatmap script writes). Raises :class:`FeatureError` naming every
    place looked at.
    """
    candidates: list[Path] = []
    if features_dir is not None:
        features_dir = Path(features_dir)
        candidates += [
            features_dir / f"{slide_id}.h5",
            features_dir / "h5_files" / f"{slide_id}.h5",
        ]
    candidates.append(Path(raw_dir) / f"{slide_id}.h5")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FeatureError(
        f"features for slide {slide_id!r} not found (looked at {looked}); set "
        "runner_arguments.features_dir to the folder holding <slide_id>.h5 (TRIDENT "
        "features_<encoder>/ or CLAM's feat_dir)"
    )


def _companion_candidates(path: Path, slide_id: str, patches_dir: Path | None) -> list[Path]:
    """Where a coords-only file for ``slide_id`` may live, in the order they are tried."""
    found = [path.parent.parent / "patches" / f"{slide_id}_patches.h5"]
    if patches_dir is not None:
        patches_dir = Path(patches_dir)
        for folder in (patches_dir, patches_dir / "patches"):
            found += [folder / f"{slide_id}.h5", folder / f"{slide_id}_patches.h5"]
    resolved = path.resolve()
    unique: list[Path] = []
    for candidate in found:
        if candidate not in unique and candidate.resolve() != resolved:
            unique.append(candidate)
    return unique


# ---------------------------------------------------------------------------------------------
# attributes and pure rules


def _decode(value: Any) -> Any:
    """h5py attr value -> plain Python: bytes decoded, the string 'None'/'' -> None, 1-element
    arrays unwrapped, numpy scalars converted.

    >>> _decode(b"uni_v2"), _decode("None"), _decode(np.array([256])), _decode(np.float64(2.5))
    ('uni_v2', None, 256, 2.5)
    """
    if isinstance(value, bytes | np.bytes_):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        value = value.strip()
        return None if value in ("", "None") else value
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return _decode(value.reshape(()).item())
        if value.dtype.kind in "SO":
            return [_decode(v) for v in value.ravel()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """All attrs decoded; an attr h5py cannot read (exotic types) is skipped, not fatal."""
    out: dict[str, Any] = {}
    for key in attrs:
        try:
            value = _decode(attrs[key])
        except (OSError, TypeError, ValueError):
            continue
        if value is not None:
            out[key] = value
    return out


def _number(attrs: Mapping[str, Any], key: str) -> float | None:
    """A finite number from an attr (numeric strings and the first element of arrays accepted).

    >>> _number({"a": "20", "b": np.array([4.0, 4.0]), "c": "x", "d": float("nan")}, "a")
    20.0
    >>> [_number({"b": np.array([4.0, 4.0]), "c": "x", "d": float("nan")}, k) for k in "bcde"]
    [4.0, None, None, None]
    """
    value = attrs.get(key)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, np.ndarray | list | tuple):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def magnification_from_mpp(mpp: float) -> float | None:
    """TRIDENT's nominal magnification for a level-0 MPP (None above 2.4 um/px).

    >>> magnification_from_mpp(0.2527), magnification_from_mpp(0.5), magnification_from_mpp(3.0)
    (40.0, 20.0, None)
    """
    for upper, magnification in MPP_BUCKETS:
        if mpp < upper:
            return magnification
    return None


def patch_size_from_attrs(
    attrs: Mapping[str, Any],
    level_downsamples: tuple[tuple[float, float], ...] | None = None,
) -> tuple[int, str, str] | None:
    """Rules a-c on one ``coords`` attr dict (already decoded) -> (size_l0, rule, detail).

    ``level_downsamples`` (from the slide) is only used by rule c when the file has no
    ``downsample`` attr. Returns None when no rule applies.

    >>> patch_size_from_attrs({"patch_size_level0": 512.0, "patch_size": 256})[:2]
    (512, 'a')
    >>> patch_size_from_attrs({"patch_size": 256, "level0_magnification": 40,
    ...                        "target_magnification": 20})[:2]
    (512, 'b')
    >>> patch_size_from_attrs({"patch_size": 256, "patch_level": 1,
    ...                        "downsample": np.array([4.0, 4.0])})[:2]
    (1024, 'c')
    >>> patch_size_from_attrs({"patch_size": 256, "patch_level": 1}, ((1.0, 1.0), (2.0, 2.0)))[:2]
    (512, 'c')
    >>> patch_size_from_attrs({"patch_size": 256, "patch_level": 1}) is None
    True
    """
    size_l0 = _number(attrs, "patch_size_level0")
    if size_l0 is not None and size_l0 > 0:
        return int(round(size_l0)), "a", f"patch_size_level0 = {attrs['patch_size_level0']}"
    patch_size = _number(attrs, "patch_size")
    if patch_size is None or patch_size <= 0:
        return None
    src_mag = _number(attrs, "level0_magnification")
    dst_mag = _number(attrs, "target_magnification")
    if src_mag and dst_mag and src_mag > 0 and dst_mag > 0:
        size = int(round(patch_size * src_mag / dst_mag))
        return size, "b", f"patch_size {patch_size:g} at {dst_mag:g}x on a {src_mag:g}x scan"
    level = _number(attrs, "patch_level")
    if level is None or level < 0 or level != int(level):
        return None
    level = int(level)
    downsample = _number(attrs, "downsample")
    source = "downsample attr"
    if downsample is None or downsample <= 0:
        if level_downsamples is not None and level < len(level_downsamples):
            downsample, source = float(level_downsamples[level][0]), "slide level downsample"
        elif level == 0:
            downsample, source = 1.0, "level 0"
        else:
            return None
    custom = _number(attrs, "custom_downsample")
    custom = custom if custom is not None and custom > 0 else 1.0
    size = int(round(patch_size * downsample * custom))
    detail = f"patch_size {patch_size:g} at patch_level {level} x {downsample:g} ({source})"
    if custom != 1.0:
        detail += f" x custom_downsample {custom:g}"
    return size, "c", detail


def _overlap_from_attrs(attrs: Mapping[str, Any]) -> int | None:
    """TRIDENT's absolute overlap converted to level-0 pixels (spec §3.5 item 4)."""
    overlap = _number(attrs, "overlap")
    src_mag = _number(attrs, "level0_magnification")
    dst_mag = _number(attrs, "target_magnification")
    if overlap is None or not src_mag or not dst_mag or dst_mag <= 0:
        return None
    return int(round(overlap * src_mag / dst_mag))


def patch_size_from_spacing(coords_l0: np.ndarray) -> int | None:
    """Smallest positive gap between distinct sorted x (and y) coordinates (rule f).

    ``coords_l0``: (N, 2) level-0 (x, y). With overlap the step is smaller than the patch, so
    this is a lower bound; None when every patch shares both coordinates (e.g. N = 1).

    >>> patch_size_from_spacing(np.array([[0, 0], [256, 0], [768, 256], [256, 512]]))
    256
    >>> patch_size_from_spacing(np.array([[10, 10]])) is None
    True
    """
    gaps: list[int] = []
    for axis in (0, 1):
        values = np.unique(coords_l0[:, axis])
        if values.size > 1:
            gaps.append(int(np.diff(values).min()))
    return min(gaps) if gaps else None


# ---------------------------------------------------------------------------------------------
# reading


def _open(path: Path) -> h5py.File:
    import h5py  # here, not at the top: finding a bag's file (a fingerprint) needs no HDF5

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


def _read_dataset(path: Path, handle: h5py.File, name: str) -> np.ndarray:
    import h5py

    node = handle[name]
    if not isinstance(node, h5py.Dataset):
        raise FeatureError(f"{path}: '{name}' is a group, not a dataset (re-extract the features)")
    try:
        return np.asarray(node[()])
    except (OSError, ValueError, TypeError) as err:
        raise FeatureError(
            f"{path}: dataset '{name}' cannot be read ({message_line(err)}); the file may be "
            "truncated, re-extract the features"
        ) from None


def _check_features(path: Path, raw: np.ndarray) -> np.ndarray:
    """(N, D) float32 or a FeatureError; squeezes one leading singleton axis of a 3-D bag."""
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise FeatureError(
            f"{path}: 'features' has shape {raw.shape}, expected (N, D) or (1, N, D) "
            "(re-extract the features with TRIDENT or CLAM)"
        )
    if raw.dtype.kind not in "fiu":
        raise FeatureError(
            f"{path}: 'features' has non-numeric dtype {raw.dtype} (re-extract the features)"
        )
    if raw.shape[0] == 0:
        raise FeatureError(
            f"{path}: empty bag (0 patches); the slide had no tissue patches, remove it from the "
            "process list or re-run patching"
        )
    if raw.shape[1] == 0:
        raise FeatureError(f"{path}: 'features' has width 0 (re-extract the features)")
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        features = raw.astype(np.float32, copy=False)
    bad_rows = ~np.isfinite(features).all(axis=1)
    n_bad = int(bad_rows.sum())
    if n_bad:
        raise FeatureError(
            f"{path}: {n_bad} of {features.shape[0]} feature rows contain NaN or Inf "
            "(re-extract the features, e.g. without fp16 overflow)"
        )
    return np.ascontiguousarray(features)


def _check_coords(path: Path, coords_path: Path, raw: np.ndarray, n_features: int) -> np.ndarray:
    """(N, 2) int64 level-0 coords or a FeatureError naming both counts on a mismatch; a
    legacy (1, N, 2) array is squeezed like a (1, N, D) bag."""
    where = "" if coords_path == path else f" (from {coords_path})"
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise FeatureError(
            f"{path}: 'coords'{where} has shape {raw.shape}, expected (N, 2) or (1, N, 2) "
            "level-0 (x, y) "
            "(re-run patching)"
        )
    if raw.dtype.kind not in "fiu":
        raise FeatureError(f"{path}: 'coords'{where} has non-numeric dtype {raw.dtype}")
    if raw.shape[0] != n_features:
        raise FeatureError(
            f"{path}: features has {n_features} rows but coords{where} has {raw.shape[0]} "
            "(features and coords come from different patching runs; re-extract, or point "
            "runner_arguments.patches_dir at the matching coords)"
        )
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise FeatureError(f"{path}: 'coords'{where} contain NaN or Inf (re-run patching)")
        raw = np.rint(raw)
    return np.ascontiguousarray(raw.astype(np.int64, copy=False))


@dataclass
class _Companion:
    path: Path
    attrs: dict[str, Any]
    n_rows: int
    coords: np.ndarray | None = None


def _read_companion(path: Path, *, with_coords: bool) -> _Companion | None:
    """A companion coords file's ``coords`` attrs (and values when asked); None if no coords."""
    import h5py

    with _open(path) as handle:
        node = handle.get("coords")
        if not isinstance(node, h5py.Dataset):
            return None
        coords = _read_dataset(path, handle, "coords") if with_coords else None
        shape = tuple(node.shape)
        n_rows = int(shape[1] if len(shape) == 3 and shape[0] == 1 else shape[0] if shape else 0)
        return _Companion(path, _read_attrs(node.attrs), n_rows, coords)


def _encoder_name(path: Path, handle: h5py.File) -> str | None:
    """The ``encoder`` attr (features dataset, then file root), else ``features_<enc>`` folder."""
    for attrs in (handle["features"].attrs, handle.attrs):
        value = _decode(attrs["encoder"]) if "encoder" in attrs else None
        if isinstance(value, str):
            return value
    folder = path.parent.name
    if folder.startswith("features_") and len(folder) > len("features_"):
        return folder[len("features_") :]
    return None


def _folder_rule(path: Path, slide: Slide | None) -> tuple[int, str, int] | None:
    """Rule e: the nearest ``<M>x_<P>px_<O>px_overlap`` ancestor + the slide's magnification."""
    match = next(
        (m for part in reversed(path.parent.parts) if (m := CONFIG_FOLDER.fullmatch(part))), None
    )
    if match is None or slide is None:
        return None
    src_mag, source = None, ""
    if slide.mpp is not None and slide.mpp > 0:
        src_mag = magnification_from_mpp(slide.mpp)
        source = f"MPP {slide.mpp:g}"
    if src_mag is None and slide.magnification:
        src_mag, source = float(slide.magnification), "objective power"
    if src_mag is None:
        return None
    dst_mag, patch_size, overlap = float(match[1]), int(match[2]), int(match[3])
    size = int(round(patch_size * src_mag / dst_mag))
    detail = (
        f"folder {match[0]}: patch_size {patch_size} at {dst_mag:g}x on a {src_mag:g}x scan "
        f"({source})"
    )
    return size, detail, int(round(overlap * src_mag / dst_mag))


def load_bag(
    path: Path,
    *,
    slide: Slide | None = None,
    patch_size_level0_override: int | None = None,
    patches_dir: Path | None = None,
) -> Bag:
    """Read and validate one features H5 (TRIDENT or CLAM) into a :class:`Bag`.

    Features are cast to float32 (TRIDENT may store fp16) and a (1, N, D) bag is squeezed.
    Coords come from the same file, else from a companion coords file (see module docstring).
    ``slide`` is optional: it only helps rules c (level downsample) and e (MPP). Every problem is
    a :class:`FeatureError` whose one-line message names the file and the fix.
    """
    import h5py

    path = Path(path)
    slide_id = path.stem
    with _open(path) as handle:
        if "features" not in handle:
            names = ", ".join(sorted(handle.keys())) or "none"
            raise FeatureError(
                f"{path}: no 'features' dataset (datasets: {names}); this looks like a "
                "coords-only patches file, point runner_arguments.features_dir at the features "
                "folder (TRIDENT features_<encoder>/, CLAM feat_dir)"
            )
        features = _check_features(path, _read_dataset(path, handle, "features"))
        encoder = _encoder_name(path, handle)
        coords_node = handle.get("coords")
        own_coords: np.ndarray | None = None
        own_attrs: dict[str, Any] = {}
        if coords_node is not None:
            own_coords = _read_dataset(path, handle, "coords")
            if isinstance(coords_node, h5py.Dataset):
                own_attrs = _read_attrs(coords_node.attrs)
    n = features.shape[0]
    candidates = _companion_candidates(path, slide_id, patches_dir)
    companion: _Companion | None = None
    companion_tried = False

    def get_companion() -> _Companion | None:
        nonlocal companion, companion_tried
        if not companion_tried:
            companion_tried = True
            for candidate in candidates:
                if candidate.is_file():
                    companion = _read_companion(candidate, with_coords=own_coords is None)
                    if companion is not None:
                        break
        return companion

    if own_coords is not None:
        coords_path = path
        coords = _check_coords(path, path, own_coords, n)
    else:
        found = get_companion()
        if found is None or found.coords is None:
            looked = ", ".join(str(c) for c in candidates)
            raise FeatureError(
                f"{path}: coords missing (no 'coords' dataset in the file, no companion coords "
                f"file at {looked}); set runner_arguments.patches_dir to the folder of "
                "<slide_id>.h5 coords files"
            )
        coords_path = found.path
        coords = _check_coords(path, found.path, found.coords, n)

    downsamples = slide.level_downsamples if slide is not None else None
    overlap_l0 = _overlap_from_attrs(own_attrs)
    resolved: tuple[int, str, str] | None = None
    if patch_size_level0_override is not None:
        if patch_size_level0_override <= 0:
            raise FeatureError(
                f"{path}: runner_arguments.patch_size_level0 = {patch_size_level0_override} "
                "must be a positive number of level-0 pixels"
            )
        resolved = (int(patch_size_level0_override), "override", "runner_arguments override")
    if resolved is None:
        resolved = patch_size_from_attrs(own_attrs, downsamples)
    if resolved is None:
        found = get_companion()
        if found is not None:
            hit = patch_size_from_attrs(found.attrs, downsamples)
            if hit is not None:
                resolved = (hit[0], "d", f"{hit[2]} (rule {hit[1]} on {found.path})")
                overlap_l0 = _overlap_from_attrs(found.attrs)
                if found.n_rows != n:
                    log.warning(
                        "%s: companion %s has %d coords but the bag has %d patches; it may come "
                        "from another patching run",
                        path,
                        found.path,
                        found.n_rows,
                        n,
                    )
    if resolved is None:
        folder_hit = _folder_rule(path, slide)
        if folder_hit is not None:
            resolved = (folder_hit[0], "e", folder_hit[1])
            overlap_l0 = folder_hit[2]
    if resolved is None:
        step = patch_size_from_spacing(coords)
        if step is None or step <= 0:
            raise FeatureError(
                f"{path}: cannot determine the level-0 patch size (no size attrs, no companion "
                f"coords file, a single patch position); {_FIX_OVERRIDE}"
            )
        resolved = (step, "f", f"smallest coordinate step {step} px (assumes no overlap)")
        message = (
            f"{path}: level-0 patch size guessed as {step} px from coordinate spacing; if the "
            f"patches overlap the heatmap will be wrong, {_FIX_OVERRIDE}"
        )
        warnings.warn(message, PatchSizeGuessWarning, stacklevel=2)
        log.warning(message)
    size, rule, detail = resolved
    log.info(
        "%s: %d patches x %d features (encoder %s); patch size %d px level 0 by rule %s (%s)",
        path,
        n,
        features.shape[1],
        encoder,
        size,
        rule,
        detail,
    )
    return Bag(
        features=features,
        coords_l0=coords,
        patch_size_l0=size,
        patch_size_rule=rule,
        encoder=encoder,
        path=path,
        patch_size_detail=detail,
        overlap_l0=overlap_l0,
        coords_path=coords_path,
    )
