"""The cohort's faithfulness summary: mean areas per method, mean curves with a band (one
standard deviation), as ``<results>/<list>_faithfulness.json`` and a PNG beside it.

Reads the rows' ``<id>_faithfulness.json`` files (:mod:`clam_heat.stages.faithfulness`); the
bytes depend only on them (sorted keys, rounded values, a PNG without a timestamp).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path

__all__ = ["summarise", "write_faithfulness_summary"]


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method: slide count, mean and std of each area and of each curve point."""
    methods: dict[str, dict[str, list[Any]]] = {}
    for row in rows:
        for name, c in row["curves"].items():
            entry = methods.setdefault(name, {k: [] for k in ("del", "ins", "dauc", "iauc")})
            entry["del"].append(c["deletion"])
            entry["ins"].append(c["insertion"])
            entry["dauc"].append(c["deletion_auc"])
            entry["iauc"].append(c["insertion_auc"])

    def r(values: Any) -> Any:
        return np.round(np.asarray(values, dtype=np.float64), 6).tolist()

    out: dict[str, Any] = {}
    for name, e in methods.items():
        if len({len(c) for c in e["del"]}) != 1:
            continue  # curves of different step counts: not averaged
        out[name] = {
            "slides": len(e["dauc"]),
            "deletion_auc_mean": r(np.mean(e["dauc"])),
            "deletion_auc_std": r(np.std(e["dauc"])),
            "insertion_auc_mean": r(np.mean(e["iauc"])),
            "insertion_auc_std": r(np.std(e["iauc"])),
            "deletion_curve_mean": r(np.mean(e["del"], axis=0)),
            "deletion_curve_std": r(np.std(e["del"], axis=0)),
            "insertion_curve_mean": r(np.mean(e["ins"], axis=0)),
            "insertion_curve_std": r(np.std(e["ins"], axis=0)),
        }
    return {"slides": len(rows), "methods": out}


def _plot(summary: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for name, m in summary["methods"].items():
            mean = np.asarray(m[f"{kind}_curve_mean"])
            std = np.asarray(m[f"{kind}_curve_std"])
            x = np.linspace(0, 1, len(mean))
            style = {"color": "0.4", "linestyle": "--"} if name == "random" else {}
            auc = m[f"{kind}_auc_mean"]
            (line,) = ax.plot(x, mean, label=f"{name} ({auc:.3f})", **style)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{kind} (area in brackets)")
        ax.set_xlabel("fraction of patches " + ("removed" if kind == "deletion" else "added"))
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def write_faithfulness_summary(
    curve_files: Sequence[tuple[str, Path]], json_out: Path, png_out: Path
) -> Path | None:
    """Summarise the rows' curve files that exist into ``json_out`` and ``png_out`` (None when
    no row has curves)."""
    rows = []
    for slide_id, path in curve_files:
        if Path(path).is_file():
            row = json.loads(Path(path).read_text(encoding="utf-8"))
            rows.append({"slide_id": slide_id, **row})
    if not rows:
        return None
    summary = summarise(rows)
    with atomic_path(json_out) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    _plot(summary, png_out)
    return json_out
