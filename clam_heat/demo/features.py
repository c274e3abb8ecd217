"""TRIDENT-format demo feature bags: seeded noise in a shared low-rank space, tumour patches
shifted along one direction, so an attention model can learn to find them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .output import output_path
from .shapes import _FEATURE_SPACE_SEED, DemoSlide

#: Shift of tumour features along the shared tumour direction (latent noise has unit std).
TUMOUR_SHIFT = 3.0


#: Demo features vary in this many latent directions (plus small isotropic noise), like real
#: encoder features, which live near a low-dimensional subspace.
FEATURE_RANK = 16


@dataclass(frozen=True)
class DemoBag:
    """A written TRIDENT features file and its per-patch truth.

    ``coords``: (N, 2) int64 level-0 top-left (x, y), row-major. ``is_tumour``: (N,) bool,
    patch centre inside tumour.
    """

    path: Path
    coords: np.ndarray
    is_tumour: np.ndarray


def level0_magnification(mpp: float) -> int:
    """TRIDENT's nominal scan magnification for a level-0 MPP (bucketed,
    docs/rules/formats.md#trident-magnification).

    >>> level0_magnification(0.5), level0_magnification(0.25), level0_magnification(0.2527)
    (20, 40, 40)
    """
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    raise ValueError(f"mpp {mpp} is too coarse for TRIDENT's magnification buckets (< 2.4)")


def _feature_space(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared by all demo bags of width ``dim``: latent basis (r, dim) with orthonormal rows and
    the unit tumour direction (dim,), both float64."""
    rng = np.random.default_rng(np.random.SeedSequence([_FEATURE_SPACE_SEED, dim]))
    rank = min(FEATURE_RANK, dim)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    direction = rng.standard_normal(dim)
    return basis, direction / np.linalg.norm(direction)


def _grid_truth(slide: DemoSlide, patch_size_level0: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-patch grid: coords (N, 2) int64 level-0 top-lefts with centre in tissue, row-major,
    and their tumour flags (N,) bool."""
    ps = patch_size_level0
    l0_x = np.arange(0, slide.width - ps + 1, ps, dtype=np.int64)
    l0_y = np.arange(0, slide.height - ps + 1, ps, dtype=np.int64)
    tissue, tumour = slide._shapes.fields(
        (l0_x + ps / 2)[None, :].astype(np.float64), (l0_y + ps / 2)[:, None].astype(np.float64)
    )
    iy, ix = np.nonzero(tissue > 0)  # row-major: y outer, x inner
    coords = np.stack([l0_x[ix], l0_y[iy]], axis=1).astype(np.int64).reshape(-1, 2)
    return coords, tumour[iy, ix] > 0


def make_demo_features(
    slide: DemoSlide,
    path: str | Path,
    *,
    patch_size_level0: int = 256,
    feature_dim: int = 64,
    seed: int = 0,
    target_magnification: int = 20,
) -> DemoBag:
    """Write a TRIDENT-format features H5 for ``slide`` (docs/rules/formats.md#trident-features).

    Patches form a row-major grid of ``patch_size_level0`` squares whose centre lies in tissue.
    Features are seeded Gaussian noise in a shared :data:`FEATURE_RANK`-dimensional subspace plus
    small isotropic noise; patches whose centre is in tumour are shifted by :data:`TUMOUR_SHIFT`
    along one shared direction, so an attention model can learn to find them.
    """
    import h5py

    path = Path(path)
    if patch_size_level0 < 1 or feature_dim < 1:
        raise ValueError("patch_size_level0 and feature_dim must be >= 1")
    mag0 = level0_magnification(slide.mpp)
    coords, is_tumour = _grid_truth(slide, patch_size_level0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFEA7]))
    basis, direction = _feature_space(feature_dim)
    feats = rng.standard_normal((len(coords), len(basis))) @ basis
    feats += 0.3 * rng.standard_normal((len(coords), feature_dim))
    feats += TUMOUR_SHIFT * is_tumour[:, None] * direction[None, :]
    feats = feats.astype(np.float32)

    attrs = {
        "patch_size": int(round(patch_size_level0 * target_magnification / mag0)),
        "patch_size_level0": int(patch_size_level0),
        "level0_magnification": mag0,
        "target_magnification": target_magnification,
        "overlap": 0,
        "name": slide.name,
        "savetodir": str(path.parent),
        "level0_width": int(slide.width),
        "level0_height": int(slide.height),
    }
    with output_path(path) as tmp, h5py.File(tmp, "w") as h5:
        dset = h5.create_dataset("features", data=feats)
        dset.attrs.update({"name": slide.name, "savetodir": str(path.parent), "encoder": "demo"})
        cset = h5.create_dataset("coords", data=coords, maxshape=(None, 2))
        cset.attrs.update(attrs)
    return DemoBag(path, coords, is_tumour)


def _read_features(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as h5:
        return np.asarray(h5["features"][:], dtype=np.float32)


def _read_bag(slide: DemoSlide, path: Path) -> DemoBag:
    """Rebuild a :class:`DemoBag` from its H5 coords and the slide's analytic truth."""
    import h5py

    with h5py.File(path, "r") as h5:
        coords = np.asarray(h5["coords"][:], dtype=np.int64).reshape(-1, 2)
        ps = int(h5["coords"].attrs["patch_size_level0"])
    return DemoBag(path, coords, slide.truth_at(coords + ps / 2)[1])
