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


def os_error_advice(path: Path | str, err: OSError) -> str:
    """The cause of an OS error on ``path`` and what to do, as one clause for a message.

    Disk full names the volume's free space, permission problems name the owner and the user.
    """
    import errno
    import os
    import shutil

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        try:
            left = shutil.disk_usage(existing).free // (1024 * 1024)
        except OSError:
            return f"no space left; free space on the volume of {existing}"
        return f"no space left; free space on the volume of {existing}: {left} MB left"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        if err.errno == errno.EROFS:
            return f"{existing} is on a read-only filesystem; choose another output folder"
        try:
            import pwd

            owner = pwd.getpwuid(existing.stat().st_uid).pw_name
            me = pwd.getpwuid(os.geteuid()).pw_name
            return (
                f"permission denied; owner of {existing} is {owner}, you are {me} "
                "(fix its permissions or choose another output folder)"
            )
        except (ImportError, KeyError, OSError):
            return f"permission denied on {existing}; fix its permissions or choose another folder"
    if err.errno == errno.ENOTDIR:
        return f"{existing} is a file, not a folder; choose another output folder"
    return f"{err.strerror or err}; check that the folder exists and is writable"


def message_line(err: BaseException, empty: str = "") -> str:
    """The first line of ``err``'s message, to quote in a one-line error; for an empty message
    ``empty``, or else the exception's type name.

    >>> message_line(OSError("disk full\\nmore detail"))
    'disk full'
    >>> message_line(ValueError()), message_line(ValueError(), "unreadable")
    ('ValueError', 'unreadable')
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else (empty or type(err).__name__)


def csv_read_error(path: object, what: str, err: BaseException) -> ProcessListError:
    """The one-line error for a CSV that cannot be read (missing, a folder, unreadable, not
    UTF-8 text a CSV parser accepts), naming the file and the fix.

    >>> str(csv_read_error("l.csv", "process list", FileNotFoundError()))
    'l.csv: process list file not found; check the path'
    >>> str(csv_read_error("l.csv", "labels", UnicodeDecodeError("utf-8", b"", 0, 1, "bad")))
    "l.csv: labels is not a readable UTF-8 CSV ('utf-8' codec can't decode bytes in position 0-0: bad); re-save it as CSV"
    """  # noqa: E501 - a doctest's output is one line
    if isinstance(err, FileNotFoundError):
        return ProcessListError(f"{path}: {what} file not found; check the path")
    if isinstance(err, IsADirectoryError):
        return ProcessListError(f"{path}: {what} path is a folder; name a CSV file")
    if isinstance(err, OSError):
        reason = err.strerror or err
        return ProcessListError(f"{path}: cannot read {what} ({reason}); check permissions")
    return ProcessListError(
        f"{path}: {what} is not a readable UTF-8 CSV ({message_line(err)}); re-save it as CSV"
    )


def typed_message_line(err: BaseException) -> str:
    """``Type: first line of the message`` (or just the type), for details of third-party
    errors whose type says more than their text.

    >>> typed_message_line(OSError("disk\\nfull")), typed_message_line(KeyError())
    ('OSError: disk', 'KeyError')
    """
    text = message_line(err)
    return f"{type(err).__name__}: {text}" if str(err).strip() else type(err).__name__


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, pluralised.

    >>> counted(1, "slide"), counted(2, "slide"), counted(0, "H5 file")
    ('1 slide', '2 slides', '0 H5 files')
    """
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
