"""The ordered stage table: the one place that says which stages exist and in which order.

A new stage is a :class:`~clam_heat.stages.base.Stage` subclass in its own module plus one line
in :data:`_BUILTIN`; a plug-in (or a test) adds one at run time with :func:`register` or, for a
limited time, :func:`registered`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Stage
from .class_maps import ClassMapsStage
from .explain import ExplainStage
from .faithfulness import FaithfulnessStage
from .heatmap import HeatmapStage
from .infer import InferStage
from .overlap import OverlapStage
from .sample import SampleStage
from .segment import SegmentStage

if TYPE_CHECKING:
    from ..config import HeatmapConfig

__all__ = [
    "get",
    "names",
    "preload_modules",
    "register",
    "registered",
    "stages",
    "stages_for",
    "unregister",
]

_BUILTIN: tuple[Stage, ...] = (
    SegmentStage(),
    InferStage(),
    OverlapStage(),
    HeatmapStage(),
    SampleStage(),
    ClassMapsStage(),
    ExplainStage(),
    FaithfulnessStage(),
)
_TABLE: list[Stage] = list(_BUILTIN)

#: What every worker needs besides the stages' own modules (the row protocol, YAML).
_WORKER_MODULES: tuple[str, ...] = ("clam_heat.stages.row", "yaml")


def stages() -> tuple[Stage, ...]:
    """Every registered stage, in run order."""
    return tuple(_TABLE)


def names() -> tuple[str, ...]:
    """The registered stage names, in run order.

    >>> names()[:5]
    ('segment', 'infer', 'overlap', 'heatmap', 'sample')
    """
    return tuple(stage.name for stage in _TABLE)


def get(name: str) -> Stage:
    """The registered stage called ``name``."""
    for stage in _TABLE:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(names())}")


def register(stage: Stage, *, after: str | None = None, before: str | None = None) -> Stage:
    """Add ``stage`` (last, or after/before a named stage); a stage of the same name is replaced
    in place. Its ``depends_on`` stages must already be registered before it."""
    if after is not None and before is not None:
        raise ValueError("give after or before, not both")
    if after is None and before is None and stage.name in names():
        table = [stage if s.name == stage.name else s for s in _TABLE]  # replaced in place
    else:
        anchor = after if after is not None else before
        table = [s for s in _TABLE if s.name != stage.name]
        if anchor is None:
            table.append(stage)
        else:
            at = [s.name for s in table].index(get(anchor).name)
            table.insert(at + (1 if after is not None else 0), stage)
    position = [s.name for s in table].index(stage.name)
    earlier = {s.name for s in table[:position]}
    missing = [dep for dep in stage.depends_on if dep not in earlier]
    if missing:
        raise ValueError(f"stage {stage.name!r} depends on {missing}, which must run before it")
    _TABLE[:] = table
    return stage


def unregister(name: str) -> Stage:
    """Remove the stage called ``name`` (and return it)."""
    stage = get(name)
    _TABLE.remove(stage)
    return stage


@contextlib.contextmanager
def registered(
    *added: Stage, after: str | None = None, before: str | None = None
) -> Iterator[tuple[Stage, ...]]:
    """Register ``added`` (in order) for the duration of a ``with`` block, then restore the
    table exactly as it was (whatever else was registered or removed meanwhile)."""
    saved = list(_TABLE)
    try:
        anchor_after, anchor_before = after, before
        for stage in added:
            register(stage, after=anchor_after, before=anchor_before)
            if anchor_after is not None:
                anchor_after = stage.name
        yield stages()
    finally:
        _TABLE[:] = saved


def stages_for(cfg: HeatmapConfig, requested: Sequence[str] | None = None) -> tuple[Stage, ...]:
    """The stages a run with ``cfg`` executes, in table order: the requested names (default
    all) that are enabled for ``cfg`` (``overlap`` only with ``calc_heatmap``)."""
    wanted = set(names() if requested is None else requested)
    for name in wanted:
        get(name)  # unknown names are an error, not silently skipped
    return tuple(s for s in _TABLE if s.name in wanted and s.enabled(cfg))


def preload_modules() -> tuple[str, ...]:
    """Modules a worker imports up front: every stage's module and its lazily used modules."""
    found: dict[str, None] = {}
    for stage in _TABLE:
        found[type(stage).__module__] = None
        found.update(dict.fromkeys(stage.preload))
    found.update(dict.fromkeys(_WORKER_MODULES))
    return tuple(found)
