"""The columns a run writes into the process list and results CSV: the run's status columns
and the result columns (CLAM's ``bag_size``, rank-ordered ``Pred_c``/``p_c``, our class-ordered
``prob_<label>`` and the attention statistics), plus MIL-Lab's ``heatmap_results.csv`` row.

Everything else in a list belongs to the user and is never merged (:func:`is_run_column`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ATTENTION_COLUMNS",
    "MIL_LAB_RESULT_COLUMNS",
    "PREDICTION_COLUMN",
    "RUN_COLUMNS",
    "class_probabilities",
    "is_result_column",
    "is_run_column",
    "mil_lab_result_row",
    "result_columns",
]


#: Columns the run writes besides the status columns: CLAM's results columns (``bag_size`` then
#: rank-ordered ``Pred_c``/``p_c``: ``p_0`` is the TOP probability, not class 0's), our
#: class-ordered ``prob_<label>`` and the attention statistics.
PREDICTION_COLUMN = re.compile(r"^(bag_size|Pred_\d+|p_\d+|prob_.+|faith_.+)$")
ATTENTION_COLUMNS = ("attention_mean", "attention_std")
#: Process-list columns a run writes; everything else belongs to the user and is never merged.
RUN_COLUMNS: tuple[str, ...] = ("status", "stage", "error", "updated_at")
#: ``heatmap_results.csv`` as MIL-Lab's ``generate_heatmaps.py`` writes it (``clam-heat quick``).
MIL_LAB_RESULT_COLUMNS = (
    "slide_id",
    "num_patches",
    "prediction",
    "probabilities",
    "attention_mean",
    "attention_std",
    "heatmap_path",
)


def is_result_column(name: str) -> bool:
    """True for the prediction and attention columns a run adds.

    >>> [is_result_column(c) for c in ("bag_size", "p_1", "Pred_0", "prob_tumour", "label")]
    [True, True, True, True, False]
    """
    return bool(PREDICTION_COLUMN.match(name)) or name in ATTENTION_COLUMNS


def is_run_column(name: str) -> bool:
    """True for columns the runner owns (status and results), False for user columns.

    >>> [is_run_column(c) for c in ("status", "p_1", "Pred_0", "label", "x1", "process")]
    [True, True, True, False, False, False]
    """
    return name in RUN_COLUMNS or is_result_column(name)


def class_probabilities(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``(label, probability)`` in class-index order, from the infer stage's ledger result.

    The label of class i is its name in CLAM's rank-ordered ``top_names`` (``top_ids`` says
    which class each rank is), so the order never depends on which class won.

    >>> class_probabilities({"probs": [0.2, 0.8], "top_ids": [1, 0], "top_names": ["t", "n"]})
    [('n', 0.2), ('t', 0.8)]
    """
    probs = [float(p) for p in result.get("probs", [])]
    names = dict(zip(result.get("top_ids", []), result.get("top_names", []), strict=False))
    return [(str(names.get(i, i)), p) for i, p in enumerate(probs)]


def result_columns(result: Mapping[str, Any], n_classes: int) -> dict[str, Any]:
    """CLAM's results columns: bag_size then rank-ordered Pred_c/p_c, then class-ordered
    ``prob_<label>`` (one per class), then the attention statistics.

    ``result`` is the infer stage's ledger result; empty gives no columns.
    """
    if not result:
        return {}
    cols: dict[str, Any] = {"bag_size": result["bag_size"]}
    names, probs = result["top_names"], result["top_probs"]
    for c in range(n_classes):
        cols[f"Pred_{c}"] = names[c]
        cols[f"p_{c}"] = round(float(probs[c]), 6)
    for label, prob in class_probabilities(result):
        cols[f"prob_{label}"] = round(prob, 6)
    for name in ATTENTION_COLUMNS:
        cols[name] = round(result[name], 6)
    for name in sorted(k for k in result if k.startswith("faith_")):  # faithfulness stage
        cols[name] = round(float(result[name]), 6)
    return cols


def mil_lab_result_row(
    row: Mapping[str, Any], labels: Sequence[str], heatmap_path: str
) -> dict[str, Any]:
    """One ``heatmap_results.csv`` row from a finished process-list row: ``prediction`` is the
    top label (``Pred_0``), ``probabilities`` the ``prob_<label>`` values in class order.

    >>> r = {"slide_id": "s", "bag_size": 3, "Pred_0": "t", "prob_n": 0.25, "prob_t": 0.75,
    ...      "attention_mean": 0.5, "attention_std": 0.125}
    >>> mil_lab_result_row(r, ["n", "t"], "s_heatmap.png")["probabilities"]
    '[0.25, 0.75]'
    """
    probs = [round(float(row[f"prob_{label}"]), 6) for label in labels]
    values = (
        str(row["slide_id"]),
        int(row["bag_size"]),
        str(row["Pred_0"]),
        str(probs),
        round(float(row["attention_mean"]), 6),
        round(float(row["attention_std"]), 6),
        heatmap_path,
    )
    return dict(zip(MIL_LAB_RESULT_COLUMNS, values, strict=True))
