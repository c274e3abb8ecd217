"""The recorder on a hand-built list: journal first, CSVs merged into the file on disk, replay
after a kill, and the list lock. Values are worked out by hand from the rows below."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from clam_heat.process_list.journal import RowJournal, journal_path
from clam_heat.process_list.lock import ListLockedError, list_lock, lock_path
from clam_heat.process_list.record import Recorder, replay_journal

LIST = (
    "slide_id,process,status,stage,error,updated_at,label,score\n"
    "a,1,tbp,,,,tumor,0.50\n"
    "b,1,done,sample,,2025-01-01T00:00:00+00:00,normal,1e3\n"
    "c,0,tbp,,,,normal,007\n"
)


@dataclass
class _Outcome:
    slide_id: str
    status: str = "done"
    stage: str = "sample"
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)


RESULT = {
    "bag_size": 59,
    "top_names": ["tumor", "normal"],
    "top_probs": [0.75, 0.25],
    "attention_mean": 0.1,
    "attention_std": 0.05,
}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _setup(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    path = tmp_path / "list.csv"
    path.write_text(LIST)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return path, tmp_path / "results.csv", df


def _text(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False).set_index("slide_id")


def test_outcomes_are_journaled_and_the_csvs_written_only_on_flush(tmp_path: Path) -> None:
    """Catches: a CSV rewrite per row (the quadratic cost), or a row lost before the flush."""
    path, results, df = _setup(tmp_path)
    clock = _Clock()
    with Recorder(df, path, results, n_classes=2, flush_seconds=30, clock=clock) as rec:
        rec.start(["a"])
        rec.record(_Outcome("a", result=RESULT))
        assert path.read_text() == LIST and not results.exists()  # nothing rewritten yet
        lines = [json.loads(x) for x in journal_path(path).read_text().splitlines()]
        assert [(e["slide_id"], e["status"]) for e in lines] == [("a", "running"), ("a", "done")]
        assert lines[0]["_prev"] == "tbp" and lines[1]["bag_size"] == 59
        clock.now = 31.0
        rec.record(_Outcome("c", status="failed", stage="", error="bad\n slide"))
        assert rec.flushes == 1  # the 30 s were up
    df = _text(path)
    assert df.loc["a", "status"] == "done" and df.loc["a", "bag_size"] == "59"
    assert (df.loc["a", "Pred_0"], df.loc["a", "p_0"], df.loc["a", "p_1"]) == (
        "tumor",
        "0.75",
        "0.25",
    )
    assert df.loc["c", "status"] == "failed" and df.loc["c", "error"] == "bad slide"
    # untouched cells keep their exact text
    assert list(df["score"]) == ["0.50", "1e3", "007"] and df.loc["b", "status"] == "done"
    assert df.loc["b", "bag_size"] == ""
    # the results CSV is the process == 1 rows of the list
    assert list(_text(results).index) == ["a", "b"]
    assert not journal_path(path).exists()  # emptied once both CSVs hold it


def test_flush_seconds_zero_writes_after_every_row(tmp_path: Path) -> None:
    path, results, df = _setup(tmp_path)
    with Recorder(df, path, results, n_classes=2, flush_seconds=0) as rec:
        rec.record(_Outcome("a", result=RESULT))
        assert _text(path).loc["a", "status"] == "done"
        assert _text(results).loc["a", "bag_size"] == "59"


def test_user_edits_made_during_the_run_survive_the_flush(tmp_path: Path) -> None:
    """Catches: writing the list from the driver's in-memory copy (the user's edits lost)."""
    path, results, df = _setup(tmp_path)
    with Recorder(df, path, results, n_classes=2, flush_seconds=3600) as rec:
        rec.start(["a", "b"])
        rec.record(_Outcome("a", result=RESULT))
        edited = pd.read_csv(path, dtype=str, keep_default_na=False)
        edited["note"] = ["x", "y", "z"]
        edited.loc[edited["slide_id"] == "b", "process"] = "0"
        edited.to_csv(path, index=False)
        rec.record(_Outcome("b", result=RESULT))
    df = _text(path)
    assert list(df["note"]) == ["x", "y", "z"]
    assert list(df["process"]) == ["1", "0", "0"]
    assert list(df["status"]) == ["done", "done", "tbp"]
    assert list(_text(results).index) == ["a"]  # b was set to process=0 during the run


def test_release_puts_unfinished_rows_back_to_their_old_status(tmp_path: Path) -> None:
    """Catches: a stopped run leaving 'running' rows, or a done row demoted to tbp."""
    path, results, df = _setup(tmp_path)
    with Recorder(df, path, results, n_classes=2, flush_seconds=0) as rec:
        rec.start(["a", "b", "c"])
        rec.record(_Outcome("c", result=RESULT))  # flushes: a and b show 'running' now
        assert list(_text(path)["status"]) == ["running", "running", "done"]
        assert sorted(rec.in_flight) == ["a", "b"]
        assert rec.release() == 2
    assert list(_text(path)["status"]) == ["tbp", "done", "done"]


def test_replay_after_a_kill_restores_finished_rows_and_drops_a_torn_line(
    tmp_path: Path,
) -> None:
    """Catches: finished rows lost by a kill between flushes, a torn last line breaking the
    replay, or rows replayed as 'running'."""
    path, results, df = _setup(tmp_path)
    rec = Recorder(df, path, results, n_classes=2, flush_seconds=3600)
    rec.start(["a", "b", "c"])
    rec.record(_Outcome("a", result=RESULT))
    rec.journal.close()  # the process dies here: no flush, no close
    with open(journal_path(path), "ab") as handle:
        handle.write(b'{"slide_id":"c","status":"do')  # torn by the kill
    assert path.read_text() == LIST
    assert replay_journal(path, results) == 3
    df = _text(path)
    assert list(df["status"]) == ["done", "done", "tbp"]  # b back to done, c back to tbp
    assert df.loc["a", "bag_size"] == "59" and list(_text(results).index) == ["a", "b"]
    assert not journal_path(path).exists()
    assert replay_journal(path, results) == 0  # nothing twice


def test_a_kill_after_a_flush_puts_rows_still_in_flight_back(tmp_path: Path) -> None:
    """Catches: a flush that empties the journal without writing back the rows still in
    flight, so the CSV (which now says 'running') is all a kill leaves of them."""
    path, results, df = _setup(tmp_path)
    clock = _Clock()
    rec = Recorder(df, path, results, n_classes=2, flush_seconds=30, clock=clock)
    rec.journal.open()
    rec.start(["a", "b", "c"])
    clock.now = 31.0
    rec.record(_Outcome("c", result=RESULT))  # the 30 s are up: a flush
    assert rec.flushes == 1
    assert list(_text(path)["status"]) == ["running", "running", "done"]
    rec.journal.close()  # the process dies here, a and b still in flight
    assert replay_journal(path, results) == 2
    df = _text(path)
    assert list(df["status"]) == ["tbp", "done", "done"]  # a and b back to what they were
    assert df.loc["c", "bag_size"] == "59"
    assert list(_text(results)["status"]) == ["tbp", "done"]  # the process == 1 rows


def test_journal_latest_folds_entries_per_slide(tmp_path: Path) -> None:
    with RowJournal(tmp_path / "l.csv") as journal:
        journal.append({"slide_id": "s", "status": "running"}, sync=False)
        journal.append_many([{"slide_id": "s", "status": "done", "bag_size": 3}])
    assert RowJournal(tmp_path / "l.csv").latest() == {
        "s": {"slide_id": "s", "status": "done", "bag_size": 3}
    }


HOLD = """
import sys, time
from clam_heat.process_list.lock import list_lock
with list_lock(sys.argv[1], shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(path: Path, mode: str = "exclusive") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_and_a_dead_holders_lock_is_taken_over(
    tmp_path: Path,
) -> None:
    """Catches: no lock, a lock that outlives a kill -9'd holder, or a message without the pid."""
    path = tmp_path / "list.csv"
    holder = _holder(path)
    try:
        with pytest.raises(ListLockedError) as err, list_lock(path):
            pass
        assert str(err.value).startswith(f"{path}: is being run by pid {holder.pid} on host ")
        assert str(err.value).endswith("; stop it or wait") and err.value.exit_code == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with list_lock(path):  # the kernel released the dead holder's flock
        info = json.loads(lock_path(path).read_text())
        assert info["pid"] == os.getpid()


def test_shard_runs_share_the_list_but_a_whole_list_run_waits(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    shard = _holder(path, "shared")
    try:
        with list_lock(path, shared=True):  # a second shard run goes side by side
            pass
        with pytest.raises(ListLockedError, match="a --shard run"), list_lock(path):
            pass
    finally:
        shard.send_signal(signal.SIGKILL)
        shard.wait()
