"""A cohort-wide colour scale (``heatmap_arguments.score_scale: cohort``).

Every slide's scores become percentiles of *all* the run's bag scores, so one colour means one
score on every slide. The reference is written once per run to ``cohort_scores.h5``
(:func:`~clam_heat.rows.cohort_scores_path`): the merged bag scores, sorted, float32, chunked,
with a ``digest`` attribute over the slides and the identities of their blockmap files. It is
rewritten only when that digest changes, so the heatmap stage (which fingerprints the digest)
reruns only when a slide's scores, or the set of slides, changed.

Percentiles follow CLAM's rule (:func:`~clam_heat.heatmap.maths.percentile_of_scores`, SciPy's
``percentileofscore(kind='rank')``); for a score of the reference this is its average rank, as
:func:`~clam_heat.heatmap.maths.to_percentiles` within a slide. A slide's percentiles are
counted chunk by chunk against the sorted file (two binary searches per chunk), so no process
holds more than one chunk of the cohort next to the slide's own scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .h5io import read_scores
from .ledger import file_identity

__all__ = ["CHUNK", "cohort_digest", "cohort_percentiles", "read_digest", "write_cohort_scores"]

#: Scores per HDF5 chunk and per read (4 MiB of float32).
CHUNK = 1 << 20


def cohort_digest(blockmaps: Iterable[tuple[str, Path]]) -> str:
    """sha256 over the slide ids and their blockmap identities (content hashes when small)."""
    items = sorted((sid, file_identity(Path(p))) for sid, p in blockmaps)
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def read_digest(path: Path) -> str | None:
    """The digest of an existing cohort file, None when there is none (or it is unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return str(h5.attrs["digest"])
    except (OSError, KeyError):
        return None


def write_cohort_scores(path: Path, blockmaps: Iterable[tuple[str, Path]]) -> tuple[str, bool]:
    """Write the sorted cohort scores of ``blockmaps`` ((slide_id, blockmap H5) pairs) to
    ``path``, atomically, unless the file already holds these slides' scores.

    Returns (digest, whether the file was written).
    """
    import h5py

    entries = sorted((str(sid), Path(p)) for sid, p in blockmaps)
    digest = cohort_digest(entries)
    if read_digest(path) == digest:
        return digest, False
    parts = [read_scores(p)[0] for _, p in entries]
    merged = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.float32)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset(
            "scores",
            data=merged.astype(np.float32),
            chunks=(min(CHUNK, max(1, len(merged))),),
        )
        h5.attrs["digest"] = digest
        h5.attrs["n_slides"] = len(entries)
        h5.attrs["slide_ids"] = json.dumps([sid for sid, _ in entries])
    return digest, True


def cohort_percentiles(path: Path, scores: np.ndarray) -> np.ndarray:
    """CLAM-rule percentiles (0-100) of ``scores`` within the cohort file's sorted scores.

    >>> import tempfile
    >>> from clam_heat.h5io import write_scores_h5
    >>> d = Path(tempfile.mkdtemp())
    >>> a = write_scores_h5(d / "a.h5", np.array([0.1, 0.5]), np.array([[0, 0], [1, 0]]),
    ...                     coords_attrs={"patch_size_level0": 1})
    >>> b = write_scores_h5(d / "b.h5", np.array([0.5, 0.9]), np.array([[0, 0], [1, 0]]),
    ...                     coords_attrs={"patch_size_level0": 1})
    >>> _ = write_cohort_scores(d / "c.h5", [("a", a), ("b", b)])
    >>> cohort_percentiles(d / "c.h5", np.array([0.5, 0.1, 0.9, 1.0]))
    array([ 62.5,  25. , 100. , 100. ])
    """
    import h5py

    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    left = np.zeros(len(s), dtype=np.int64)
    right = np.zeros(len(s), dtype=np.int64)
    with h5py.File(path, "r") as h5:
        ref = h5["scores"]
        n = int(ref.shape[0])
        if n == 0:
            raise ValueError(f"{path}: the cohort has no scores (no slide finished infer)")
        for start in range(0, n, CHUNK):
            chunk = ref[start : start + CHUNK]
            left += np.searchsorted(chunk, s, side="left")
            right += np.searchsorted(chunk, s, side="right")
    return ((left + right + (left < right)) * 50.0) / n
