"""Test-only fault injection: a worker process dies inside a chosen stage.

Nothing in the package knows about this. :func:`armed_from` wraps every registered stage through
the public registry (restored afterwards); the wrappers travel to worker processes with each row,
as every stage does, and are imported there by this module's name (``tests/helpers`` is put on
``sys.path`` by ``tests/conftest.py``, and worker processes inherit it).

The spec file holds ``slide_id:stage[:marker_file]`` (``:SIGKILL`` instead of a marker: the
worker SIGKILLs itself, as the out-of-memory killer would, and notes it in ``<spec>.fired``)
and is read per row, so a test can arm it after the workers started (no file, no fault). A
worker process (never the process that armed it) running that stage of that slide exits at once
(``os._exit``) after the ledger marked the stage started. With a marker file it does so only
the first time (the marker is created exclusively).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clam_heat.stages import registry
from clam_heat.stages.base import Stage, StageRun

FAULT_EXIT_CODE = 86


class DieInStage(Stage):
    """``inner`` unchanged (name, fingerprint, outputs), except that ``run`` may exit."""

    def __init__(self, inner: Stage, spec_file: Path, driver_pid: int) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.depends_on = inner.depends_on  # type: ignore[misc]
        self.spec_file = str(spec_file)
        self.driver_pid = driver_pid

    def enabled(self, cfg: Any) -> bool:
        return self.inner.enabled(cfg)

    def upstream(self, cfg: Any) -> tuple[str, ...]:
        return self.inner.upstream(cfg)

    def fingerprint(self, ctx: Any) -> dict[str, Any]:
        return self.inner.fingerprint(ctx)

    def outputs(self, ctx: Any) -> dict[str, Path]:
        return self.inner.outputs(ctx)

    def run(self, ctx: Any) -> StageRun:
        if self._armed_for(ctx.slide_id):
            if self._spec().endswith(":SIGKILL"):  # what the kernel's OOM killer does
                with open(self.spec_file + ".fired", "a", encoding="utf-8") as fired:
                    fired.write(f"{ctx.slide_id}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(FAULT_EXIT_CODE)
        return self.inner.run(ctx)

    def _spec(self) -> str:
        try:
            return Path(self.spec_file).read_text("utf-8").strip()
        except OSError:
            return ""

    def _armed_for(self, slide_id: str) -> bool:
        if os.getpid() == self.driver_pid:
            return False
        try:
            spec = Path(self.spec_file).read_text("utf-8").strip()
        except OSError:
            return False
        target, _, rest = spec.partition(":")
        stage, _, marker = rest.partition(":")
        if target != slide_id or stage != self.name:
            return False
        if marker and marker != "SIGKILL":
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True


@contextlib.contextmanager
def armed_from(spec_file: Path) -> Iterator[Path]:
    """Every registered stage wrapped by :class:`DieInStage` reading ``spec_file``, for the
    duration of the block (the registry is restored afterwards)."""
    pid = os.getpid()
    wrapped = [DieInStage(stage, spec_file, pid) for stage in registry.stages()]
    with registry.registered(*wrapped):
        yield spec_file
