"""What a row shows: :class:`ViewerEntry` (slide, maps, prediction, status) for the three modes
of ``clam-heat view`` (a run, a slide paired with an image, two runs), and the cohort table's
row (:func:`cohort_row`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError
from .maps import MapSource, discover_maps

if TYPE_CHECKING:
    from ..config import HeatmapConfig

__all__ = [
    "ViewerEntry",
    "cohort_row",
    "compare_entries",
    "pair_entry",
    "viewer_entries",
]


@dataclass(frozen=True)
class ViewerEntry:
    """One viewable row: its slide, its maps and what the cohort page shows about it.

    ``maps`` are drawn live from their scores; ``image`` is a finished heatmap image shown as
    it is (pair mode), placed by size over the slide.
    """

    slide_id: str
    label: str
    slide_path: Path
    status: str
    maps: tuple[MapSource, ...] = ()
    image: Path | None = None
    #: the image's colormap and scale (from its own metadata in pair mode)
    image_meta: dict[str, Any] | None = None
    details: dict[str, str] = field(default_factory=dict)
    #: compare mode: the matched score arrays of the two runs come from these blockmaps
    compare: tuple[Path, Path] | None = None
    #: the row's tissue contours (GeoJSON), when segmented
    tissue: Path | None = None


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def viewer_entries(cfg: HeatmapConfig) -> list[ViewerEntry]:
    """The rows of ``cfg``'s process list (``process == 1``), in list order, for the viewer."""
    from ..process_list import PREDICTION_COLUMN, read_process_list
    from ..rows import build_contexts, segmentation_geojson_path

    list_path = cfg.process_list_path
    if not list_path.is_file():
        raise OutputError(
            f"{list_path}: no process list yet; run `clam-heat run CONFIG` before viewing"
        )
    ctxs = build_contexts(cfg, read_process_list(list_path))
    ids = frozenset(c.slide_id for c in ctxs)
    keep = ("stage", "error", "attention_mean", "attention_std")
    entries = []
    for ctx in ctxs:
        details = {
            str(k): text
            for k, v in ctx.row.items()
            if (k in keep or PREDICTION_COLUMN.match(str(k))) and (text := _text(v))
        }
        entries.append(
            ViewerEntry(
                slide_id=ctx.slide_id,
                label=ctx.label,
                slide_path=ctx.slide_path,
                status=_text(ctx.row.get("status")) or "tbp",
                maps=tuple(discover_maps(ctx, ids)),
                details=details,
                tissue=seg if (seg := segmentation_geojson_path(ctx)).is_file() else None,
            )
        )
    return entries


def pair_entry(slide_path: Path, image: Path, cmap: str | None = None) -> ViewerEntry:
    """One slide and one heatmap image, no run: the image is placed by size over the slide and
    its colour bar comes from the image's own metadata (else ``cmap``, else jet)."""
    from ..heatmap.meta import read_meta

    slide_path, image = Path(slide_path), Path(image)
    for flag, path in (("--slide", slide_path), ("--heatmap", image)):
        if not path.is_file():
            raise OutputError(f"{flag} {path}: no such file; pass the {flag[2:]} file to view")
    meta = read_meta(image) or {}
    if cmap is not None or "cmap" not in meta:
        meta = {"cmap": cmap or "jet", "scale": "percentile", "low": 0.0, "high": 100.0}
    return ViewerEntry(
        slide_id=slide_path.stem,
        label="",
        slide_path=slide_path,
        status="pair",
        image=image,
        image_meta=meta,
        details={"heatmap": image.name},
    )


def compare_entries(
    entries: list[ViewerEntry], config_a: Path, config_b: Path
) -> list[ViewerEntry]:
    """Run A's entries with run B's attention and the A - B percentile difference as more maps
    (slides B has not scored keep A's maps only)."""
    from ..compare import DIFF_CMAP, run_outputs

    outs_a, outs_b = run_outputs(config_a), run_outputs(config_b)
    result = []
    for e in entries:
        if e.slide_id in outs_a and e.slide_id in outs_b:
            a, b = outs_a[e.slide_id].blockmap, outs_b[e.slide_id].blockmap
            diff = MapSource("A \u2212 B", a, cmap=DIFF_CMAP, other=b, scale="raw")
            more = (MapSource("B attention", b), diff)
            e = replace(e, maps=(*e.maps, *more), compare=(a, b))
        result.append(e)
    return result


def cohort_row(entry: ViewerEntry, stats: dict[str, float] | None = None) -> dict[str, Any]:
    """The cohort table's row: label, prediction, probability, correct, attention statistics,
    status and error (empty values where the run has not produced them)."""
    d = entry.details
    pred = d.get("Pred_0", "")
    try:
        prob: float | None = float(d.get("p_0", ""))
    except ValueError:
        prob = None
    row: dict[str, Any] = {
        "id": entry.slide_id,
        "label": entry.label,
        "pred": pred,
        "prob": prob,
        "correct": (pred == entry.label) if pred and entry.label else None,
        "status": entry.status,
        "error": d.get("error", ""),
        "maps": len(entry.maps) + (entry.image is not None),
    }
    for key in ("mean", "std"):
        try:
            row[key] = float(d.get(f"attention_{key}", ""))
        except ValueError:
            row[key] = None
    row["top10"] = None if stats is None else stats.get("top10")
    return row


def attention_stats(path: Path) -> dict[str, float]:
    """Share of the attention (softmax of the scores, as attention pooling weighs patches) held
    by the top 10 % of patches, read from a blockmap H5."""
    import numpy as np

    from ..h5io import read_scores

    scores = read_scores(path)[0].astype(np.float64)
    if not len(scores):
        return {}
    w = np.exp(scores - scores.max())
    w /= w.sum()
    k = max(1, math.ceil(len(w) * 0.1))
    return {"top10": float(np.sort(w)[-k:].sum())}
