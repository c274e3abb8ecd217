"""Executors (serial, local process pool, Dask) and sharding for job arrays.

Unit tests use real spawned processes and real CSV files; the end-to-end tests run the demo
project through every executor (a real ``distributed.LocalCluster`` included) and compare the
outputs byte for byte with a serial run. Faults are injected only through the test helper
``stage_faults`` (a worker ``os._exit``s inside a chosen stage, the stages wrapped through the
public registry) or by SIGKILL-ing a real worker process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import stage_faults  # tests/helpers, on sys.path via conftest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clam_heat import executors as ex
from clam_heat.config import HeatmapConfig, load_config
from clam_heat.errors import ConfigError, ProcessListError
from clam_heat.executors import (
    DaskExecutor,
    ExecutorError,
    LocalExecutor,
    make_executor,
)
from clam_heat.executors import base as ex_base
from clam_heat.executors import local as ex_local
from clam_heat.process_list import find_shards, merge_process_list, merge_shards, parse_shard
from clam_heat.process_list.shards import select_shard, shard_frame, shard_of, shard_path
from clam_heat.rows import RowContext

# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def test_threads_per_worker_never_oversubscribes() -> None:
    for cores in range(1, 33):
        for workers in range(1, 17):
            threads = ex.threads_per_worker(cores, workers)
            assert threads >= 1
            assert threads * workers <= max(cores, workers)


def test_pin_device_round_robin_over_gpus() -> None:
    assert [ex.pin_device("cuda", i, 3) for i in range(4)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
    ]
    assert ex.pin_device("cpu", 1, 4) == "cpu"
    assert ex.pin_device("cuda:2", 0, 4) == "cuda:2"  # explicit device wins
    assert ex.pin_device("auto", 5, 0) == "auto"  # CPU-only host


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4", "--shard '4': expected i/n, e.g. --shard 0/4"),
        ("4/4", "--shard '4/4': need 0 <= i < n (shards are numbered from 0)"),
        ("0/0", "--shard '0/0': need 0 <= i < n (shards are numbered from 0)"),
        ("-1/4", "--shard '-1/4': expected i/n, e.g. --shard 0/4"),
    ],
)
def test_parse_shard_rejects_bad_values(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_shard(text)
    assert str(info.value) == message
    assert info.value.exit_code == 2


def test_shard_of_is_a_stable_hash_not_python_hash() -> None:
    # independent of PYTHONHASHSEED: the first 8 bytes of sha256, big-endian, mod n
    expected = int.from_bytes(hashlib.sha256(b"demo_003").digest()[:8], "big") % 7
    assert shard_of("demo_003", 7) == expected
    counts = [0] * 4
    for k in range(400):
        counts[shard_of(f"slide_{k}", 4)] += 1
    assert all(70 <= c <= 130 for c in counts), counts


class _Row:
    def __init__(self, slide_id: str) -> None:
        self.slide_id = slide_id


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=30),
    n=st.integers(1, 6),
    by=st.sampled_from(["hash", "position"]),
)
def test_select_shard_partitions_the_rows(ids: list[str], n: int, by: str) -> None:
    rows = [_Row(s) for s in ids]
    shards = [select_shard(rows, i, n, by=by) for i in range(n)]
    seen = [r.slide_id for shard in shards for r in shard]
    assert sorted(seen) == sorted(ids)  # every row in exactly one shard
    for shard in shards:  # list order is kept inside a shard
        assert [r.slide_id for r in shard] == [s for s in ids if s in {r.slide_id for r in shard}]
    if by == "position":
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_hash_shards_do_not_move_when_rows_are_added() -> None:
    before = {
        s: i
        for i in range(3)
        for s in (r.slide_id for r in select_shard([_Row(f"s{k}") for k in range(20)], i, 3))
    }
    grown = [_Row(f"new{k}") for k in range(5)] + [_Row(f"s{k}") for k in range(20)]
    after = {s: i for i in range(3) for s in (r.slide_id for r in select_shard(grown, i, 3))}
    assert all(after[s] == shard for s, shard in before.items())


def test_shard_path_and_find_shards(tmp_path: Path) -> None:
    plist = tmp_path / "demo.csv"
    assert shard_path(plist, 1, 4) == tmp_path / "demo.shard-1-of-4.csv"
    for name in (
        "demo.shard-1-of-4.csv",
        "demo.shard-0-of-4.csv",
        "demo.shard-0-of-2.csv",
        "other.shard-0-of-4.csv",
        "demo.shard-x-of-4.csv",
        "demo.csv",
    ):
        (tmp_path / name).write_text("slide_id\n")
    assert [p.name for p in find_shards(plist)] == [
        "demo.shard-0-of-2.csv",
        "demo.shard-0-of-4.csv",
        "demo.shard-1-of-4.csv",
    ]


def test_exit_reasons() -> None:
    assert ex_base._exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    code = stage_faults.FAULT_EXIT_CODE
    assert ex_base._exit_reason(code) == f"exit code {code}"


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------

LIST_TEXT = (
    "slide_id,label,process,sthresh,my_note,status,stage,error,updated_at\n"
    "a,tumour,1,8,keep 007,tbp,,,\n"
    'b,normal,1,,"x, y",done,sample,,2030-01-02T00:00:00+00:00\n'
    "c,normal,0,15,15.50,tbp,,,\n"
    "d,tumour,1,8,,failed,infer,old error,2030-01-01T00:00:00+00:00\n"
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_merge_takes_run_columns_from_newer_shard_rows_only(tmp_path: Path) -> None:
    plist = _write(tmp_path / "demo.csv", LIST_TEXT)
    # shard 0 ran a (new results columns appear) and b, but b's list row is newer
    _write(
        shard_path(plist, 0, 2),
        (
            "slide_id,label,process,sthresh,my_note,status,stage,error,updated_at,bag_size,Pred_0,p_0\n"
            "a,EDITED,1,9,changed,done,sample,,2030-01-03T00:00:00+00:00,42,tumour,0.9\n"
            'b,normal,1,,"x, y",failed,segment,boom,2030-01-01T00:00:00+00:00,,,\n'
        ),
    )
    # shard 1 ran d again (now done) and knows a row the user since removed from the list
    _write(
        shard_path(plist, 1, 2),
        (
            "slide_id,status,stage,error,updated_at,bag_size\n"
            "d,done,sample,,2030-01-05T00:00:00+00:00,7\n"
            "zz,done,sample,,2030-01-05T00:00:00+00:00,3\n"
        ),
    )
    report = merge_process_list(plist, results_csv=tmp_path / "results" / "demo.csv")
    assert report.rows_taken == 2 and report.unknown == ["zz"]
    assert [p.name for p in report.shards] == ["demo.shard-0-of-2.csv", "demo.shard-1-of-2.csv"]
    assert plist.read_text() == (
        "slide_id,label,process,sthresh,my_note,status,stage,error,updated_at,bag_size,Pred_0,p_0\n"
        "a,tumour,1,8,keep 007,done,sample,,2030-01-03T00:00:00+00:00,42,tumour,0.9\n"
        'b,normal,1,,"x, y",done,sample,,2030-01-02T00:00:00+00:00,,,\n'
        "c,normal,0,15,15.50,tbp,,,,,,\n"
        "d,tumour,1,8,,done,sample,,2030-01-05T00:00:00+00:00,7,,\n"
    )
    results = pd.read_csv(report.results_csv, dtype=str, keep_default_na=False)
    assert list(results["slide_id"]) == ["a", "b", "d"]  # process == 1 rows
    # merging again changes nothing; the shards are kept unless asked
    before = plist.read_bytes()
    merge_process_list(plist)
    assert plist.read_bytes() == before
    assert shard_path(plist, 0, 2).exists()
    report = merge_process_list(plist, remove=True)
    assert plist.read_bytes() == before and not find_shards(plist)


def test_merge_shards_without_shards_returns_the_list_unchanged(tmp_path: Path) -> None:
    plist = _write(tmp_path / "demo.csv", LIST_TEXT)
    frame = merge_shards(plist)
    assert frame.to_csv(index=False, lineterminator="\n") == LIST_TEXT
    report = merge_process_list(plist)
    assert report.rows_taken == 0 and plist.read_text() == LIST_TEXT


def test_merge_errors_name_the_file(tmp_path: Path) -> None:
    plist = tmp_path / "demo.csv"
    with pytest.raises(ProcessListError) as info:
        merge_process_list(plist)
    assert str(info.value) == f"{plist}: process list not found; run `clam-heat list CONFIG` first"
    _write(plist, LIST_TEXT)
    missing = tmp_path / "nope.csv"
    with pytest.raises(ProcessListError) as info:
        merge_process_list(plist, [missing])
    assert str(info.value) == f"{missing}: shard not found (check the path or omit it)"
    bad = _write(shard_path(plist, 0, 1), "id,status\nx,done\n")
    with pytest.raises(ProcessListError) as info:
        merge_process_list(plist)
    assert str(info.value) == f"{bad}: no slide_id column; not a process-list shard"
    _write(bad, "slide_id,status\nx,done\nx,failed\n")
    with pytest.raises(ProcessListError) as info:
        merge_process_list(plist)
    assert str(info.value) == f"{bad}: duplicate slide_id ['x']; fix or delete the shard"


def test_shard_frame_resumes_from_its_own_shard_file(tmp_path: Path) -> None:
    from clam_heat.process_list import read_process_list

    plist = _write(tmp_path / "demo.csv", LIST_TEXT)
    df = read_process_list(plist)
    n = 2
    parts = [shard_frame(df, plist, i, n) for i in range(n)]
    assert sorted(s for p in parts for s in p["slide_id"]) == ["a", "b", "c", "d"]
    i = shard_of("a", n)
    _write(
        shard_path(plist, i, n),
        (
            "slide_id,status,stage,error,updated_at\n"
            "a,failed,segment,no tissue,2030-01-09T00:00:00+00:00\n"
        ),
    )
    resumed = shard_frame(df, plist, i, n).set_index("slide_id")
    assert resumed.loc["a", "status"] == "failed" and resumed.loc["a", "error"] == "no tissue"
    assert resumed.loc["a", "my_note"] == "keep 007"


# --------------------------------------------------------------------------------------------
# executor construction
# --------------------------------------------------------------------------------------------


def test_make_executor_choices() -> None:
    assert make_executor("local", workers=1) is None
    assert make_executor("serial", workers=4) is None
    local = make_executor(workers=2)
    assert isinstance(local, LocalExecutor) and local.workers == 2
    dask = make_executor(scheduler="tcp://127.0.0.1:1")
    assert isinstance(dask, DaskExecutor) and dask.address == "tcp://127.0.0.1:1"
    with pytest.raises(ConfigError, match="--scheduler/--scheduler-file need --executor dask"):
        make_executor("local", scheduler="tcp://x:1")
    with pytest.raises(ConfigError) as info:
        make_executor("dask")
    assert str(info.value) == (
        "--executor dask needs --scheduler tcp://HOST:8786 or --scheduler-file PATH"
    )
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        LocalExecutor(0)


def test_dask_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # fault: the extra is not installed
    with pytest.raises(ExecutorError) as info:
        make_executor("dask", scheduler="tcp://127.0.0.1:8786")
    assert str(info.value) == (
        "--executor dask needs Dask distributed: pip install 'clam-heat[dask]'"
    )


def test_dask_unreachable_scheduler_and_missing_file(tmp_path: Path) -> None:
    sched = tmp_path / "scheduler.json"
    with pytest.raises(ExecutorError) as info:
        list(DaskExecutor(scheduler_file=sched).map_rows([_ctx("a")], ()))
    assert str(info.value).startswith(f"{sched}: scheduler file not found")
    with pytest.raises(ExecutorError) as info:
        list(DaskExecutor("tcp://127.0.0.1:9", connect_timeout=1).map_rows([_ctx("a")], ()))
    assert str(info.value).startswith("dask scheduler tcp://127.0.0.1:9 not reachable (")
    assert str(info.value).endswith("start the cluster first or check --scheduler/--scheduler-file")


# --------------------------------------------------------------------------------------------
# local pool mechanics (real spawned workers, rows with no stages to run)
# --------------------------------------------------------------------------------------------


def _ctx(slide_id: str, root: Path | None = None) -> RowContext:
    cfg = HeatmapConfig()
    if root is not None:
        exp = cfg.exp_arguments.model_copy(update={"raw_save_dir": root / "raw"})
        cfg = cfg.model_copy(update={"exp_arguments": exp})
    return RowContext(cfg, slide_id, {"slide_id": slide_id}, Path(f"{slide_id}.svs"), "x", {})


def test_local_pool_runs_rows_in_worker_processes_with_thread_limits(tmp_path: Path) -> None:
    # its own pool: the module's shared pool may hold a worker another test killed, still
    # restarting (then only one worker reports its settings)
    with LocalExecutor(2) as local_pool:
        _check_pool_mechanics(local_pool, tmp_path)


def _check_pool_mechanics(local_pool: LocalExecutor, tmp_path: Path) -> None:
    rows = [_ctx(f"s{k}", tmp_path) for k in range(6)]
    pids = local_pool.pids
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert local_pool.threads == max(1, ex.available_cores() // 2)
    if sys.platform.startswith("linux"):  # forked from the preloaded server, not spawned
        assert {type(w.process).__name__ for w in local_pool._pool} == {"ForkServerProcess"}
    settings = local_pool.worker_settings  # what each worker process really runs with
    assert len(settings) == 2
    for reported in settings:
        assert reported["torch"] == reported["opencv"] == local_pool.threads
        assert reported["helper_threads"] == min(2, local_pool.threads)  # heatmap, sampling
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            assert reported[name] == str(local_pool.threads)
    outcomes = list(local_pool.map_rows(rows, ()))
    assert sorted(o.slide_id for o in outcomes) == [f"s{k}" for k in range(6)]
    assert {o.status for o in outcomes} == {"done"}
    assert local_pool.pids == pids  # the same workers served every row, and stay for more
    killed = next(w.process for w in local_pool._pool if w.process.pid == pids[0])
    os.kill(pids[0], signal.SIGKILL)  # an idle worker dies: it is replaced
    killed.join(timeout=120)  # wait for the death itself, not for a guessed delay
    assert not killed.is_alive()
    again = list(local_pool.map_rows(rows, ()))
    assert sorted(o.status for o in again) == ["done"] * 6
    assert pids[0] not in local_pool.pids and len(local_pool.pids) == 2
    assert list(local_pool.map_rows([], ())) == []


@pytest.mark.timeout(120)  # a hang (waiting out the start-up timeout) fails, not blocks
def test_workers_that_die_before_starting_fail_fast(tmp_path: Path) -> None:
    """A worker that cannot start (here: the run log's folder vanished) is a clear error at once,
    not a wait for the start-up timeout, and no worker is left behind."""
    import logging

    folder = tmp_path / "logs"
    folder.mkdir()
    handler = logging.FileHandler(folder / "clam_heat.log")
    logger = logging.getLogger("clam_heat")
    logger.addHandler(handler)
    pool = LocalExecutor(1)
    try:
        shutil.rmtree(folder)  # each worker opens the driver's log file by path
        with pytest.raises(ExecutorError, match="keep dying before they start"), pool:
            pass
        assert pool.pids == []
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_spawned_workers_where_there_is_no_fork_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """macOS/Windows path: workers are spawned (they import everything themselves) and work."""
    monkeypatch.setattr(sys, "platform", "darwin")
    assert ex_local._start_method() == "spawn"
    with LocalExecutor(1) as pool:
        (worker,) = pool._pool
        assert type(worker.process).__name__ == "SpawnProcess"
        outcomes = list(pool.map_rows([_ctx("s0", tmp_path)], ()))
    assert [o.status for o in outcomes] == ["done"]


def test_shipped_contexts_carry_no_open_slide() -> None:
    ctx = _ctx("a")
    ctx._slide = object()
    assert ex_base._shippable(ctx)._slide is None and ctx._slide is not None


def test_worker_device_override_only_touches_runner_device() -> None:
    ctx = _ctx("a")
    pinned = ex_base._with_device(ctx, "cuda:1")
    assert pinned.cfg.runner_arguments.device == "cuda:1"
    assert ctx.cfg.runner_arguments.device == "auto"
    assert pinned.cfg.block("heatmap_arguments") == ctx.cfg.block("heatmap_arguments")
    assert ex_base._with_device(ctx, None) is ctx


# --------------------------------------------------------------------------------------------
# end to end on the demo project: same bytes whatever the executor, killed workers
# --------------------------------------------------------------------------------------------
# One project folder, one local pool and one Dask cluster serve the whole module; every test
# starts from a folder with no outputs, and compares with one serial run in the same folder (the
# outputs hold absolute paths, so the folder must be the same for bytes to match).

N_SLIDES = 4  # of the 5 demo slides


def _reset(cfg) -> None:
    """Remove every output (and restore the list) so the next run starts from scratch."""
    folder = cfg.config_dir
    shutil.rmtree(folder / "heatmaps")
    (folder / "heatmaps").mkdir()
    shutil.rmtree(folder / "results", ignore_errors=True)
    for shard in find_shards(cfg.process_list_path):
        shard.unlink()
    cfg.process_list_path.write_bytes((folder / "pristine_list.csv").read_bytes())


def _ledger_states(cfg) -> dict[str, dict[str, str]]:
    return {
        p.name.split(".")[0]: {
            k: v["state"] for k, v in json.loads(p.read_text())["stages"].items()
        }
        for p in sorted((cfg.config_dir / "heatmaps").rglob("*.ledger.json"))
    }


def _snapshot(cfg) -> dict[str, object]:
    """Every output file's bytes (not ledgers and log: they hold run times), each ledger's stage
    states, and the process-list and results CSV rows without updated_at."""
    files = {
        str(p.relative_to(cfg.config_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((cfg.config_dir / "heatmaps").rglob("*"))
        if p.is_file() and not p.name.endswith((".ledger.json", ".log"))
    }

    def rows(path: Path) -> list[dict[str, str]]:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return frame.drop(columns=["updated_at"]).to_dict("records")

    return {
        "files": files,
        "list": rows(cfg.process_list_path),
        "results": rows(cfg.results_csv_path) if cfg.results_csv_path.exists() else None,
        "ledgers": _ledger_states(cfg),
    }


def _run(cfg, executor=None, **kwargs):
    from clam_heat.runner import run_pipeline

    return run_pipeline(cfg, executor=executor, **kwargs)


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory: pytest.TempPathFactory):
    """Rows run in this module's workers read their fault spec from this file (absent: no fault):
    every registered stage is wrapped by ``stage_faults`` until the module ends."""
    path = tmp_path_factory.mktemp("fault") / "fault.txt"
    with stage_faults.armed_from(path):
        yield path


@pytest.fixture()
def arm(fault_file: Path):
    """``arm("slide:stage[:marker]")`` makes workers die there; disarmed after the test."""
    yield lambda spec: fault_file.write_text(spec)
    fault_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def project(demo_source: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo config with 4 rows and every output root inside the (module's) project copy."""
    folder = tmp_path_factory.mktemp("executors") / "demo"
    shutil.copytree(demo_source, folder)
    plist = folder / "process_lists" / "demo.csv"
    lines = plist.read_text().splitlines()[: N_SLIDES + 1]
    plist.write_text("\n".join(lines) + "\n")
    (folder / "pristine_list.csv").write_bytes(plist.read_bytes())
    out = folder / "heatmaps"  # absolute: relative output roots resolve against the CWD
    return load_config(
        folder / "config.yaml",
        overrides=[
            f"exp_arguments.raw_save_dir={out / 'heatmap_raw_results'}",
            f"exp_arguments.production_save_dir={out / 'heatmap_production_results'}",
            f"runner_arguments.results_dir={folder / 'results'}",
        ],
    )


@pytest.fixture(scope="module")
def reference(project) -> dict[str, object]:
    """What a serial, in-process run writes."""
    _reset(project)
    summary = _run(project)
    assert summary.counts == {"done": N_SLIDES}, summary.failed
    snapshot = _snapshot(project)
    assert len(snapshot["files"]) >= 5 * N_SLIDES
    assert set(snapshot["ledgers"]) == {f"demo_{k:03d}" for k in range(N_SLIDES)}
    return snapshot


@pytest.fixture()
def fresh(project, reference):
    """The project with no outputs (after the reference run exists)."""
    _reset(project)
    return project


@pytest.fixture(scope="module")
def local_pool(fault_file: Path):
    with LocalExecutor(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def dask_cluster(fault_file: Path):
    """A real LocalCluster: 2 worker processes, 1 thread each. Dask gives up on a task at the
    first worker death (allowed-failures 0), so the executor's own resubmission is exercised."""
    import dask
    import distributed  # in the test extra: missing it is a failure, never a skip

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    try:
        yield cluster
    finally:
        cluster.close()


def test_local_and_dask_runs_match_a_serial_run_byte_for_byte(
    fresh, reference, local_pool: LocalExecutor, dask_cluster
) -> None:
    local = _run(fresh, local_pool)
    assert local.counts == {"done": N_SLIDES}, local.failed
    assert _snapshot(fresh) == reference

    _reset(fresh)
    dask = _run(fresh, DaskExecutor(dask_cluster.scheduler_address))
    assert dask.counts == {"done": N_SLIDES}, dask.failed
    assert _snapshot(fresh) == reference

    # resumable whatever the executor: nothing is redone
    again = _run(fresh, DaskExecutor(dask_cluster.scheduler_address))
    assert again.counts == {"done": N_SLIDES} and again.stage_seconds == {}


def test_run_starts_an_idle_pool_early_and_stops_it_after(fresh, reference) -> None:
    pool = LocalExecutor(2)
    summary = _run(fresh, pool)
    assert summary.counts == {"done": N_SLIDES}, summary.failed
    assert _snapshot(fresh) == reference
    assert pool.pids == []  # run_pipeline started these workers, so it stopped them too


def test_local_worker_killed_mid_row_reruns_the_row(fresh, reference, arm, tmp_path: Path) -> None:
    marker = tmp_path / "fault_fired"
    arm(f"demo_001:heatmap:{marker}")
    omp = os.environ.get("OMP_NUM_THREADS")
    pool = LocalExecutor(2)  # not entered: map_rows starts and stops its own workers
    summary = _run(fresh, pool)
    assert marker.exists()  # a worker really died inside demo_001's heatmap stage
    assert pool.pids == [] and os.environ.get("OMP_NUM_THREADS") == omp
    assert summary.counts == {"done": N_SLIDES}, summary.failed
    assert not list((fresh.config_dir / "heatmaps").rglob("*.tmp"))
    assert _snapshot(fresh) == reference  # nothing half-written survived the kill


def test_dask_worker_killed_mid_row_is_resubmitted(
    fresh, reference, dask_cluster, arm, tmp_path: Path
) -> None:
    marker = tmp_path / "fault_fired"
    arm(f"demo_002:infer:{marker}")
    summary = _run(fresh, DaskExecutor(dask_cluster.scheduler_address))
    assert marker.exists()
    assert summary.counts == {"done": N_SLIDES}, summary.failed
    assert _snapshot(fresh) == reference


def test_row_whose_worker_always_dies_is_reported_then_retried(
    fresh, reference, local_pool: LocalExecutor, arm, fault_file: Path
) -> None:
    arm("demo_001:infer")  # no marker: dies on every attempt
    summary = _run(fresh, local_pool)
    assert summary.counts == {"done": N_SLIDES - 1, "failed": 1}
    slide = fresh.config_dir / "slides" / "demo_001.tiff"
    error = (
        f"slide {slide}: worker process died in stage infer 2 times (exit code "
        f"{stage_faults.FAULT_EXIT_CODE}); often out of memory: check the worker's memory limit "
        "and log, then rerun with --retry-failed"
    )
    assert summary.failed == [("demo_001", error)]
    rows = pd.read_csv(fresh.process_list_path, dtype=str, keep_default_na=False)
    row = rows.set_index("slide_id").loc["demo_001"]
    assert (row["status"], row["stage"], row["error"]) == ("failed", "segment", error)

    fault_file.unlink()  # disarm
    again = _run(fresh, local_pool)  # failed rows wait for --retry-failed
    assert again.counts == {"done": N_SLIDES - 1, "failed": 1} and again.stage_seconds == {}
    retried = _run(fresh, local_pool, retry_failed=True)
    assert retried.counts == {"done": N_SLIDES}
    assert set(retried.stage_seconds) == {"infer", "heatmap", "sample"}  # segment was kept
    snapshot = _snapshot(fresh)
    assert snapshot["files"] == reference["files"]
    assert snapshot["ledgers"] == reference["ledgers"]
    # a row that once failed leaves bag_size written as a float ("59.0" for 59): compare values
    for ours, theirs in zip(snapshot["list"], reference["list"], strict=True):
        ours, theirs = dict(ours), dict(theirs)  # the reference is shared: do not pop from it
        assert float(ours.pop("bag_size")) == float(theirs.pop("bag_size"))
        assert ours == theirs


@pytest.mark.skipif(torch.cuda.is_available(), reason="pretends to have GPUs on a CPU-only host")
def test_workers_pin_rows_to_gpus_round_robin(fresh, reference) -> None:
    with LocalExecutor(2, n_gpus=2) as pool:  # fault: two GPUs that this host does not have
        summary = _run(fresh, pool)
    assert summary.counts == {"failed": N_SLIDES}
    assert {error for _, error in summary.failed} == {
        f"runner_arguments.device is 'cuda:{i}' but no CUDA device is available "
        "(use device: auto or cpu)"
        for i in (0, 1)
    }
    assert fresh.runner_arguments.device == "auto"  # the driver's config is untouched


def test_job_array_shards_merge_back_into_the_serial_list(fresh, reference) -> None:
    n = 3
    for i in range(n):  # what a Slurm job array runs, one task after another here
        summary = _run(fresh, shard=(i, n))
        assert summary.ok and summary.process_list == shard_path(fresh.process_list_path, i, n)
    report = merge_process_list(fresh.process_list_path, results_csv=fresh.results_csv_path)
    # every task leaves its shard file, also a shard with no rows
    assert report.shards == [shard_path(fresh.process_list_path, i, n) for i in range(n)]
    assert report.rows_taken == N_SLIDES
    assert _snapshot(fresh) == reference


def _cli(cfg, *args: str):
    from typer.testing import CliRunner

    from clam_heat.cli import app

    sets = []
    for key in ("raw_save_dir", "production_save_dir"):
        sets += ["--set", f"exp_arguments.{key}={getattr(cfg.exp_arguments, key)}"]
    sets += ["--set", f"runner_arguments.results_dir={cfg.runner_arguments.results_dir}"]
    if args[0] == "run":
        args = (args[0], str(cfg.source_path), *sets, "--quiet", *args[1:])
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_workers_scheduler_and_shards_write_the_serial_outputs(
    fresh, reference, dask_cluster
) -> None:
    result = _cli(fresh, "run", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "rows: 4 done" in result.output
    assert _snapshot(fresh) == reference

    _reset(fresh)
    result = _cli(fresh, "run", "--scheduler", dask_cluster.scheduler_address)
    assert result.exit_code == 0, result.output
    assert _snapshot(fresh) == reference

    _reset(fresh)
    for i in range(2):
        result = _cli(fresh, "run", "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        assert f"process list: {shard_path(fresh.process_list_path, i, 2)}" in result.output
    result = _cli(fresh, "merge", str(fresh.process_list_path), "--remove-shards")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{fresh.process_list_path}: merged 2 shard files, 4 rows")
    assert not find_shards(fresh.process_list_path)
    snapshot = _snapshot(fresh)
    assert snapshot["files"] == reference["files"] and snapshot["list"] == reference["list"]

    result = _cli(fresh, "run", "--shard", "2/2")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --shard '2/2': need 0 <= i < n (shards are numbered from 0)"
    )


def test_worker_killed_for_memory_is_not_retried(
    fresh, local_pool: LocalExecutor, arm, fault_file: Path
) -> None:
    """Catches: a row whose worker the OOM killer took being rerun blindly (killed again, and
    twice the memory pressure on the node meanwhile)."""
    fired = Path(str(fault_file) + ".fired")
    fired.unlink(missing_ok=True)
    arm("demo_001:infer:SIGKILL")
    summary = _run(fresh, local_pool)
    assert summary.counts == {"done": N_SLIDES - 1, "failed": 1}
    assert fired.read_text().splitlines() == ["demo_001"]  # one attempt, no retry
    ((slide_id, error),) = summary.failed
    assert slide_id == "demo_001"
    assert "worker process killed for memory in stage infer" in error
    assert "runner_arguments.max_patches" in error and "--retry-failed" in error
