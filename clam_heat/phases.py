"""Running rows in two phases when a stage needs the whole cohort (``score_scale: cohort``).

A cohort-wide colour scale needs every slide's bag scores before any heatmap is drawn, but the
runner drives one row at a time through all its stages. :func:`map_rows` keeps that protocol and
splits the stage plan at the heatmap stage: phase 1 runs the stages before it on every row, then
the driver writes the cohort's sorted scores once (:func:`~clam_heat.cohort.write_cohort_scores`,
skipped when unchanged), then phase 2 runs the heatmap stage and the ones after it on the rows
phase 1 finished. Each row still yields one outcome (the two phases merged); a row that fails in
phase 1 yields at once. Both phases follow the ledger, so a killed run resumes where it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .cohort import write_cohort_scores
from .config import HeatmapConfig
from .rows import RowContext, blockmap_h5_path, build_contexts, cohort_scores_path
from .stages.base import Stage
from .stages.row import RowOutcome

log = logging.getLogger(__name__)

__all__ = ["map_rows", "split_at_heatmap"]

#: The first stage that reads the cohort scale.
COHORT_STAGE = "heatmap"


def split_at_heatmap(cfg: HeatmapConfig, plan: Sequence[Stage]) -> tuple[tuple[Stage, ...], ...]:
    """The plan as one phase, or (before heatmap, heatmap and after) for a cohort scale."""
    names = [s.name for s in plan]
    if cfg.heatmap_arguments.score_scale != "cohort" or COHORT_STAGE not in names:
        return (tuple(plan),)
    at = names.index(COHORT_STAGE)
    return tuple(plan[:at]), tuple(plan[at:])


def _merge(first: RowOutcome, second: RowOutcome) -> RowOutcome:
    second.ran = {**first.ran, **second.ran}
    second.reasons = {**first.reasons, **second.reasons}
    second.warnings = first.warnings + second.warnings
    second.seconds += first.seconds
    return second


def write_cohort(cfg: HeatmapConfig, df: Any) -> None:
    """The cohort file from every listed row whose bag scores exist (this list or shard)."""
    blockmaps = [
        (ctx.slide_id, blockmap_h5_path(ctx))
        for ctx in build_contexts(cfg, df)
        if blockmap_h5_path(ctx).is_file()
    ]
    path = cohort_scores_path(cfg)
    digest, written = write_cohort_scores(path, blockmaps)
    log.info(
        "cohort scale: %d slides, %s %s (digest %s)",
        len(blockmaps),
        "wrote" if written else "kept",
        path,
        digest[:12],
    )


def map_rows(
    executor: Any,
    cfg: HeatmapConfig,
    df: Any,
    pending: Sequence[RowContext],
    plan: Sequence[Stage],
    started: Callable[[Sequence[RowContext]], None] | None = None,
) -> Iterator[RowOutcome]:
    """``executor.map_rows(pending, plan, started)``, in two phases for a cohort colour scale."""
    phases = split_at_heatmap(cfg, plan)
    if len(phases) == 1:
        yield from executor.map_rows(pending, plan, started)
        return
    before, after = phases
    done: dict[str, RowOutcome] = {}
    if before:
        for outcome in executor.map_rows(pending, before, started):
            if outcome.status == "done":
                done[outcome.slide_id] = outcome
            else:
                yield outcome
    else:
        done = {ctx.slide_id: RowOutcome(ctx.slide_id, "done") for ctx in pending}
        if started:
            started(pending)
    write_cohort(cfg, df)
    rows = [ctx for ctx in pending if ctx.slide_id in done]
    for outcome in executor.map_rows(rows, after, None):
        yield _merge(done[outcome.slide_id], outcome)
