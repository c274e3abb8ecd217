"""One row through its stages, following the ledger protocol.

For each stage: compute its fingerprint (the config keys it reads, the identity of its input
files, the package version) and ask the slide's :class:`~clam_heat.ledger.Ledger` whether it
is up to date; a stale stage is *marked started*, run (its outputs are written atomically, not
synced one by one), outputs it no longer writes are removed, its outputs are synced to disk
together (:func:`~clam_heat.atomic.sync_paths`: one batch per stage, not one fsync per sampled
patch), and only then is it *marked done* with a fresh fingerprint and each output's size and
mtime. A kill or power loss at any point leaves the stage either done with complete outputs or
not done; an output truncated or rewritten later fails its recorded identity and the stage
reruns (``output changed``).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import model_process
from ..atomic import sync_paths
from ..errors import ClamHeatError
from ..ledger import Ledger, Reason, Timer
from ..memory import release_freed_memory
from ..rows import RowContext
from . import registry
from .base import Stage, StageRun

log = logging.getLogger(__name__)

__all__ = ["RowOutcome", "failed_row_changed", "plan_row", "process_row", "resolve"]


@dataclass
class RowOutcome:
    """Result of one row, returned by a worker to the driver."""

    slide_id: str
    status: str  # done | failed
    stage: str = ""
    error: str = ""
    ran: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for stages that ran
    reasons: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _one_line(err: BaseException, ctx: RowContext) -> str:
    if isinstance(err, ClamHeatError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err} (slide {ctx.slide_path}; unexpected, see the run log)"
    return " ".join(text.split())


def resolve(stages: Sequence[Stage | str] | None) -> tuple[Stage, ...]:
    """Stage objects for ``stages`` (names are looked up in the registry; None: all)."""
    if stages is None:
        return registry.stages()
    return tuple(registry.get(s) if isinstance(s, str) else s for s in stages)


def outcome_stages(stages: Sequence[Stage | str] | None) -> set[str]:
    """Names of the stages a row runs (for which ledger results reach its outcome)."""
    return {s if isinstance(s, str) else s.name for s in resolve(stages)}


def _run_stage(stage: Stage, ctx: RowContext) -> StageRun:
    """``stage.run(ctx)``: a stage that needs a model runs in the model process when the run
    started one (the slide handle stays here; the other process opens its own); afterwards
    the freed pixel buffers go back to the OS."""
    if stage.needs_model:
        run = model_process.call(stage.run, replace(ctx, _slide=None))
    else:
        run = stage.run(ctx)
    release_freed_memory()
    return run


def _outputs(stage: Stage, ctx: RowContext) -> Callable[[], Iterable[Path]]:
    """The stage's output paths, named only when the ledger asks (see :meth:`Ledger.reason`)."""
    return lambda: stage.outputs(ctx).values()


def plan_row(
    ctx: RowContext, stages: Sequence[Stage | str] | None = None
) -> dict[str, Reason | None]:
    """Why each stage would run now (None = up to date); a stage whose inputs rerun also reruns."""
    ledger = Ledger.load(ctx.ledger_path)
    plan: dict[str, Reason | None] = {}
    for stage in resolve(stages):
        name = stage.name
        try:
            reason = ledger.reason(name, stage.fingerprint(ctx), _outputs(stage, ctx))
        except ClamHeatError as err:
            reason = Reason("changed", f"cannot fingerprint ({err})")
        if reason is None:
            rerun = [dep for dep in stage.upstream(ctx.cfg) if plan.get(dep) is not None]
            if rerun:
                reason = Reason("upstream", ", ".join(rerun))
        plan[name] = reason
    return plan


def failed_row_changed(
    ctx: RowContext, stages: Sequence[Stage | str] | None = None
) -> Reason | None:
    """Why a row that failed should run again without ``--retry-failed``: the failed stage's
    fingerprint (config keys, input files, checkpoint) differs from the one it failed under, or
    a stage before it is no longer up to date. None: unchanged since it failed (or failed
    before failures were recorded), so it waits for ``--retry-failed``."""
    ledger = Ledger.load(ctx.ledger_path)
    try:
        for stage in resolve(stages):
            rec = ledger.record(stage.name) or {}
            try:
                fingerprint = stage.fingerprint(ctx)
            except ClamHeatError:
                fingerprint = None
            if rec.get("state") == "failed":
                return ledger.changed_since_failure(stage.name, fingerprint)
            if rec.get("state") != "done" or fingerprint is None:
                return None
            reason = ledger.reason(stage.name, fingerprint, _outputs(stage, ctx))
            if reason is not None:
                return Reason("upstream", f"{stage.name} {reason}")
        return None
    except Exception:  # noqa: BLE001 - undecidable: the row waits, as before
        log.debug("%s: cannot tell whether the failed row changed", ctx.slide_id, exc_info=True)
        return None
    finally:
        ctx.close()


def _record_failure(
    ledger: Ledger, stage: str, fingerprint: dict[str, Any] | None, error: str
) -> None:
    """The failed stage and the fingerprint it failed under; a ledger that cannot be written
    only costs the automatic rerun on change."""
    try:
        ledger.mark_failed(stage, fingerprint, error)
    except Exception:  # noqa: BLE001 - never mask the row's own error
        log.warning("%s: cannot record the failure in the ledger", ledger.path, exc_info=True)


def process_row(ctx: RowContext, stages: Sequence[Stage | str] | None = None) -> RowOutcome:
    """Run the stale stages of one row; never raises for a bad slide (returns a failed outcome).

    A failing stage is recorded in the ledger with the fingerprint it failed under
    (:func:`failed_row_changed` compares it on the next run)."""
    timer = Timer()
    outcome = RowOutcome(ctx.slide_id, "done")
    ledger = Ledger.load(ctx.ledger_path)
    current: tuple[str, dict[str, Any] | None] | None = None
    try:
        for stage in resolve(stages):
            name = stage.name
            current = (name, None)
            fingerprint = dict(stage.fingerprint(ctx))
            current = (name, fingerprint)
            reason = ledger.reason(name, fingerprint, _outputs(stage, ctx))
            if reason is not None:
                outcome.reasons[name] = str(reason)
                stage_timer = Timer()
                old_outputs = set((ledger.record(name) or {}).get("outputs", []))
                ledger.mark_started(name)
                run = _run_stage(stage, ctx)
                for stale in old_outputs - {str(p) for p in run.outputs}:
                    Path(stale).unlink(missing_ok=True)
                sync_paths(run.outputs)  # durable before the ledger says done
                # fingerprint again: the stage may have created inputs of its own fingerprint
                ledger.mark_done(
                    name,
                    stage.fingerprint(ctx),
                    run.outputs,
                    seconds=stage_timer.seconds,
                    result=run.result,
                )
                outcome.ran[name] = stage_timer.seconds
                log.info(
                    "%s: %s done in %.2fs (%s)", ctx.slide_id, name, stage_timer.seconds, reason
                )
            rec = ledger.record(name) or {}
            outcome.stage = name
            outcome.warnings.extend(rec.get("result", {}).get("warnings", []))
            current = None
        infer = ledger.record("infer")
        if infer:
            outcome.result = dict(infer.get("result", {}))
            faith = (
                ledger.record("faithfulness") if "faithfulness" in outcome_stages(stages) else None
            )
            if faith:  # the faith_* areas become results columns too
                outcome.result.update(faith.get("result", {}))
        if outcome.warnings:  # a done row keeps its warnings where users look: the error column
            outcome.error = "warning: " + "; ".join(dict.fromkeys(outcome.warnings))
    except Exception as err:  # noqa: BLE001 - one bad slide must never stop the run
        outcome.status = "failed"
        outcome.error = _one_line(err, ctx)
        log.error("%s failed: %s\n%s", ctx.slide_id, outcome.error, traceback.format_exc())
        if current is not None:
            _record_failure(ledger, *current, outcome.error)
    finally:
        ctx.close()
        outcome.seconds = timer.seconds
    return outcome
