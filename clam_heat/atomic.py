"""One way to write a file: a unique temp file in the same folder, then ``os.replace``.

Readers therefore see either the old complete file or the new complete one, never a partial
write; a failure removes the temp file and raises :class:`~clam_heat.errors.OutputError` naming
the target and advice that fits the cause (disk full, permission denied).

Every temp name the package creates comes from :func:`temp_path_for`: hidden, ``.<name>.``
prefix, a random part, and :data:`TEMP_MARK` before the target's extension
(``.slide_heatmap.jpg.k2j3h4.tmp.jpg``). :func:`is_temp_name` recognises exactly those, so the
runner's start-up sweep (:func:`sweep_temp_files`) finds every leftover of a killed run and
nothing else.

Files are created with the permissions the user's umask gives any new file (0644 under umask
022, 0664 under 002), not ``mkstemp``'s private 0600, so outputs on a shared filesystem are
readable by the lab group as the user intends.

``durable=True`` fsyncs the data before the rename (one sync per file). Writers of many small
files (sampled patches) pass ``durable=False`` and call :func:`sync_paths` once at the end of
the stage, before its ledger entry says done.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError, os_error_advice

__all__ = [
    "TEMP_MARK",
    "atomic_path",
    "commit",
    "file_mode",
    "MAX_NAME_BYTES",
    "is_temp_name",
    "name_problem",
    "PROBE_NAME",
    "sweep_probe_files",
    "sweep_temp_files",
    "sweep_temp_files_of",
    "sync_paths",
    "temp_path_for",
    "write_bytes_atomic",
    "write_text_atomic",
]

TEMP_MARK = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_-]{4,}\.tmp(\.[A-Za-z0-9]+)?$")
_MODE: int | None = None


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (threads may be running)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits a new regular file gets here: ``0o666 & ~umask`` (cached per process)."""
    global _MODE
    if _MODE is None:
        _MODE = 0o666 & ~_current_umask()
    return _MODE


#: The longest name a config or list value may give one path segment (UTF-8 bytes): the
#: filesystem's usual 255-byte limit less room for the longest suffix we add to a slide id
#: (``_0.5_roi_0_blur_0_rs_1_bc_0_a_0.4_l_-1_bi_0_-1.0.jpg``) and a temp file's extra parts.
MAX_NAME_BYTES = 160


def name_problem(text: str) -> str | None:
    """Why ``text`` cannot be one path segment under an output root (None when it can).

    Every config or list value that names a folder or file (``save_exp_code``, slide ids,
    labels, label_dict names, sampler names) is checked with this before any work, so no
    output can land outside its root and no write fails later for a too-long name.

    >>> name_problem("LUAD") is None, name_problem("../x"), name_problem("..")
    (True, 'contains a path separator', "contains '..'")
    >>> name_problem("/abs"), name_problem("a\\nb"), name_problem("x" * 161)
    ('contains a path separator', 'contains a control character', 'is 161 bytes long (at most 160)')
    """
    if not text.strip():
        return "is empty"
    if "/" in text or "\\" in text or (os.altsep is not None and os.altsep in text):
        return "contains a path separator"
    if ".." in text:
        return "contains '..'"
    if text == ".":
        return "is '.'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return "contains a control character"
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (at most {MAX_NAME_BYTES})"
    return None


def is_temp_name(name: str) -> bool:
    """True for names made by :func:`temp_path_for` (and only those).

    >>> is_temp_name(".a_heatmap.jpg.x8ak2p1q.tmp.jpg"), is_temp_name(".list.csv.abcd12.tmp")
    (True, True)
    >>> is_temp_name("a.tmp"), is_temp_name(".hidden"), is_temp_name(".x.tmp")
    (False, False, False)
    """
    return bool(_TEMP_NAME.match(name))


def temp_path_for(target: str | os.PathLike[str], *, tag: str = "") -> Path:
    """Create an empty, uniquely named temp file beside ``target`` and return its path.

    The name keeps ``target``'s extension (libraries pick the format from it) and carries
    ``tag`` (e.g. ``spool``) for files that are never renamed into place. The folder is created.
    """
    target = Path(target)
    prefix = f".{target.name}.{tag + '-' if tag else ''}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=target.parent, prefix=prefix, suffix=f"{TEMP_MARK}{target.suffix}"
        )
    except OSError as err:
        raise OutputError(f"{target}: cannot write here; {os_error_advice(target, err)}") from None
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(name)


def commit(tmp: str | os.PathLike[str], target: str | os.PathLike[str], *, durable: bool) -> Path:
    """Move a finished temp file into place (fsync first when ``durable``); returns ``target``."""
    tmp, target = Path(tmp), Path(target)
    try:
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"{target}: cannot write (moving the finished file into place failed); "
            f"{os_error_advice(target, err)}"
        ) from None
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path to write ``target`` through (for writers that need a file name:
    h5py, tifffile, OpenCV); committed when the block ends, removed if it raises."""
    tmp = temp_path_for(target)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, target, durable=durable)


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes | memoryview, *, durable: bool = True
) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    target = Path(path)
    with atomic_path(target, durable=durable) as tmp:
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
        except OSError as err:
            raise OutputError(f"{target}: cannot write; {os_error_advice(target, err)}") from None
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def sync_paths(paths: Iterable[str | os.PathLike[str]]) -> None:
    """fsync each file and each distinct parent folder once (a stage's outputs become durable
    together, before its ledger entry says done). Missing files are ignored."""
    folders: set[Path] = set()
    for path in paths:
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(path.parent)
    for folder in folders:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _remove_if_ours(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file (never a symlink: its target may be anyone's)
    whose name our scheme makes; True if removed."""
    if not is_temp_name(path.name):
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        path.unlink()
    except OSError:
        return False
    return True


def sweep_temp_files(*roots: str | os.PathLike[str]) -> int:
    """Delete temp files a killed run left under ``roots``; returns how many.

    Only names :func:`temp_path_for` makes, only regular files, only in folders reached from a
    root without following a symbolic link (a link to a folder elsewhere is never entered, a
    link with a temp-like name is never removed), so nothing outside the roots is touched.
    Only call it while no other run writes under ``roots`` (the driver holds the list's lock).
    """
    removed = 0
    for root in roots:
        root = Path(root)
        if root.is_symlink() or not root.is_dir():
            continue  # a root that is a link was not made by us: leave it alone
        for folder, _dirs, files in os.walk(root, followlinks=False):
            for name in files:
                removed += _remove_if_ours(Path(folder, name))
    return removed


#: The start-up probe's file name in each output folder (see :mod:`clam_heat.preflight`).
PROBE_NAME = ".clam_heat_probe"


def sweep_probe_files(folders: Iterable[str | os.PathLike[str]], *, min_age: float = 60) -> int:
    """Delete start-up probe files that a run killed during its probe left in ``folders``.

    A live probe exists for milliseconds, so only files older than ``min_age`` seconds go
    (another list's run may be probing the same folder right now).
    """
    removed = 0
    now = time.time()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.glob(glob.escape(f".{PROBE_NAME}.probe-") + "*"):
            with contextlib.suppress(OSError):
                if now - os.lstat(path).st_mtime >= min_age:
                    removed += _remove_if_ours(path)
    return removed


def sweep_temp_files_of(*files: str | os.PathLike[str]) -> int:
    """Delete the temp files a killed run left beside ``files``, and nothing else in their
    folders (which may hold other lists and their live writes)."""
    removed = 0
    for target in files:
        target = Path(target)
        if not target.parent.is_dir():
            continue
        for path in target.parent.glob(glob.escape(f".{target.name}.") + "*"):
            removed += _remove_if_ours(path)
    return removed
