"""Reading precomputed patch features (TRIDENT and CLAM H5 files) into a validated bag.

A bag is the feature matrix of one slide plus the level-0 top-left corner of every patch and the
patch side in level-0 pixels, which the heatmap needs to paint each patch's footprint. Files come
from several tools that store the patch geometry differently
(docs/rules/formats.md#trident-features, docs/rules/formats.md#clam-features), so the level-0 patch
size is resolved by a fixed order of rules (docs/rules/formats.md#patch-size-rules); the rule that
fired is kept on the bag so the runner can record it:

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

from .errors import FeatureError
from .h5io import (
    MAX_PATCHES,
    bag_dataset,
    bag_shape,
    check_coords_header,
    check_features_header,
    check_finite_rows,
    open_bag_file,
    read_bag_dataset,
)

if TYPE_CHECKING:
    import h5py

    from .slide import Slide

__all__ = [
    "Bag",
    "MAX_PATCHES",
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
    """TRIDENT's absolute overlap converted to level-0 pixels.

    See docs/rules/formats.md#trident-magnification.
    """
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


def _check_coords(path: Path, coords_path: Path, raw: np.ndarray) -> np.ndarray:
    """(N, 2) int64 level-0 coords (the header was checked by :func:`_check_coords_header`)."""
    where = "" if coords_path == path else f" (from {coords_path})"
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


def _read_companion(
    path: Path, *, with_coords: bool, owner: Path, n_features: int
) -> _Companion | None:
    """A companion coords file's ``coords`` attrs (and values when asked, after their header is
    checked against the bag ``owner`` of ``n_features`` rows); None if it has no coords."""
    with open_bag_file(path) as handle:
        if "coords" not in handle:
            return None
        node = bag_dataset(path, handle, "coords")
        shape = bag_shape(tuple(node.shape))
        n_rows = int(shape[0]) if shape else 0
        coords = None
        if with_coords:
            check_coords_header(owner, path, node, n_features)  # before any read
            coords = read_bag_dataset(path, node)
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


class _Companions:
    """The bag's companion coords file, looked up lazily (first readable candidate, once)."""

    def __init__(self, path: Path, candidates: list[Path], n: int, *, with_coords: bool) -> None:
        self.path, self.candidates, self.n, self.with_coords = path, candidates, n, with_coords
        self._found: _Companion | None = None
        self._tried = False

    def get(self) -> _Companion | None:
        if not self._tried:
            self._tried = True
            for candidate in self.candidates:
                if candidate.is_file():
                    self._found = _read_companion(
                        candidate, with_coords=self.with_coords, owner=self.path, n_features=self.n
                    )
                    if self._found is not None:
                        break
        return self._found


@dataclass
class _OwnData:
    """What the features file itself holds: features, encoder name, its coords and attrs."""

    features: np.ndarray
    encoder: str | None
    coords: np.ndarray | None
    coords_attrs: dict[str, Any]


def _read_own(path: Path, max_patches: int) -> _OwnData:
    """The features file's datasets, every header checked before any data is read (a file
    declaring 10 million rows costs nothing to refuse)."""
    with open_bag_file(path) as handle:
        if "features" not in handle:
            names = ", ".join(sorted(handle.keys())) or "none"
            raise FeatureError(
                f"{path}: no 'features' dataset (datasets: {names}); this looks like a "
                "coords-only patches file, point runner_arguments.features_dir at the features "
                "folder (TRIDENT features_<encoder>/, CLAM feat_dir)"
            )
        features_node = bag_dataset(path, handle, "features")
        n = check_features_header(path, features_node, max_patches)
        coords_node = bag_dataset(path, handle, "coords") if "coords" in handle else None
        if coords_node is not None:
            check_coords_header(path, path, coords_node, n)
        features = check_finite_rows(path, read_bag_dataset(path, features_node, np.float32))
        coords = read_bag_dataset(path, coords_node) if coords_node is not None else None
        attrs = _read_attrs(coords_node.attrs) if coords_node is not None else {}
        return _OwnData(features, _encoder_name(path, handle), coords, attrs)


def _bag_coords(path: Path, own: _OwnData, companions: _Companions) -> tuple[np.ndarray, Path]:
    """(level-0 coords, the file they came from): the bag's own, else the companion's."""
    if own.coords is not None:
        return _check_coords(path, path, own.coords), path
    found = companions.get()
    if found is None or found.coords is None:
        looked = ", ".join(str(c) for c in companions.candidates)
        raise FeatureError(
            f"{path}: coords missing (no 'coords' dataset in the file, no companion coords "
            f"file at {looked}); set runner_arguments.patches_dir to the folder of "
            "<slide_id>.h5 coords files"
        )
    return _check_coords(path, found.path, found.coords), found.path


def _size_from_companion(
    path: Path, companions: _Companions, downsamples: Any
) -> tuple[tuple[int, str, str], int | None] | None:
    """Rule d: rules a-c on the companion coords file's attrs (and its overlap)."""
    found = companions.get()
    if found is None:
        return None
    hit = patch_size_from_attrs(found.attrs, downsamples)
    if hit is None:
        return None
    if found.n_rows != companions.n:
        log.warning(
            "%s: companion %s has %d coords but the bag has %d patches; it may come from "
            "another patching run",
            path,
            found.path,
            found.n_rows,
            companions.n,
        )
    resolved = (hit[0], "d", f"{hit[2]} (rule {hit[1]} on {found.path})")
    return resolved, _overlap_from_attrs(found.attrs)


def _size_from_spacing(path: Path, coords: np.ndarray) -> tuple[int, str, str]:
    """Rule f: the smallest coordinate step, with a loud warning (overlap is assumed none)."""
    step = patch_size_from_spacing(coords)
    if step is None or step <= 0:
        raise FeatureError(
            f"{path}: cannot determine the level-0 patch size (no size attrs, no companion "
            f"coords file, a single patch position); {_FIX_OVERRIDE}"
        )
    message = (
        f"{path}: level-0 patch size guessed as {step} px from coordinate spacing; if the "
        f"patches overlap the heatmap will be wrong, {_FIX_OVERRIDE}"
    )
    warnings.warn(message, PatchSizeGuessWarning, stacklevel=4)
    log.warning(message)
    return step, "f", f"smallest coordinate step {step} px (assumes no overlap)"


def _resolve_patch_size(
    path: Path,
    *,
    slide: Slide | None,
    own: _OwnData,
    coords: np.ndarray,
    companions: _Companions,
    override: int | None,
) -> tuple[tuple[int, str, str], int | None]:
    """((level-0 patch size, rule, detail), overlap) by the module docstring's rule order."""
    downsamples = slide.level_downsamples if slide is not None else None
    overlap_l0 = _overlap_from_attrs(own.coords_attrs)
    if override is not None:
        if override <= 0:
            raise FeatureError(
                f"{path}: runner_arguments.patch_size_level0 = {override} "
                "must be a positive number of level-0 pixels"
            )
        return (int(override), "override", "runner_arguments override"), overlap_l0
    resolved = patch_size_from_attrs(own.coords_attrs, downsamples)
    if resolved is not None:
        return resolved, overlap_l0
    from_companion = _size_from_companion(path, companions, downsamples)
    if from_companion is not None:
        return from_companion
    folder_hit = _folder_rule(path, slide)
    if folder_hit is not None:
        return (folder_hit[0], "e", folder_hit[1]), folder_hit[2]
    return _size_from_spacing(path, coords), overlap_l0


def load_bag(
    path: Path,
    *,
    slide: Slide | None = None,
    patch_size_level0_override: int | None = None,
    patches_dir: Path | None = None,
    max_patches: int = MAX_PATCHES,
) -> Bag:
    """Read and validate one features H5 (TRIDENT or CLAM) into a :class:`Bag`.

    Features are cast to float32 while read (TRIDENT may store fp16) and a (1, N, D) bag is
    squeezed. Coords come from the same file, else from a companion coords file (see module
    docstring). Every dataset's shape, dtype and count is checked before its data is read, and a
    bag of more than ``max_patches`` rows (``runner_arguments.max_patches``) is refused, so
    memory is bounded by configuration, not by what a file declares. ``slide`` is optional: it
    only helps rules c (level downsample) and e (MPP). Every problem is a :class:`FeatureError`
    whose one-line message names the file and the fix.
    """
    path = Path(path)
    own = _read_own(path, max_patches)
    n = own.features.shape[0]
    candidates = _companion_candidates(path, path.stem, patches_dir)
    companions = _Companions(path, candidates, n, with_coords=own.coords is None)
    coords, coords_path = _bag_coords(path, own, companions)
    (size, rule, detail), overlap_l0 = _resolve_patch_size(
        path,
        slide=slide,
        own=own,
        coords=coords,
        companions=companions,
        override=patch_size_level0_override,
    )
    log.info(
        "%s: %d patches x %d features (encoder %s); patch size %d px level 0 by rule %s (%s)",
        path,
        n,
        own.features.shape[1],
        own.encoder,
        size,
        rule,
        detail,
    )
    return Bag(
        features=own.features,
        coords_l0=coords,
        patch_size_l0=size,
        patch_size_rule=rule,
        encoder=own.encoder,
        path=path,
        patch_size_detail=detail,
        overlap_l0=overlap_l0,
        coords_path=coords_path,
    )
