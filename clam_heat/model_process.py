"""The model process: where a run that has not loaded torch runs the work that needs it.

Why: importing torch costs 1.7 CPU s and ~200 MB of resident memory that never leaves the
process. A run's driver draws heatmaps (at vis_level 0, hundreds of MB of pixel buffers) and
saves patches; none of that needs torch. So the driver forks one helper at start-up, while it
is still small and single-threaded (before any slide is opened or OpenCV starts its threads),
and sends it each call that needs a model (:func:`call`): the helper imports torch and loads
the model on its first call and keeps them for the next rows. The driver's peak memory is then
its own pixel work, and a run with nothing to do never imports torch at all.

The helper runs one call at a time and sends back the result or the exception (a ClamHeatError
keeps its type and message); a call that kills it (out of memory, a segfault in a library) is a
:class:`ModelProcessError` for that call, and later calls run in the calling process.

Without a helper (none started, torch already imported here, no ``fork`` on this platform,
``CLAM_HEAT_MODEL_PROCESS=0``) :func:`call` simply calls the function here, so local pool
workers, Dask workers and tests run exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import ClamHeatError

log = logging.getLogger(__name__)

__all__ = ["ModelProcessError", "call", "hosting", "is_running", "release"]

T = TypeVar("T")

#: Set to 0 to run everything in the driver (for debugging with pdb, or profiling one process).
ENV_SWITCH = "CLAM_HEAT_MODEL_PROCESS"


class ModelProcessError(ClamHeatError):
    """The model process died during a call (or an error it raised could not be sent back)."""


class _Helper:
    """One forked child and the driver's end of its pipe."""

    def __init__(self) -> None:
        from multiprocessing import Pipe

        parent, child = Pipe(duplex=True)
        self.dead = False
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the subprocess tests
            parent.close()
            _serve(child)
        child.close()
        self.pid = pid
        self.conn = parent

    def call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            self.conn.send((fn, args))
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            why = self.stop(kill=True)
            self.dead = True
            raise ModelProcessError(
                f"the model process died ({why}) in {_name(fn)}; often out of memory: check the "
                "run log, then rerun (later rows run in the driver process)"
            ) from None
        except BaseException:  # a stop signal or Ctrl-C while it works: it must not go on
            self.stop(kill=True)
            self.dead = True
            raise
        if status == "ok":
            return payload
        raise _rebuilt(payload)

    def stop(self, *, kill: bool = False) -> str:
        """End the child (politely, or SIGKILL) and reap it; returns how it ended."""
        with contextlib.suppress(OSError, ValueError):
            if kill:
                os.kill(self.pid, signal.SIGKILL)
            else:
                self.conn.send(None)
        with contextlib.suppress(OSError):
            self.conn.close()
        try:
            _pid, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "gone"
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit code {os.WEXITSTATUS(status)}"


_HELPER: _Helper | None = None


def _serve(conn: Any) -> None:  # pragma: no cover - runs in the child
    """The child's loop: run each (fn, args), send ("ok", result) or ("error", details)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's stop handler
    code = 0
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the driver went away
                break
            if message is None:
                break
            fn, args = message
            try:
                reply: tuple[str, Any] = ("ok", fn(*args))
            except BaseException as err:  # noqa: BLE001 - every failure goes back to the driver
                if not isinstance(err, ClamHeatError):  # its frames exist only here: log them
                    log.error("model process: %s failed\n%s", _name(fn), traceback.format_exc())
                reply = ("error", _error_payload(err))
            try:
                conn.send(reply)
            except (TypeError, pickle.PicklingError, AttributeError) as err:
                conn.send(("error", _error_payload(err)))
    except BaseException:  # noqa: BLE001 - never fall back into the driver's code
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _error_payload(err: BaseException) -> tuple[str, bytes | str]:
    """The exception in a form that crosses the pipe: pickled whole when it round-trips, else
    its class, args and attributes (an ``__init__`` with other parameters than its message does
    not unpickle), else its type name and text."""
    whole = _round_trip(err)
    if whole is not None:
        return "whole", whole
    parts = _round_trip((type(err), err.args, dict(vars(err))))
    if parts is not None:
        return "parts", parts
    return "text", f"{type(err).__name__}: {' '.join(str(err).split())}"


def _round_trip(value: object) -> bytes | None:
    try:
        blob = pickle.dumps(value)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - anything that does not pickle is sent another way
        return None
    return blob


def _rebuilt(payload: tuple[str, bytes | str]) -> BaseException:
    how, data = payload
    if how == "whole":
        return pickle.loads(data)  # type: ignore[arg-type]
    if how == "parts":
        cls, args, state = pickle.loads(data)  # type: ignore[arg-type]
        err = cls.__new__(cls)
        err.args = args
        err.__dict__.update(state)
        return err
    return ModelProcessError(str(data))


def _name(fn: Callable[..., Any]) -> str:
    owner = getattr(fn, "__self__", None)
    return repr(owner) if owner is not None else getattr(fn, "__qualname__", repr(fn))


def is_running() -> bool:
    """Whether calls go to a model process now."""
    return _HELPER is not None


def call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the model process when one runs, else here.

    ``fn`` and ``args`` must pickle (a module-level function, or a method of a picklable
    object, such as a stage); so must the result. A child that died is not replaced: the calls
    after it run here (forking now, with slides open and library threads running, is not safe).
    """
    global _HELPER
    helper = _HELPER
    if helper is None:
        return fn(*args)
    try:
        return helper.call(fn, args)
    finally:
        if helper.dead and _HELPER is helper:
            _HELPER = None


def release() -> None:
    """Stop the model process now; later calls run here. For a run whose rows go to worker
    processes (they run their model stages themselves): the helper, which then holds torch and
    a model for nothing, should not sit beside them."""
    global _HELPER
    helper, _HELPER = _HELPER, None
    if helper is not None:
        helper.stop()


def _can_host() -> bool:
    return (
        hasattr(os, "fork")
        and sys.platform.startswith("linux")
        and os.environ.get(ENV_SWITCH, "1") != "0"
        and "torch" not in sys.modules  # already paid here: no gain in another process
        # fork copies only the calling thread: a lock another thread holds (logging, imports,
        # a test runner's I/O) would stay locked in the child forever
        and threading.active_count() == 1
    )


@contextlib.contextmanager
def hosting() -> Iterator[bool]:
    """Start the model process for the duration of a ``with`` block (when it helps: see the
    module docstring); yields whether one runs. Nested blocks share the outer one."""
    global _HELPER
    if _HELPER is not None or not _can_host():
        yield _HELPER is not None
        return
    _HELPER = _Helper()
    helper = _HELPER
    try:
        yield True
    finally:
        if _HELPER is helper:
            _HELPER = None
        helper.stop()
