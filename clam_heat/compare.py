"""Compare two runs over the same slides (``clam-heat compare CONFIG_A CONFIG_B --out DIR``).

Two checkpoints, folds, encoders or models give two attention maps per slide. Patches are
matched on their level-0 top-left corners, so runs with different grids are compared on the
patches they share (the count is reported, with the patches only one run has). Per slide the
comparison gives rank agreement (Spearman), linear agreement (Pearson), the overlap of the two
top-k sets (Jaccard) and whether the predictions agree.

Outputs (all written atomically):

* ``DIR/comparison.csv``: one row per slide both runs finished.
* ``DIR/<slide_id>_compare.png``: A | B | A - B, the difference of percentiles on a diverging
  colormap (red: A ranks the patch higher, blue: B does), over the slide's thumbnail.
* ``DIR/summary.json``: cohort means and the slides that disagree most.

Where a run keeps its outputs is looked up in one place, :func:`run_outputs`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import write_bytes_atomic, write_text_atomic
from .errors import ClamHeatError
from .h5io import read_scores
from .heatmap import apply_colormap, to_percentiles

__all__ = [
    "CompareSummary",
    "RunOutput",
    "SlideComparison",
    "compare_runs",
    "match_coords",
    "pearson",
    "run_outputs",
    "spearman",
    "topk_indices",
    "topk_jaccard",
]

#: Longest side of one panel of ``<slide_id>_compare.png`` (vis pixels).
PANEL_SIDE = 512
#: The thumbnail is skipped (white canvas) when the level it needs has more pixels than this.
THUMBNAIL_MAX_PIXELS = 16_000_000
#: Colormaps of the A/B panels and of the difference panel.
CMAP = "jet"
DIFF_CMAP = "RdBu_r"
#: How many of the most-disagreeing slides ``summary.json`` lists.
N_WORST = 5


class CompareError(ClamHeatError):
    """Two runs that cannot be compared (nothing finished, nothing shared)."""


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def match_coords(coords_a: np.ndarray, coords_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the patches whose level-0 (x, y) occur in both runs, in A's coordinate order.

    Parameters
    ----------
    coords_a, coords_b : (N, 2), (M, 2) int ndarray
        Level-0 top-left corners; duplicates within one run match their first occurrence.

    Returns
    -------
    idx_a, idx_b : (K,) int64 ndarray
        ``coords_a[idx_a] == coords_b[idx_b]`` row for row.

    Examples
    --------
    >>> a = np.array([[0, 0], [256, 0], [0, 256]])
    >>> b = np.array([[0, 256], [512, 0], [0, 0]])
    >>> match_coords(a, b)
    (array([0, 2]), array([2, 0]))
    >>> match_coords(a, np.zeros((0, 2), int))
    (array([], dtype=int64), array([], dtype=int64))
    """
    a = np.asarray(coords_a, dtype=np.int64).reshape(-1, 2)
    b = np.asarray(coords_b, dtype=np.int64).reshape(-1, 2)
    if len(a) == 0 or len(b) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    lo = np.minimum(a.min(axis=0), b.min(axis=0))
    span = int(max(a[:, 1].max(), b[:, 1].max()) - lo[1] + 1)
    key_a = (a[:, 0] - lo[0]) * span + (a[:, 1] - lo[1])
    key_b = (b[:, 0] - lo[0]) * span + (b[:, 1] - lo[1])
    _, idx_a, idx_b = np.intersect1d(key_a, key_b, return_indices=True)
    order = np.argsort(idx_a, kind="stable")
    return idx_a[order].astype(np.int64), idx_b[order].astype(np.int64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when fewer than two values or either side is constant.

    >>> round(pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5])), 4)
    0.9979
    >>> math.isnan(pearson(np.array([1.0, 1.0]), np.array([1.0, 2.0])))
    True
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"pearson needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks, ties shared as SciPy does).

    >>> spearman(np.array([0.1, 0.4, 0.2]), np.array([10.0, 40.0, 30.0]))
    1.0
    >>> spearman(np.array([0.1, 0.4, 0.2]), np.array([3.0, 1.0, 2.0]))
    -1.0
    """
    x, y = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    return pearson(to_percentiles(x), to_percentiles(y))


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest scores' indices (ties broken by the lower index), k clipped to [0, N].

    >>> topk_indices(np.array([0.2, 0.9, 0.5, 0.9]), 2).tolist()
    [1, 3]
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = max(0, min(int(k), len(s)))
    return np.argsort(-s, kind="stable")[:k]


def topk_jaccard(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k(A) ∩ top-k(B)| / |top-k(A) ∪ top-k(B)| over matched patches; NaN when k is 0.

    >>> topk_jaccard(np.array([4, 3, 2, 1]), np.array([3, 4, 1, 2]), 2)
    1.0
    >>> topk_jaccard(np.array([4, 3, 2, 1]), np.array([4, 1, 3, 2]), 2)
    0.3333333333333333
    """
    ia, ib = set(topk_indices(a, k).tolist()), set(topk_indices(b, k).tolist())
    union = ia | ib
    return len(ia & ib) / len(union) if union else float("nan")


def default_topk(n: int, topk: int | None) -> int:
    """``topk`` if given, else 10 % of the shared patches (at least 1, at most n).

    >>> default_topk(95, None), default_topk(95, 5), default_topk(3, 10), default_topk(0, None)
    (10, 5, 3, 0)
    """
    k = math.ceil(0.1 * n) if topk is None else int(topk)
    return max(0, min(k, n)) if n else 0


def percentile_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-patch difference of percentiles, (pct(A) - pct(B)) / 100, on [-1, 1].

    >>> percentile_difference(np.array([1.0, 2.0]), np.array([2.0, 1.0])).tolist()
    [-0.5, 0.5]
    """
    return (to_percentiles(a) - to_percentiles(b)) / 100.0


def patch_canvas(
    l0_coords: np.ndarray,
    values: np.ndarray,
    patch_size_l0: int,
    downsample: float,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Patch values averaged where squares overlap, on an (h, w) canvas at ``downsample``.

    A patch covers vis pixels ``floor(x / d) .. ceil((x + size) / d)`` (so every patch shows).

    Returns
    -------
    mean : (h, w) float64 ndarray (0 where no patch)
    covered : (h, w) bool ndarray

    Examples
    --------
    >>> mean, cov = patch_canvas(np.array([[0, 0], [4, 0]]), np.array([1.0, 3.0]), 8, 4.0, (2, 4))
    >>> mean.tolist(), cov.sum()
    ([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]], np.int64(6))
    """
    h, w = int(shape[0]), int(shape[1])
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.int32)
    xy = np.asarray(l0_coords, dtype=np.float64).reshape(-1, 2)
    lo = np.floor(xy / downsample).astype(np.int64)
    hi = np.ceil((xy + patch_size_l0) / downsample).astype(np.int64)
    for (x0, y0), (x1, y1), v in zip(lo, hi, np.asarray(values, np.float64), strict=True):
        total[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] += v
        count[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] += 1
    covered = count > 0
    mean = np.divide(total, count, out=np.zeros_like(total), where=covered)
    return mean, covered


def overlay(
    base: np.ndarray, values01: np.ndarray, covered: np.ndarray, cmap: str, alpha: float = 0.6
) -> np.ndarray:
    """``base`` with ``values01`` coloured by ``cmap`` and blended at ``alpha`` where covered.

    >>> base = np.full((1, 2, 3), 255, np.uint8)
    >>> overlay(base, np.array([[0.0, 1.0]]), np.array([[True, False]]), "gray", 1.0).tolist()
    [[[0, 0, 0], [255, 255, 255]]]
    """
    colour = apply_colormap(values01, cmap).astype(np.float32)
    out = base.astype(np.float32)
    mixed = alpha * colour + (1.0 - alpha) * out
    out[covered] = mixed[covered]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Run lookup (the one place that knows where a run keeps its outputs)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutput:
    """One slide's finished inference in a run."""

    slide_id: str
    slide_path: Path
    blockmap: Path
    pred: str  #: the predicted class's name in this run
    #: the predicted class index (None in ledgers that did not record it): what is compared
    pred_index: int | None = None


def run_outputs(config_path: str | Path, method: str = "attention") -> dict[str, RunOutput]:
    """Slides whose ``infer`` stage is done in the run of ``config_path``, by slide id, with
    the map of ``method`` (``attention``: the blockmap; else ``<id>_<method>_blockmap.h5``).

    Built on the run's own row contexts (:mod:`clam_heat.rows`: same process list, same
    folders), so a run whose outputs were moved with their config still resolves; the
    prediction is the ledger's.
    """
    from .config import load_config
    from .ledger import Ledger
    from .process_list import read_process_list
    from .rows import blockmap_h5_path, build_contexts, method_scores_h5_path

    cfg = load_config(config_path)
    if not cfg.process_list_path.is_file():
        raise CompareError(
            f"{config_path}: no process list at {cfg.process_list_path}; "
            "run `clam-heat run` on this config first"
        )
    found: dict[str, RunOutput] = {}
    for ctx in build_contexts(cfg, read_process_list(cfg.process_list_path)):
        record = Ledger.load(ctx.ledger_path).record("infer") or {}
        blockmap = (
            blockmap_h5_path(ctx) if method == "attention" else method_scores_h5_path(ctx, method)
        )
        if record.get("state") != "done" or not blockmap.is_file():
            continue
        result = record.get("result", {})
        names = result.get("top_names") or [str(result.get("pred", ""))]
        index = result.get("pred")
        found[ctx.slide_id] = RunOutput(
            ctx.slide_id,
            ctx.slide_path,
            blockmap,
            str(names[0]),
            int(index) if isinstance(index, int) else None,
        )
    return found


def class_names(config_path: str | Path) -> list[str]:
    """The run's class names in index order (its ``label_dict`` inverted; an index without a
    name is its own name, as the run writes it)."""
    from .config import load_config

    cfg = load_config(config_path)
    names = cfg.data_arguments.label_names()
    return [names.get(i, str(i)) for i in range(cfg.exp_arguments.n_classes)]


def naming_note(names_a: list[str], names_b: list[str]) -> str | None:
    """One line when the two runs name the same class index differently, else None.

    >>> naming_note(["normal", "tumour"], ["normal", "1"])
    "class names differ (compared by index): 1 is 'tumour' in A, '1' in B"
    >>> naming_note(["a", "b"], ["a", "b"]) is None
    True
    """
    pairs = [
        f"{i} is {a!r} in A, {b!r} in B"
        for i, (a, b) in enumerate(zip(names_a, names_b, strict=False))
        if a != b
    ]
    if len(names_a) != len(names_b):
        pairs.append(f"A has {len(names_a)} classes, B {len(names_b)}")
    return "class names differ (compared by index): " + "; ".join(pairs) if pairs else None


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


@dataclass
class SlideComparison:
    """One row of ``comparison.csv``."""

    slide_id: str
    n_patches: int
    spearman: float
    pearson: float
    topk_jaccard: float
    pred_a: str
    pred_b: str
    agree: bool
    n_only_a: int
    n_only_b: int
    topk: int
    png: str = ""


@dataclass
class CompareSummary:
    """What :func:`compare_runs` wrote and found."""

    out_dir: Path
    csv_path: Path
    summary_path: Path
    rows: list[SlideComparison] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    most_disagreeing: list[str] = field(default_factory=list)
    #: one line when the runs name the same class index differently (see :func:`naming_note`)
    class_note: str | None = None


def _same_class(a: RunOutput, b: RunOutput) -> bool:
    """Predictions agree on the class index; names only when an index is unknown."""
    if a.pred_index is not None and b.pred_index is not None:
        return a.pred_index == b.pred_index
    return a.pred == b.pred


def compare_slide(
    a: RunOutput, b: RunOutput, *, topk: int | None = None
) -> tuple[SlideComparison, dict[str, Any]]:
    """Metrics of one slide, plus the matched arrays the picture needs."""
    scores_a, coords_a, size_a = read_scores(a.blockmap)
    scores_b, coords_b, size_b = read_scores(b.blockmap)
    idx_a, idx_b = match_coords(coords_a, coords_b)
    sa, sb = scores_a[idx_a], scores_b[idx_b]
    k = default_topk(len(idx_a), topk)
    row = SlideComparison(
        slide_id=a.slide_id,
        n_patches=len(idx_a),
        spearman=spearman(sa, sb) if len(idx_a) else float("nan"),
        pearson=pearson(sa, sb),
        topk_jaccard=topk_jaccard(sa, sb, k),
        pred_a=a.pred,
        pred_b=b.pred,
        agree=_same_class(a, b),
        n_only_a=len(coords_a) - len(idx_a),
        n_only_b=len(coords_b) - len(idx_b),
        topk=k,
    )
    arrays = {"coords": coords_a[idx_a], "a": sa, "b": sb, "size": min(size_a, size_b)}
    return row, arrays


def _thumbnail(slide_path: Path, panel_side: int) -> tuple[np.ndarray, float]:
    """The slide at ``panel_side`` px on its longest side, and its level-0 downsample; a white
    canvas of the right shape when the slide cannot be read or its level would be too large."""
    from .slide import open_slide

    with open_slide(slide_path) as slide:
        l0_w, l0_h = slide.dimensions
        downsample = max(l0_w, l0_h) / panel_side
        shape = (max(1, round(l0_h / downsample)), max(1, round(l0_w / downsample)))
        level = slide.best_level_for_downsample(downsample)
        w, h = slide.level_dimensions[level]
        if w * h > THUMBNAIL_MAX_PIXELS:
            return np.full((*shape, 3), 255, np.uint8), downsample
        image = slide.read_region((0, 0), level, (w, h))
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA), downsample


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    """A white title strip above ``panel``."""
    strip = np.full((28, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def comparison_image(
    slide_path: Path, arrays: dict[str, Any], *, panel_side: int = PANEL_SIDE
) -> np.ndarray:
    """A | B | A - B side by side (RGB uint8), from the matched scores."""
    try:
        base, downsample = _thumbnail(slide_path, panel_side)
    except (ClamHeatError, OSError):
        coords = arrays["coords"]
        extent = (coords.max(axis=0) + arrays["size"]) if len(coords) else np.array([1, 1])
        downsample = float(max(extent)) / panel_side
        shape = (max(1, round(extent[1] / downsample)), max(1, round(extent[0] / downsample)))
        base = np.full((*shape, 3), 255, np.uint8)
    shape = base.shape[:2]
    coords, size = arrays["coords"], arrays["size"]
    pa = to_percentiles(arrays["a"]) / 100.0
    pb = to_percentiles(arrays["b"]) / 100.0
    diff = (pa - pb + 1.0) / 2.0  # -1..1 -> 0..1, 0.5 (no difference) is the colormap's centre
    panels = []
    for title, values, cmap in (
        ("A", pa, CMAP),
        ("B", pb, CMAP),
        ("A - B (percentile)", diff, DIFF_CMAP),
    ):
        mean, covered = patch_canvas(coords, values, size, downsample, shape)
        panels.append(_label(overlay(base, mean, covered, cmap), title))
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise CompareError("OpenCV could not encode the comparison PNG")
    return buf.tobytes()


def _number(value: float) -> float | None:
    """JSON-safe float (NaN -> null), rounded for stable text."""
    return None if not math.isfinite(value) else round(float(value), 6)


def _csv_text(rows: list[SlideComparison]) -> str:
    import pandas as pd

    columns = list(SlideComparison.__dataclass_fields__)
    columns.remove("png")
    frame = pd.DataFrame([asdict(r) for r in rows], columns=columns)
    return frame.to_csv(index=False, float_format="%.6f", lineterminator="\n")


def disagreement_order(rows: list[SlideComparison]) -> list[SlideComparison]:
    """Most disagreeing first: different predictions, then lowest Spearman (NaN last).

    >>> rows = [SlideComparison("a", 9, 0.9, 0.9, 1.0, "x", "x", True, 0, 0, 1),
    ...         SlideComparison("b", 9, 0.2, 0.2, 0.5, "x", "x", True, 0, 0, 1),
    ...         SlideComparison("c", 9, 0.95, 0.9, 1.0, "x", "y", False, 0, 0, 1)]
    >>> [r.slide_id for r in disagreement_order(rows)]
    ['c', 'b', 'a']
    """

    def key(row: SlideComparison) -> tuple[bool, float]:
        rho = row.spearman if math.isfinite(row.spearman) else math.inf
        return row.agree, rho

    return sorted(rows, key=key)


def compare_runs(
    config_a: str | Path,
    config_b: str | Path,
    out_dir: str | Path,
    *,
    topk: int | None = None,
    pictures: bool = True,
    panel_side: int = PANEL_SIDE,
    methods: tuple[str, str] = ("attention", "attention"),
) -> CompareSummary:
    """Compare the finished slides of two runs; writes the CSV, pictures and summary JSON.

    ``methods``: the map read from run A and from run B (docs/explanations.md): give one config
    twice and two methods to compare two methods of one run.

    ``topk`` patches per slide enter the Jaccard overlap (default 10 % of the shared patches).
    Raises :class:`CompareError` when no slide finished in both runs.
    """
    out = Path(out_dir)
    runs_a, runs_b = run_outputs(config_a, methods[0]), run_outputs(config_b, methods[1])
    shared = [sid for sid in runs_a if sid in runs_b]
    if not shared:
        raise CompareError(
            f"no slide finished in both runs ({len(runs_a)} in {config_a}, {len(runs_b)} in "
            f"{config_b}); run both configs over the same slides first"
        )
    summary = CompareSummary(
        out_dir=out,
        csv_path=out / "comparison.csv",
        summary_path=out / "summary.json",
        only_in_a=sorted(set(runs_a) - set(runs_b)),
        only_in_b=sorted(set(runs_b) - set(runs_a)),
    )
    names_a, names_b = class_names(config_a), class_names(config_b)
    summary.class_note = naming_note(names_a, names_b)
    for sid in shared:
        row, arrays = compare_slide(runs_a[sid], runs_b[sid], topk=topk)
        if pictures and row.n_patches:
            png = out / f"{sid}_compare.png"
            image = comparison_image(runs_a[sid].slide_path, arrays, panel_side=panel_side)
            write_bytes_atomic(png, _png_bytes(image))
            row.png = png.name
        summary.rows.append(row)
    write_text_atomic(summary.csv_path, _csv_text(summary.rows))

    for name in ("spearman", "pearson", "topk_jaccard"):
        values = [getattr(r, name) for r in summary.rows if math.isfinite(getattr(r, name))]
        summary.means[name] = float(np.mean(values)) if values else float("nan")
    summary.means["agree"] = float(np.mean([r.agree for r in summary.rows]))
    worst = disagreement_order(summary.rows)[:N_WORST]
    summary.most_disagreeing = [r.slide_id for r in worst]
    payload = {
        "config_a": str(Path(config_a).resolve()),
        "config_b": str(Path(config_b).resolve()),
        "n_slides": len(summary.rows),
        "only_in_a": summary.only_in_a,
        "only_in_b": summary.only_in_b,
        "topk": "10% of shared patches" if topk is None else int(topk),
        "means": {k: _number(v) for k, v in summary.means.items()},
        "class_names": {"a": names_a, "b": names_b},
        "class_names_differ": summary.class_note,
        "n_patches_shared": int(sum(r.n_patches for r in summary.rows)),
        "n_patches_only_a": int(sum(r.n_only_a for r in summary.rows)),
        "n_patches_only_b": int(sum(r.n_only_b for r in summary.rows)),
        "most_disagreeing": [
            {
                "slide_id": r.slide_id,
                "spearman": _number(r.spearman),
                "topk_jaccard": _number(r.topk_jaccard),
                "pred_a": r.pred_a,
                "pred_b": r.pred_b,
                "agree": r.agree,
            }
            for r in worst
        ],
    }
    write_text_atomic(summary.summary_path, json.dumps(payload, indent=2) + "\n")
    return summary
