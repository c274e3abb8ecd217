"""Per-slide JSON ledger: what each stage last produced, from which inputs and parameters.

Protocol (as snakemake's persistence): a stage is *marked started* before it writes anything,
its outputs are written to temp files and renamed into place, synced to disk together, and only
then is the record completed with the fingerprint and each output's identity (size and mtime).
A stage reruns when its record is missing, still marked started (interrupted, e.g. by kill -9),
any recorded output is gone or no longer has the recorded size and mtime (truncated, rewritten),
or its fingerprint differs. The
ledger itself is replaced atomically; an unreadable ledger is treated as empty (everything reruns)
rather than trusted.

Input files up to :data:`HASH_LIMIT_BYTES` are identified by content (sha256), so rewriting
identical bytes invalidates nothing. The ledger also keeps each hashed input's digest with the
file's inode, size, mtime and ctime when it was read (``digests``): while all four are
unchanged the digest is reused, so checking a done row reads no input file (a rerun of 10,000
rows would otherwise read every feature file again from shared storage); any rewrite changes
them, and the file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: Bump when the record layout changes; older records are not trusted.
RECORD_FORMAT_VERSION = 1

#: Files up to this size are identified by content hash, larger ones by size + mtime.
HASH_LIMIT_BYTES = 64 * 1024 * 1024

__all__ = [
    "Ledger",
    "Reason",
    "file_identity",
    "fingerprint_diff",
    "now_iso",
    "output_identity",
    "write_bytes_atomic",
    "write_text_atomic",
]


def output_identity(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a finished output (None: missing); cheap, no read of the data.

    Recorded when its stage is marked done and compared on the next plan: a truncated or
    rewritten output makes its stage rerun.
    """
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def now_iso() -> str:
    """UTC timestamp, second precision, for CSV ``updated_at`` and records."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def file_identity(path: Path) -> dict[str, Any]:
    """Identity of an input file: sha256 for small files, size + mtime for large ones; a
    folder (a ``save_pretrained`` checkpoint) is identified by its files.

    Content hashes mean a rerun that rewrites identical bytes does not invalidate downstream
    stages; huge slides are identified cheaply.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {"path": str(path), "missing": True}
    if path.is_dir():  # a checkpoint saved as a folder (save_pretrained): its files' identities
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return {"path": str(path), "files": {p.name: file_identity(p) for p in files}}
    ident: dict[str, Any] = {"path": str(path), "size": stat.st_size}
    if stat.st_size <= HASH_LIMIT_BYTES:
        ident["sha256"] = _sha256(path, stat)
    else:
        ident["mtime_ns"] = stat.st_mtime_ns
    return ident


#: path -> ((inode, size, mtime_ns, ctime_ns), sha256) of the version last hashed or read from
#: a ledger: every stage of a row fingerprints the same slide and H5, and hashing them again each
#: time was a visible part of a small slide's run.
_DIGESTS: dict[str, tuple[tuple[int, int, int, int], str]] = {}
_DIGESTS_KEPT = 4096


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What any rewrite of a file changes, in place or through a temp file and a rename."""
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _keep_digest(path: str, signature: tuple[int, int, int, int], digest: str) -> None:
    if len(_DIGESTS) >= _DIGESTS_KEPT and path not in _DIGESTS:
        _DIGESTS.pop(next(iter(_DIGESTS)))  # the oldest: a long run keeps its latest rows'
    _DIGESTS[path] = (signature, digest)


def _sha256(path: Path, stat: os.stat_result) -> str:
    """Content hash of ``path``, computed once per version of the file: reused while the file's
    :func:`_signature` is the one it was hashed (or recorded in a ledger) with."""
    signature = _signature(stat)
    known = _DIGESTS.get(str(path))
    if known is not None and known[0] == signature:
        return known[1]
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    _keep_digest(str(path), signature, digest)
    return digest


def _hashed_paths(value: Any) -> Iterator[str]:
    """The paths of the content-hashed file identities anywhere in a fingerprint."""
    if isinstance(value, Mapping):
        if "sha256" in value and isinstance(value.get("path"), str):
            yield value["path"]
        for item in value.values():
            yield from _hashed_paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _hashed_paths(item)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two fingerprints, with old -> new values.

    >>> fingerprint_diff({"params": {"alpha": 0.4}}, {"params": {"alpha": 0.5}})
    ['params.alpha 0.4 -> 0.5']
    """
    flat_old, flat_new = _flatten(old), _flatten(new)
    changes: list[str] = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "<absent>"), flat_new.get(key, "<absent>")
        if a == b:
            continue
        parent, _, leaf = key.rpartition(".")
        if parent and leaf in _IDENTITY_KEYS:  # a file's content: say so once, not per field
            text = f"{parent} changed"
            if text not in changes:
                changes.append(text)
        else:
            changes.append(f"{key} {a} -> {b}")
    return changes


_IDENTITY_KEYS = frozenset({"sha256", "size", "mtime_ns", "missing"})


@dataclass(frozen=True)
class Reason:
    """Why a stage will run (``None`` from :meth:`Ledger.reason` means up to date)."""

    kind: str  # never-run | interrupted | output-missing | output-changed | changed | ...
    detail: str = ""

    def __str__(self) -> str:
        labels = {
            "never-run": "no previous run",
            "interrupted": "previous run was interrupted",
            "output-missing": "output missing",
            "output-changed": "output changed",
            "changed": "changed",
            "ledger-version": "ledger written by an older format",
            "upstream": "upstream stage reruns",
            "failed": "previous run failed",
        }
        text = labels.get(self.kind, self.kind)
        return f"{text}: {self.detail}" if self.detail else text


@dataclass
class Ledger:
    """The JSON ledger of one slide (``<raw slide dir>/<slide_id>.ledger.json``)."""

    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: path -> [inode, size, mtime_ns, ctime_ns, sha256] of the inputs the stages hashed
    digests: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text("utf-8"))
            if data.get("record_format_version") != RECORD_FORMAT_VERSION:
                log.warning(
                    "%s: ledger format %s not trusted; stages rerun",
                    path,
                    data.get("record_format_version"),
                )
                return cls(path)
            ledger = cls(path, dict(data.get("stages", {})), dict(data.get("digests", {})))
            ledger._share_digests()
            return ledger
        except (OSError, ValueError, AttributeError, TypeError) as err:
            log.warning("%s: unreadable ledger (%s); treating as empty", path, err)
            return cls(path)

    def _share_digests(self) -> None:
        """Offer the recorded digests to :func:`_sha256` (each still checked against the file's
        current signature before it is used)."""
        for path, entry in self.digests.items():
            if isinstance(entry, list) and len(entry) == 5 and isinstance(entry[4], str):
                known = _DIGESTS.get(path)
                if known is None or known[1] != entry[4]:
                    _keep_digest(path, tuple(int(v) for v in entry[:4]), entry[4])  # type: ignore[arg-type]

    def _record_digests(self, fingerprint: Mapping[str, Any]) -> None:
        """Keep the signature each hashed input of ``fingerprint`` had when it was hashed."""
        for path in _hashed_paths(fingerprint):
            known = _DIGESTS.get(path)
            if known is not None:
                self.digests[path] = [*known[0], known[1]]

    def save(self) -> None:
        current = {path for rec in self.stages.values() for path in _hashed_paths(rec)}
        self.digests = {path: v for path, v in self.digests.items() if path in current}
        payload = {
            "record_format_version": RECORD_FORMAT_VERSION,
            "package_version": __version__,
            "stages": self.stages,
            "digests": self.digests,
        }
        write_text_atomic(self.path, json.dumps(payload, indent=1, sort_keys=True, default=str))

    def record(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def reason(
        self,
        stage: str,
        fingerprint: Mapping[str, Any],
        outputs: Iterable[Path] | Callable[[], Iterable[Path]] = (),
    ) -> Reason | None:
        """Why ``stage`` must run given its current fingerprint, or None when up to date.

        ``outputs`` (the stage's current output paths) may be a function, called only when
        everything else says up to date: naming them can mean opening the slide (CLAM's
        ``vis_level: -1``), which a row that must run anyway, or a dry run of a new list, need
        not pay for."""
        rec = self.stages.get(stage)
        if rec is None:
            return Reason("never-run")
        if rec.get("state") == "failed":
            return Reason("failed", str(rec.get("error", "")))
        if rec.get("state") != "done":
            return Reason("interrupted", f"started {rec.get('started_at', '?')}")
        for out in rec.get("outputs", []):
            if not Path(out).exists():
                return Reason("output-missing", Path(out).name)
        for out, ident in rec.get("output_ids", {}).items():  # absent in older records
            if output_identity(Path(out)) != list(ident):
                return Reason("output-changed", Path(out).name)
        changes = fingerprint_diff(rec.get("fingerprint", {}), fingerprint)
        if changes:
            return Reason("changed", "; ".join(changes[:4]) + (" ..." if len(changes) > 4 else ""))
        if callable(outputs):
            outputs = outputs()
        for out in outputs:  # e.g. a file name that depends on a key not in the fingerprint
            if not Path(out).exists():
                return Reason("output-missing", Path(out).name)
        return None

    def mark_started(self, stage: str) -> None:
        previous = self.stages.get(stage, {})
        self.stages[stage] = {
            "state": "started",
            "started_at": now_iso(),
            # keep the previous outputs listed so a rerun can clean files it no longer writes
            "outputs": previous.get("outputs", []),
        }
        self.save()

    def mark_done(
        self,
        stage: str,
        fingerprint: Mapping[str, Any],
        outputs: Iterable[Path],
        *,
        seconds: float,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        rec = self.stages.get(stage, {})
        outputs = [Path(p) for p in outputs]
        self._record_digests(fingerprint)
        self.stages[stage] = {
            "state": "done",
            "started_at": rec.get("started_at", now_iso()),
            "finished_at": now_iso(),
            "seconds": round(seconds, 3),
            "fingerprint": dict(fingerprint),
            "outputs": [str(p) for p in outputs],
            "output_ids": {str(p): output_identity(p) for p in outputs},
            "result": dict(result or {}),
        }
        self.save()

    def mark_failed(self, stage: str, fingerprint: Mapping[str, Any] | None, error: str) -> None:
        """Record that ``stage`` failed, with the fingerprint it failed under (None: computing
        it failed), so a later run can tell whether anything it depends on changed since."""
        previous = self.stages.get(stage, {})
        self.stages[stage] = {
            "state": "failed",
            "started_at": previous.get("started_at", now_iso()),
            "finished_at": now_iso(),
            "fingerprint": None if fingerprint is None else dict(fingerprint),
            "error": error,
            "outputs": previous.get("outputs", []),  # cleaned by the next successful run
        }
        self.save()

    def changed_since_failure(
        self, stage: str, fingerprint: Mapping[str, Any] | None
    ) -> Reason | None:
        """Why a stage recorded as failed should run again on its own (None: nothing it
        depends on changed, so it waits for ``--retry-failed``). ``fingerprint`` is the current
        one, None when it cannot be computed now."""
        rec = self.stages.get(stage) or {}
        old = rec.get("fingerprint")
        if fingerprint is None:
            return None  # still cannot even fingerprint: nothing to rerun with
        if old is None:
            return Reason("changed", "its inputs can be read now")
        changes = fingerprint_diff(old, fingerprint)
        if changes:
            return Reason("changed", "; ".join(changes[:4]) + (" ..." if len(changes) > 4 else ""))
        return None


class Timer:
    """Tiny wall-clock helper for per-stage timings."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
