"""The ledger decides what reruns: each reason, atomicity and robustness to corrupt records."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from clam_heat import ledger as ledger_mod
from clam_heat.errors import OutputError
from clam_heat.ledger import Ledger, Reason, file_identity, fingerprint_diff, write_text_atomic


def _done(tmp_path: Path, fingerprint: dict, outputs: list[Path]) -> Ledger:
    led = Ledger(tmp_path / "s.ledger.json")
    led.mark_started("segment")
    for out in outputs:
        out.write_text("x")
    led.mark_done("segment", fingerprint, outputs, seconds=0.1, result={"n": 1})
    return Ledger.load(led.path)


def test_never_run_then_up_to_date(tmp_path: Path) -> None:
    led = Ledger.load(tmp_path / "s.ledger.json")
    assert led.reason("segment", {"a": 1}) == Reason("never-run")
    out = tmp_path / "mask.jpg"
    led = _done(tmp_path, {"a": 1}, [out])
    assert led.reason("segment", {"a": 1}) is None
    assert led.record("segment")["result"] == {"n": 1}


def test_interrupted_stage_is_not_trusted(tmp_path: Path) -> None:
    led = _done(tmp_path, {"a": 1}, [tmp_path / "o"])
    led.mark_started("segment")  # a crash right after this leaves the mark
    reloaded = Ledger.load(led.path)
    reason = reloaded.reason("segment", {"a": 1})
    assert reason is not None and reason.kind == "interrupted"


def test_missing_output_and_changed_key(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    led = _done(tmp_path, {"params": {"alpha": 0.4}, "package_version": "1"}, [out])
    changed = led.reason("segment", {"params": {"alpha": 0.5}, "package_version": "1"})
    assert str(changed) == "changed: params.alpha 0.4 -> 0.5"
    out.unlink()
    assert str(led.reason("segment", {"params": {"alpha": 0.4}, "package_version": "1"})) == (
        "output missing: o.h5"
    )


def test_corrupt_or_old_ledger_is_treated_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "s.ledger.json"
    path.write_text('{"record_format_version": 1, "stages": {"segm')  # truncated
    assert Ledger.load(path).stages == {}
    path.write_text(json.dumps({"record_format_version": 0, "stages": {"segment": {}}}))
    assert Ledger.load(path).stages == {}


def test_file_identity_hashes_small_files_and_stats_large(tmp_path: Path, monkeypatch) -> None:
    small = tmp_path / "a.bin"
    small.write_bytes(b"abc")
    ident = file_identity(small)
    assert ident["sha256"].startswith("ba7816bf")
    monkeypatch.setattr(ledger_mod, "HASH_LIMIT_BYTES", 1)
    big = file_identity(small)
    assert "sha256" not in big and big["mtime_ns"] == small.stat().st_mtime_ns
    assert file_identity(tmp_path / "nope")["missing"] is True


def test_file_identity_sees_rewrites_of_a_hashed_file(tmp_path: Path) -> None:
    """Digests are memoised per file version: same-size rewrites, in place or by rename, and a
    file with the same bytes elsewhere are all told apart correctly."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"weights-1")
    first = file_identity(path)
    assert file_identity(path) == first
    time.sleep(0.02)  # past the file system's timestamp granularity
    with path.open("r+b") as handle:  # same size, same inode
        handle.write(b"WEIGHTS-2")
    in_place = file_identity(path)
    assert in_place["sha256"] != first["sha256"]
    other = tmp_path / "tmp.pt"
    other.write_bytes(b"weights-1")
    os.replace(other, path)  # atomic replace with the original bytes
    assert file_identity(path)["sha256"] == first["sha256"]


def test_a_later_process_reuses_the_recorded_digest_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger keeps each hashed input's digest with the file's signature: a later process
    (the in-memory memo cleared) identifies the unchanged file without reading it, a rewrite
    with the same bytes is read again and still matches, and other bytes differ. Catches a
    rerun that re-reads every feature file, and a recorded digest trusted after a rewrite."""
    h5 = tmp_path / "slide.h5"
    h5.write_bytes(b"features-1")
    fingerprint = {"features": file_identity(h5), "alpha": 0.4}
    _done(tmp_path, fingerprint, [])
    reads: list[str] = []
    real_sha256 = ledger_mod.hashlib.sha256

    class Counting:
        def __init__(self) -> None:
            self._h = real_sha256()
            reads.append("read")

        def update(self, chunk: bytes) -> None:
            self._h.update(chunk)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(ledger_mod.hashlib, "sha256", Counting)
    monkeypatch.setattr(ledger_mod, "_DIGESTS", {})  # a new process
    ledger = Ledger.load(tmp_path / "s.ledger.json")
    assert ledger.reason("segment", {"features": file_identity(h5), "alpha": 0.4}) is None
    assert reads == []
    time.sleep(0.02)
    other = tmp_path / "new.h5"
    other.write_bytes(b"features-1")
    os.replace(other, h5)  # the same bytes, a new file
    assert ledger.reason("segment", {"features": file_identity(h5), "alpha": 0.4}) is None
    assert reads == ["read"]
    h5.write_bytes(b"features-2")
    assert ledger.reason("segment", {"features": file_identity(h5), "alpha": 0.4}) is not None
    assert reads == ["read", "read"]


def test_fingerprint_diff_reports_file_changes_compactly() -> None:
    old = {"checkpoint": {"path": "c.pt", "sha256": "aa"}}
    new = {"checkpoint": {"path": "c.pt", "sha256": "bb"}}
    assert fingerprint_diff(old, new) == ["checkpoint changed"]


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "x.json"
    write_text_atomic(target, "old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OutputError, match="x.json: cannot write"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_checkpoint_folder_is_identified_by_its_files(tmp_path: Path) -> None:
    """Catches: a save_pretrained folder crashing the fingerprint (IsADirectoryError) or a
    changed weights file inside it not changing the identity (the infer stage would not rerun)."""
    from clam_heat.ledger import file_identity

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a")
    before = file_identity(folder)
    assert set(before["files"]) == {"config.json", "model.safetensors"}
    (folder / "model.safetensors").write_bytes(b"b")
    assert file_identity(folder) != before
