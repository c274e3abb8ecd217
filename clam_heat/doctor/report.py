"""The doctor's result: one :class:`Check` a line, printed with a mark and, on failure, the fix."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import typed_message_line as first_line

__all__ = ["Check", "DoctorReport", "exit_code", "first_line", "format_report"]


@dataclass(frozen=True)
class Check:
    """One line of the report.

    ``ok``: True (pass), False (a required check failed, so the exit code is 1) or None (a
    warning about something optional). ``fix`` says what to do and is printed unless ``ok``.
    """

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    """The checks in the order they ran."""

    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool | None, detail: str, fix: str = "") -> Check:
        check = Check(name, ok, detail, fix)
        self.checks.append(check)
        return check

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.ok is None]

    def __iter__(self) -> Iterator[Check]:
        return iter(self.checks)

    def __len__(self) -> int:
        return len(self.checks)


_MARKS = {True: "✓", False: "✗", None: "!"}
_ASCII_MARKS = {True: "ok  ", False: "FAIL", None: "warn"}


def format_report(report: DoctorReport, *, ascii_only: bool = False) -> list[str]:
    """One line per check (mark, name, detail and, unless it passed, the fix), then a total.

    ``ascii_only`` swaps the marks ✓ ✗ ! for ``ok`` / ``FAIL`` / ``warn`` (terminals that
    cannot print them).

    >>> report = DoctorReport()
    >>> _ = report.add("h5py", True, "3.10.0, HDF5 1.14.3")
    >>> _ = report.add("scipy", False, "not installed (required)", "pip install 'scipy>=1.11'")
    >>> print("\\n".join(format_report(report)))
    ✓ h5py: 3.10.0, HDF5 1.14.3
    ✗ scipy: not installed (required) -> fix: pip install 'scipy>=1.11'
    not ready: 2 checks, 1 failed, 0 warnings
    """
    marks = _ASCII_MARKS if ascii_only else _MARKS
    lines = []
    for check in report:
        line = f"{marks[check.ok]} {check.name}: {check.detail}"
        if check.ok is not True and check.fix:
            line += f" -> fix: {check.fix}"
        lines.append(line)
    failed, warned = len(report.failed), len(report.warnings)
    verdict = "not ready" if failed else "ready"
    lines.append(f"{verdict}: {len(report)} checks, {failed} failed, {warned} warnings")
    return lines


def exit_code(report: DoctorReport) -> int:
    """1 when a required check failed, else 0 (warnings do not fail)."""
    return 1 if report.failed else 0
