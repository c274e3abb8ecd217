"""What a stage is: a named step of a row with a fingerprint, named outputs and a run.

The runner never calls ``run`` directly: :func:`~clam_heat.stages.row.process_row` follows the
ledger protocol (marked started -> run -> stale outputs dropped -> fingerprint -> done), so a
stage only has to write its outputs atomically (through :mod:`clam_heat.atomic`) and say which
files it wrote. A new stage is a subclass in its own module plus one line in
:mod:`clam_heat.stages.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .. import __version__

if TYPE_CHECKING:
    from ..config import HeatmapConfig
    from ..rows import RowContext

__all__ = ["Stage", "StageRun", "base_fingerprint"]


@dataclass(frozen=True)
class StageRun:
    """What a stage wrote and the small result recorded in the ledger and the CSV."""

    outputs: list[Path]
    result: dict[str, Any] = field(default_factory=dict)


class Stage(ABC):
    """One step of a row's pipeline.

    Instances are stateless and picklable (module-level classes): the driver resolves the
    stages once and ships them with each row to whichever process runs it.
    """

    #: Unique name, used in the ledger, the CSV ``stage`` column and messages.
    name: ClassVar[str]
    #: Stages whose outputs this one reads (a rerun of one plans a rerun of this one).
    depends_on: ClassVar[tuple[str, ...]] = ()
    #: Modules this stage imports lazily; a local worker pool imports them once, up front.
    preload: ClassVar[tuple[str, ...]] = ()
    #: Whether ``run`` needs torch (a model or an encoder): such a stage runs in the model
    #: process when the run started one (:mod:`clam_heat.model_process`).
    needs_model: ClassVar[bool] = False

    def enabled(self, cfg: HeatmapConfig) -> bool:
        """Whether a run with ``cfg`` includes this stage."""
        return True

    def upstream(self, cfg: HeatmapConfig) -> tuple[str, ...]:
        """The stages whose rerun makes this one rerun under ``cfg`` (default: depends_on)."""
        return self.depends_on

    @abstractmethod
    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        """Everything the outputs depend on (config keys, input file identities, version)."""

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        """The files a run is expected to leave, by name (a stage may write more)."""
        return {}

    @abstractmethod
    def run(self, ctx: RowContext) -> StageRun:
        """Write the outputs (atomically) and return them with a small JSON-able result."""

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


def base_fingerprint(**parts: Any) -> dict[str, Any]:
    """A fingerprint with the package version (a new release reruns every stage)."""
    return {"package_version": __version__, **parts}
