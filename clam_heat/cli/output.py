"""What the ``clam-heat`` command line shows on the terminal when something goes wrong.

One ``error:`` line per problem on stderr, never wrapped; Python warnings and library logging
handed to the run log (never the terminal); a bug as one line naming the file that holds its
traceback. The exit codes are documented in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ClamHeatError, counted

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DONE",
    "EXIT_INTERRUPTED",
    "EXIT_ROWS_FAILED",
    "EXIT_TERMINATED",
    "ToRunLog",
    "UserWarnings",
    "error_line",
    "fail",
    "missing_list_text",
    "counts_text",
    "run_app",
    "summary_text",
    "unexpected",
]


def counts_text(counts: dict[str, int]) -> str:
    """``2 done, 1 failed`` (statuses with a count), or ``empty``."""
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "empty"


def summary_text(summary: Any) -> str:
    """The end-of-run lines; each failed row's error was printed when it failed, not again."""
    lines = [f"rows: {counts_text(summary.counts)} in {summary.seconds:.1f}s"]
    if summary.stage_seconds:
        lines.append(
            "time per stage: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in summary.stage_seconds.items())
        )
    if summary.slowest:
        lines.append("slowest: " + ", ".join(f"{s} {t:.1f}s" for s, t in summary.slowest[:3]))
    waiting = getattr(summary, "waiting", 0)
    if waiting:
        lines.append(
            f"{counted(waiting, 'failed row')} unchanged since {'it' if waiting == 1 else 'they'}"
            " failed: rerun with --retry-failed"
        )
    lines.append(f"process list: {summary.process_list}")
    if summary.results_csv:
        lines.append(f"results: {summary.results_csv}")
    return "\n".join(lines)


def fail(err: ClamHeatError) -> None:
    """End a command on a library error: its one line on stderr and its exit code."""
    import typer

    error_line(str(err))
    raise typer.Exit(err.exit_code)


def error_line(text: str) -> None:
    """Write ``error: text`` on stderr: one line per problem, never wrapped (greppable)."""
    lines = [" ".join(part.split()) for part in str(text).splitlines()]
    head, rest = lines[0], [line for line in lines[1:] if line]
    sys.stderr.write(f"error: {head}\n" + "".join(f"  {line}\n" for line in rest))
    sys.stderr.flush()


#: Exit codes (docs/reliability.md): all rows done; some rows failed; bad input
#: found before any work (config, list, flags, checkpoint, output folders); stopped by Ctrl-C
#: (SIGINT) or SIGTERM.
EXIT_DONE, EXIT_ROWS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class ToRunLog(logging.Handler):
    """Hands third-party log records and Python warnings to the ``clam_heat`` logger, whose
    only handler is the run's log file: nothing from a library reaches the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("clam_heat")
        if target.handlers and record.levelno >= logging.INFO:
            for handler in target.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


class UserWarnings(logging.Handler):
    """``warning: ...`` on stderr, one line each, for the records our code means for the user
    (the process list's skipped folder entries)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write("warning: " + " ".join(record.getMessage().split()) + "\n")


def _log_path() -> Path | None:
    for handler in logging.getLogger("clam_heat").handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def unexpected(err: BaseException) -> int:
    """One line for a bug or an unforeseen OS failure; the traceback goes to the run log (or to
    a file in the temp folder when the run log is not open yet)."""
    import tempfile
    import traceback

    from ..errors import os_error_advice

    path = _log_path()
    if path is not None:
        logging.getLogger("clam_heat").error("unexpected error", exc_info=err)
    else:
        path = Path(tempfile.gettempdir()) / f"clam_heat-error-{os.getpid()}.log"
        with contextlib.suppress(OSError):
            path.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
    if isinstance(err, OSError) and err.filename:
        text = f"{err.filename}: {os_error_advice(err.filename, err)} (traceback in {path})"
    else:
        text = f"unexpected {type(err).__name__}: {err} (a bug; the traceback is in {path})"
    error_line(text)
    return EXIT_ROWS_FAILED


def missing_list_text(path: Path) -> str:
    """'no such file' for a process list, naming a same-named list one folder down (the demo
    writes clam_heat_demo/process_lists/demo.csv) or the config form of the command."""
    near = sorted(Path().glob(f"*/{path}")) if not path.is_absolute() else []
    hint = (
        f"did you mean clam-heat status {near[0]}?"
        if near
        else "pass the list's path, or the run's YAML config (clam-heat status CONFIG)"
    )
    return f"{path}: process list file not found; {hint}"


def run_app(app: Any, argv: list[str] | None = None) -> int:
    """Run the Typer ``app`` on ``argv`` and return its exit code.

    Errors are one ``error:`` line on stderr (usage errors included); Python warnings and
    library logging go to the run log, never the terminal.
    """
    import warnings

    import typer

    try:
        from typer import _click as click  # typer vendors its own click (0.2x and later)
    except ImportError:  # pragma: no cover - older typer on the real click
        import click  # type: ignore[no-redef]

    forward = ToRunLog()
    user = UserWarnings(logging.WARNING)
    shown = logging.getLogger("clam_heat.process_list")
    root = logging.getLogger()
    root.addHandler(forward)
    shown.addHandler(user)
    logging.getLogger("clam_heat.notice").addHandler(user)  # e.g. --workers lowered
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.addHandler(forward)
    warnings_logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            logging.captureWarnings(True)
            try:
                code = app(args=argv, prog_name="clam-heat", standalone_mode=False)
            except click.exceptions.NoArgsIsHelpError:
                return EXIT_BAD_INPUT  # the help was printed (on stdout) as the error was made
            except click.exceptions.UsageError as err:
                command = err.ctx.command_path if err.ctx else "clam-heat"
                error_line(f"{err.format_message()} (see {command} --help)")
                return EXIT_BAD_INPUT
            except click.exceptions.ClickException as err:
                error_line(err.format_message())
                return err.exit_code
            except (typer.Abort, KeyboardInterrupt):
                sys.stderr.write("interrupted; rerun the same command to continue\n")
                return EXIT_INTERRUPTED
            except ClamHeatError as err:
                error_line(str(err))
                return err.exit_code
            except Exception as err:  # noqa: BLE001 - the one place that turns bugs into a line
                return unexpected(err)
            finally:
                logging.captureWarnings(False)
    finally:
        root.removeHandler(forward)
        shown.removeHandler(user)
        logging.getLogger("clam_heat.notice").removeHandler(user)
        warnings_logger.removeHandler(forward)
    return code if isinstance(code, int) else EXIT_DONE


def exit_now(code: int) -> None:
    """End the process with ``code`` without tearing the interpreter down.

    Why: freeing every module and object one by one at exit cost 0.15-0.2 CPU s once pandas and
    numpy are loaded, a fifth of a rerun with nothing to do. The exit handlers still run (they
    close the log files and let trackers finish) and stdout/stderr are flushed; every output
    file is already closed by then. With a non-daemon thread still alive the normal exit waits
    for it instead.
    """
    import atexit
    import threading

    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)
