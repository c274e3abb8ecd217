"""MIL-Lab's outputs of ``generate_heatmaps.py``, written beside CLAM's layout after a quick run.

``OUT/<slide_id>_heatmap.png`` is the slide's production heatmap (the CLAM-named image under
``heatmap_production_results/``) as PNG, and ``OUT/heatmap_results.csv`` has exactly
:data:`~clam_heat.process_list.results.MIL_LAB_RESULT_COLUMNS`, one row per finished selected
slide. Both are derived from the run's files, so they are rebuilt on every rerun: an image is
re-encoded only when its production image is newer, and the CSV is rewritten whole (atomically).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2

from ..atomic import write_bytes_atomic, write_text_atomic
from ..config import HeatmapConfig
from ..errors import OutputError
from ..rows import MIL_LAB_CSV, mil_lab_heatmap_path

__all__ = ["MIL_LAB_CSV", "MilLabOutputs", "mil_lab_heatmap_path", "write_mil_lab_outputs"]


@dataclass(frozen=True)
class MilLabOutputs:
    """What :func:`write_mil_lab_outputs` wrote: the CSV, its rows, the PNGs re-encoded now."""

    csv_path: Path
    rows: int
    encoded: int


def _as_png(source: Path, target: Path) -> bool:
    """Write ``source`` (the production JPEG/PNG/TIFF) to ``target`` as PNG unless ``target`` is
    already newer; True when written."""
    try:
        if target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            return False
    except FileNotFoundError:
        pass
    if source.suffix.lower() == ".png":
        write_bytes_atomic(target, source.read_bytes())
        return True
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise OutputError(f"{source}: heatmap image cannot be decoded (rerun its heatmap stage)")
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - OpenCV encodes any 8-bit BGR image
        raise OutputError(f"{target}: PNG encoding failed")
    write_bytes_atomic(target, _keep_meta(source, data.tobytes()))
    return True


def _keep_meta(source: Path, png: bytes) -> bytes:
    """The PNG with the production image's colormap and score range (:mod:`heatmap.meta`)."""
    import json

    from ..heatmap.meta import embed, read_meta

    meta = read_meta(source)
    return png if meta is None else embed(png, json.dumps(meta, sort_keys=True))


def write_mil_lab_outputs(cfg: HeatmapConfig, out: Path, slide_ids: Sequence[str]) -> MilLabOutputs:
    """Write MIL-Lab's per-slide PNGs and ``heatmap_results.csv`` for the finished ``slide_ids``.

    ``prediction`` is the top class's label (CLAM's ``Pred_0``), ``probabilities`` the
    class-ordered list read from the ``prob_<label>`` columns in ``label_dict`` index order.
    """
    import pandas as pd

    from ..process_list import read_process_list
    from ..process_list.results import MIL_LAB_RESULT_COLUMNS, mil_lab_result_row
    from ..rows import build_contexts, method_heatmap_path, production_heatmap_path

    out = Path(out)
    names = cfg.data_arguments.label_names()
    labels = [names.get(i, str(i)) for i in range(cfg.exp_arguments.n_classes)]
    df = read_process_list(cfg.process_list_path)
    wanted = set(slide_ids)
    rows, encoded = [], 0
    for ctx in build_contexts(cfg, df):
        row = ctx.row
        if ctx.slide_id not in wanted or str(row.get("status", "")) != "done":
            continue
        source = production_heatmap_path(ctx)
        target = mil_lab_heatmap_path(out, ctx.slide_id)
        if source.is_file():
            encoded += _as_png(source, target)
        # OUT/<id>_<method>_heatmap.png for each method (docs/explanations.md)
        for method in cfg.heatmap_arguments.methods():
            drawn = method_heatmap_path(ctx, method)
            if method != "attention" and drawn.is_file():
                encoded += _as_png(drawn, out / f"{ctx.slide_id}_{method}_heatmap.png")
        faith = {k: row[k] for k in row if str(k).startswith("faith_")}
        result = mil_lab_result_row(row, labels, str(target) if target.is_file() else "")
        rows.append({**result, **faith})
    faith_columns = sorted({k for r in rows for k in r if k.startswith("faith_")})
    table = pd.DataFrame(rows, columns=[*MIL_LAB_RESULT_COLUMNS, *faith_columns])
    csv_path = write_text_atomic(out / MIL_LAB_CSV, table.to_csv(index=False))
    return MilLabOutputs(csv_path, len(rows), encoded)
