"""Top-patch sampling (CLAM's ``sample_rois``): pick patches by attention, save them.

See docs/rules/heatmaps.md#sampling.

Selection is pure (:func:`sample_indices`); saving reads each chosen patch from the slide and
writes it as a PNG with CLAM's file name (:func:`save_sampled_patches`).

Scores are first turned into CLAM's rank percentiles (0-100], so ``range_sample`` bounds are on
that 0-100 scale, exactly as CLAM compares them: ``score_start: 0, score_end: 1`` (CLAM's
fallbacks) keeps the bottom ~1 % of patches, and the top half is ``score_start: 50,
score_end: 100``. A range that matches nothing is a warning for the row, not a crash (CLAM
returns a -1 sentinel and then fails).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .atomic import write_bytes_atomic
from .errors import OutputError
from .heatmap.maths import to_percentiles
from .threads import helper_threads

if TYPE_CHECKING:
    from .config import SampleSpec
    from .slide import Slide

__all__ = [
    "MANIFEST_COLUMNS",
    "SampleMode",
    "export_threshold",
    "threshold_indices",
    "sample_indices",
    "sample_patches",
    "sampled_patch_name",
    "save_sampled_patches",
]

SampleMode = Literal["topk", "reverse_topk", "range_sample", "threshold"]
MODES: tuple[str, ...] = ("topk", "reverse_topk", "range_sample")


def sample_indices(
    scores: np.ndarray,
    *,
    mode: str,
    k: int,
    seed: int = 1,
    score_start: float = 0.0,
    score_end: float = 1.0,
) -> tuple[np.ndarray, str | None]:
    """Indices of the patches a CLAM sampler picks, and a warning when it picks none.

    - ``topk``: the k highest percentiles, highest first.
    - ``reverse_topk``: the k lowest, lowest first.
    - ``range_sample``: ``min(k, n)`` patches drawn without replacement from those with
      ``score_start <= percentile <= score_end`` (0-100 scale, inclusive), using
      ``np.random.RandomState(seed).choice`` -- the same draw as CLAM's ``np.random.seed(seed)``
      then ``np.random.choice``, but without touching NumPy's global random state.

    Ties are ordered by patch index (lower first) in both top-k modes; CLAM leaves tie order
    to an unstable sort.

    Parameters
    ----------
    scores : (N,) or (N, 1) ndarray of float
        Raw attention scores (converted to rank percentiles here, as CLAM does).
    mode : "topk", "reverse_topk" or "range_sample"
    k : int, >= 1

    Returns
    -------
    indices : (m,) int64 ndarray, m <= k
        Into ``scores``, in CLAM's rank order.
    warning : str or None
        Set when nothing matched (empty ``indices``).

    Examples
    --------
    >>> s = np.array([0.1, 0.9, 0.5, 0.7])
    >>> sample_indices(s, mode="topk", k=2)
    (array([1, 3]), None)
    >>> sample_indices(s, mode="reverse_topk", k=3)
    (array([0, 2, 3]), None)
    >>> sample_indices(s, mode="range_sample", k=5, score_start=50, score_end=75)
    (array([2, 3]), None)
    >>> sample_indices(s, mode="range_sample", k=5, score_start=0, score_end=1)[1]
    'range_sample: no patch has a percentile in [0, 1] (0-100 scale; top half: 50-100)'
    """
    flat = np.asarray(scores).reshape(-1)
    pct = to_percentiles(flat) if len(flat) else flat
    return _pick(pct, mode=mode, k=k, seed=seed, score_start=score_start, score_end=score_end)


def _pick(
    pct: np.ndarray, *, mode: str, k: int, seed: int, score_start: float, score_end: float
) -> tuple[np.ndarray, str | None]:
    """:func:`sample_indices` on percentiles already computed (the saver prints them too)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if k < 1:
        raise ValueError(f"k = {k}: must be >= 1")
    if len(pct) == 0:
        return np.zeros(0, dtype=np.int64), f"{mode}: no patches to sample from"
    if mode == "topk":
        return np.argsort(-pct, kind="stable")[:k].astype(np.int64), None
    if mode == "reverse_topk":
        return np.argsort(pct, kind="stable")[:k].astype(np.int64), None
    candidates = np.flatnonzero((pct >= score_start) & (pct <= score_end))
    if len(candidates) == 0:
        return np.zeros(0, dtype=np.int64), (
            f"range_sample: no patch has a percentile in [{_num(score_start)}, "
            f"{_num(score_end)}] (0-100 scale; top half: 50-100)"
        )
    rng = np.random.RandomState(seed)
    picked = rng.choice(candidates, min(k, len(candidates)), replace=False)
    return np.asarray(picked, dtype=np.int64), None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def sampled_patch_name(rank: int, slide_id: str, l0_xy: Sequence[int], score: float) -> str:
    """CLAM's sampled-patch file name ``<rank>_<slide_id>_x_<x>_y_<y>_a_<score:.3f>.png``.

    >>> sampled_patch_name(0, "s1", (512, 256), 99.5)
    '0_s1_x_512_y_256_a_99.500.png'
    """
    return f"{rank}_{slide_id}_x_{int(l0_xy[0])}_y_{int(l0_xy[1])}_a_{score:.3f}.png"


#: zlib level of the sampled-patch PNGs. Lossless either way; on H&E texture level 1 encodes a
#: 256 px patch ~6x faster than level 6 (3.5 vs 23 ms) for files ~13% larger, and encoding was
#: most of the sampling stage.
PNG_LEVEL = 1


def save_sampled_patches(
    slide: Slide,
    coords: np.ndarray,
    scores: np.ndarray,
    folder: str | os.PathLike[str],
    slide_id: str,
    patch_level: int,
    patch_size: int,
) -> list[Path]:
    """Read each sampled patch and save it as a PNG named by :func:`sampled_patch_name`.

    Parameters
    ----------
    coords : (m, 2) int ndarray
        Level-0 top-left (x, y) of the sampled patches, in rank order.
    scores : (m,) float ndarray
        The score printed in each name (CLAM prints the percentile).
    folder : path
        Created if missing (``.../sampled_patches/label_<l>_pred_<p>/<sampler name>``).
    patch_level, patch_size : int
        Patches are ``patch_size`` x ``patch_size`` pixels read at ``patch_level`` (CLAM ignores
        ``custom_downsample`` here).

    Returns
    -------
    list of Path
        The files written (atomically: temp file beside each, then ``os.replace``; not yet
        fsync'd: the caller syncs them together, as the ledger protocol does), in rank
        order; patches are read and encoded on :func:`~clam_heat.threads.helper_threads`
        threads.
    """
    import imagecodecs

    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(values) != len(xy):
        raise ValueError(f"{len(values)} scores for {len(xy)} coords; they must pair up")
    out_dir = Path(folder)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot create folder ({err.strerror or err})") from None
    size = (int(patch_size), int(patch_size))

    def save(rank: int, l0_xy: list[int], score: float) -> Path:
        rgb = slide.read_region((l0_xy[0], l0_xy[1]), patch_level, size)
        path = out_dir / sampled_patch_name(rank, slide_id, l0_xy, score)
        png = bytes(imagecodecs.png_encode(rgb, level=PNG_LEVEL))
        # not synced one by one (7-14 ms each): the stage syncs its outputs in one batch
        return write_bytes_atomic(path, png, durable=False)

    jobs = list(enumerate(zip(xy.tolist(), values.tolist(), strict=True)))
    threads = helper_threads()
    if threads == 1 or len(jobs) < 2:
        return [save(rank, l0_xy, score) for rank, (l0_xy, score) in jobs]
    # slide reads and PNG encoding release the GIL: a second thread nearly halves the stage
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda job: save(job[0], *job[1]), jobs))


def _patch_side(slide: Slide, patch_level: int, patch_size_level0: int) -> int:
    """The patch side in ``patch_level`` pixels: the level-0 side over that level's downsample,
    rounded (at least 1); an unknown level is a :class:`~clam_heat.errors.SlideError`."""
    slide.check_level(patch_level)
    return max(1, int(round(patch_size_level0 / slide.level_downsamples[patch_level][0])))


def sample_patches(
    slide: Slide,
    coords: np.ndarray,
    scores: np.ndarray,
    *,
    spec: SampleSpec,
    slide_id: str,
    folder: str | os.PathLike[str],
    patch_level: int,
    patch_size_level0: int,
) -> tuple[list[Path], str | None]:
    """Run one configured sampler (a ``sample_arguments.samples`` entry) and save its patches.

    Parameters
    ----------
    spec : SampleSpec
        CLAM's sampler keys (``mode``, ``k``, ``seed``, ``score_start``, ``score_end``).
    slide_id : str
        Printed in each file name.
    folder : path
        The folder the sampler writes into (created when something is written).
    patch_level : int
        The slide level patches are read at.
    patch_size_level0 : int
        The patch side at level 0 (as in the blockmap's ``coords`` attributes); the side read
        at ``patch_level`` is this over the level's downsample, rounded. Names carry the
        percentile score, as CLAM's do.

    Returns
    -------
    (paths written, warning or None)
    """
    flat = np.asarray(scores).reshape(-1)
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(flat) != len(xy):
        raise ValueError(f"{len(flat)} scores for {len(xy)} coords; they must pair up")
    pct = to_percentiles(flat) if len(flat) else flat
    idx, warning = _pick(
        pct,
        mode=spec.mode,
        k=int(spec.k),
        seed=int(spec.seed),
        score_start=float(spec.score_start),
        score_end=float(spec.score_end),
    )
    if len(idx) == 0:
        return [], warning
    side = _patch_side(slide, patch_level, patch_size_level0)
    paths = save_sampled_patches(slide, xy[idx], pct[idx], folder, slide_id, patch_level, side)
    return paths, warning


# --------------------------------------------------------------------------------------------
# threshold export: every patch at or above a score, with a manifest and a QuPath GeoJSON
# --------------------------------------------------------------------------------------------

#: Columns of a threshold export's ``manifest.csv``, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "slide_id",
    "x",
    "y",
    "level",
    "patch_size",
    "score",
    "percentile",
    "path",
)


def threshold_indices(scores: np.ndarray, threshold: float, score: str) -> np.ndarray:
    """Indices of the patches scoring at or above ``threshold``, highest first (ties by index).

    ``score="percentile"`` compares CLAM's rank percentile on a 0-1 scale (0.9 keeps the top
    10 %); ``"raw"`` compares the raw attention score.

    >>> s = np.array([0.1, 0.9, 0.5, 0.7])
    >>> threshold_indices(s, 0.75, "percentile")
    array([1, 3])
    >>> threshold_indices(s, 0.5, "raw")
    array([1, 3, 2])
    """
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    if score not in ("percentile", "raw"):
        raise ValueError(f"score {score!r} is not percentile or raw")
    values = to_percentiles(flat) / 100 if score == "percentile" else flat
    keep = np.flatnonzero(values >= threshold)
    return keep[np.argsort(-flat[keep], kind="stable")].astype(np.int64)


def _patch_geojson(xy: np.ndarray, scores: np.ndarray, pct: np.ndarray, side_l0: int) -> str:
    """QuPath GeoJSON: one level-0 square annotation per exported patch, with its scores."""
    import json

    features = []
    for (x, y), s, p in zip(xy.tolist(), scores.tolist(), pct.tolist(), strict=True):
        ring = [[x, y], [x + side_l0, y], [x + side_l0, y + side_l0], [x, y + side_l0], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"x_{x}_y_{y}",
                    "measurements": {"attention": s, "percentile": p},
                },
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features}) + "\n"


def _write_patches_h5(
    slide: Slide, xy: np.ndarray, level: int, size: int, path: Path, attrs: dict[str, Any]
) -> None:
    """One HDF5 of patches, ``imgs`` (M, size, size, 3) uint8 chunked per patch, filled patch by
    patch (never all patches in memory), then moved into place."""
    import h5py

    from .atomic import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        imgs = h5.create_dataset(
            "imgs",
            shape=(len(xy), size, size, 3),
            dtype=np.uint8,
            chunks=(1, size, size, 3) if len(xy) else None,
        )
        for i, (x, y) in enumerate(xy.tolist()):
            imgs[i] = slide.read_region((x, y), level, (size, size))
        h5.create_dataset("coords", data=np.asarray(xy, dtype=np.int64).reshape(-1, 2))
        for key, value in attrs.items():
            h5.attrs[key] = value


def export_threshold(
    slide: Slide,
    coords: np.ndarray,
    scores: np.ndarray,
    *,
    spec: SampleSpec,
    slide_id: str,
    folder: str | os.PathLike[str],
    patch_level: int,
    patch_size_level0: int,
    file_names: dict[str, str],
) -> tuple[list[Path], str | None]:
    """Export every patch at or above ``spec.threshold`` (``spec.score``: percentile or raw).

    The other keywords are :func:`sample_patches`'. Writes into ``folder`` (one per slide and
    sampler): the patches (``spec.format`` png: one
    CLAM-named PNG each; h5: one HDF5), ``manifest.csv`` (:data:`MANIFEST_COLUMNS`; ``path``
    relative to ``folder``, ``<h5 name>#<row>`` for HDF5; ``percentile`` on a 0-1 scale) and a
    QuPath GeoJSON of the exported squares. ``file_names`` maps ``h5``, ``manifest`` and
    ``geojson`` to the file names (from :mod:`clam_heat.rows`).

    Returns
    -------
    (paths written, warning or None)
    """
    import csv
    import io

    from .atomic import write_text_atomic

    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(flat) != len(xy):
        raise ValueError(f"{len(flat)} scores for {len(xy)} coords; they must pair up")
    idx = threshold_indices(flat, float(spec.threshold), spec.score)
    warning = None
    if len(idx) == 0:
        warning = f"threshold: no patch has a {spec.score} score >= {_num(spec.threshold)}"
    patch_size = _patch_side(slide, patch_level, patch_size_level0)
    pct = to_percentiles(flat)[idx] / 100 if len(flat) else np.zeros(0)
    out_dir = Path(folder)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot create folder ({err.strerror or err})") from None
    written: list[Path] = []
    if spec.format == "h5":
        h5_path = out_dir / file_names["h5"]
        attrs = {"slide_id": slide_id, "level": patch_level, "patch_size": patch_size}
        _write_patches_h5(slide, xy[idx], patch_level, patch_size, h5_path, attrs)
        written.append(h5_path)
        rel = [f"{h5_path.name}#{i}" for i in range(len(idx))]
    else:
        written += save_sampled_patches(
            slide, xy[idx], pct * 100, out_dir, slide_id, patch_level, patch_size
        )
        rel = [p.name for p in written]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for (x, y), s, p, path in zip(xy[idx].tolist(), flat[idx], pct, rel, strict=True):
        row = [slide_id, x, y, patch_level, patch_size, repr(float(s)), repr(float(p)), path]
        writer.writerow(row)
    written.append(write_text_atomic(out_dir / file_names["manifest"], text.getvalue()))
    geojson = _patch_geojson(xy[idx], flat[idx], pct, int(patch_size_level0))
    written.append(write_text_atomic(out_dir / file_names["geojson"], geojson))
    return written, warning
