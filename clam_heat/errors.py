"""Typed errors with user-facing, one-line messages.

Every error the pipeline raises on bad input derives from :class:`ClamHeatError`, so the CLI can
print ``str(err)`` (one line naming the file or key and the fix) and choose the exit code, and
the runner can mark a row failed with the same line.
"""

from __future__ import annotations

from pathlib import Path


class ClamHeatError(Exception):
    """Base class: the message is a complete, one-line explanation for the user."""

    exit_code = 1


class ConfigError(ClamHeatError):
    """One or more problems in a YAML config; ``problems`` holds every line, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: Path | str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = head + f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems)
        super().__init__(message)


class ProcessListError(ClamHeatError):
    """The process-list CSV is unusable (duplicate ids, bad ids, unreadable file)."""

    exit_code = 2


class SlideError(ClamHeatError):
    """A slide cannot be opened or read."""

    def __init__(self, path: Path | str, reason: str, fix: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        text = f"{self.path}: {reason}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class FeatureError(ClamHeatError):
    """A feature/coords H5 is missing, malformed or inconsistent."""


class CheckpointError(ClamHeatError):
    """A model checkpoint does not match the configured architecture."""


class SegmentationError(ClamHeatError):
    """Tissue segmentation found nothing usable."""


class OutputError(ClamHeatError):
    """An output location cannot be written."""
