"""``clam-heat`` command line: each command parses options and calls one library function.

One module per command group (:mod:`.pipeline`, :mod:`.quick`, :mod:`.viewer`, :mod:`.demo`,
:mod:`.tools`), each registering its commands on the one app of :mod:`.app`. Errors print one
line and exit 2 (bad input before work, a list another run holds) or 1; tracebacks go to the
run log (:mod:`.output`). A run stopped by SIGTERM/SIGINT exits 143/130. Progress goes to
stderr, results to stdout; ``--quiet`` (or a non-TTY stderr) turns it off.
"""

from __future__ import annotations

# each module registers its commands; this order is the order of `clam-heat --help`
# isort: off
from . import pipeline, quick, viewer, demo, tools  # noqa: F401

# isort: on
from .app import app
from .output import exit_now, run_app

__all__ = ["app", "cli_main", "main"]


def cli_main(argv: list[str] | None = None) -> int:
    """The command line's exit code for ``argv`` (:func:`clam_heat.cli.output.run_app`)."""
    return run_app(app, argv)


def main() -> None:  # pragma: no cover - console entry
    exit_now(cli_main())  # no interpreter teardown: 0.15-0.2 CPU s per command
