"""A process loads only what runs in it (issue 24): commands that run no model never import
torch, ``status`` reads the list without pandas, and a checkpoint that loaded once is not loaded
again until it changes.

Each command runs in a fresh interpreter (a subprocess) that prints which heavy modules it ended
up with; the test process itself has imported torch long before, so it cannot tell.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from clam_heat import model_process
from clam_heat.cli import cli_main
from clam_heat.colormaps import SHIPPED_CMAPS, SHIPPED_FILE, colormap_lut, write_shipped
from clam_heat.config import load_config
from clam_heat.errors import CheckpointError, SlideError
from clam_heat.list_status import STATUSES, ListStatus, read_status
from clam_heat.model_process import ModelProcessError
from clam_heat.preflight import CHECKPOINT_RECORD, GlobalInputError, check_global_inputs
from clam_heat.process_list import STATUSES as LIST_STATUSES
from clam_heat.process_list import failed_rows, read_process_list, status_summary
from clam_heat.rows import output_roots

HEAVY = ("torch", "pandas", "matplotlib", "cv2")


def _command(args: list[str], cwd: Path, setup: str = "") -> tuple[int, str, set[str]]:
    """Run ``clam-heat ARGS`` in a fresh interpreter: (exit code, output, heavy modules loaded)."""
    code = "\n".join(
        [
            "import os, sys",
            "os.environ.pop('CLAM_HEAT_MODEL_PROCESS', None)",
            setup,
            "from clam_heat.cli import cli_main",
            f"code = cli_main({args!r})",
            f"print('LOADED', *sorted(m for m in {HEAVY!r} if m in sys.modules))",
            "sys.exit(code)",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    loaded = next(
        (line.split()[1:] for line in done.stdout.splitlines() if line.startswith("LOADED")), None
    )
    assert loaded is not None, done.stdout + done.stderr
    return done.returncode, done.stdout + done.stderr, set(loaded)


# ------------------------------------------------------------------------------- status


LIST_TEXT = (
    "\ufeffslide_id,label,status,error\n"  # a BOM, as Excel writes it
    "a,tumour,done,\n"
    "b,tumour,failed,no tissue found\n"
    "\n"  # a blank line is not a row
    "c,normal,,\n"  # an empty status counts as tbp
    "d,normal,processed,\n"  # a status of another tool is counted by its name
    'e,normal,failed,"bad, with a comma"\n'
)


def test_status_counts_as_the_list_reader_does(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text(LIST_TEXT, encoding="utf-8")
    report = read_status(path)
    expected_counts = {"tbp": 1, "running": 0, "done": 1, "failed": 2, "skipped": 0}
    expected_counts["processed"] = 1
    assert report == ListStatus(
        rows=5,
        counts=expected_counts,
        failed=[("b", "no tissue found"), ("e", "bad, with a comma")],
    )
    # the pandas reader of the process list agrees (an independent reading of the same file)
    df = read_process_list(path)
    assert report.counts == status_summary(df)
    failed = failed_rows(df)
    assert report.failed == list(zip(failed["slide_id"], failed["error"], strict=True))
    assert STATUSES == LIST_STATUSES


def test_status_errors_name_the_file(tmp_path: Path) -> None:
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("name,status\na,done\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"no_id.csv: no 'slide_id' column"):
        read_status(no_id)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(Exception, match=r"empty.csv: process list file is empty"):
        read_status(empty)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("slide_id,status\n\xe9,done\n".encode("latin-1"))
    with pytest.raises(Exception, match=r"latin.csv: process list is not a readable UTF-8 CSV"):
        read_status(latin)


def test_status_command_imports_neither_pandas_nor_torch(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text(LIST_TEXT, encoding="utf-8")
    code, output, loaded = _command(["status", str(path)], tmp_path)
    assert code == 0, output
    assert f"{path}: 5 rows (1 tbp, 1 done, 2 failed, 1 processed)" in output
    assert "  failed b: no tissue found" in output
    assert not loaded & {"torch", "pandas", "matplotlib"}, loaded


# ------------------------------------------------------------------ commands that run no model


def test_commands_without_a_model_never_import_torch(demo_project: Path) -> None:
    """validate, list, status, merge, view and a rerun with every row done: no torch."""
    assert cli_main(["run", str(demo_project), "--quiet"]) == 0
    folder = demo_project.parent
    cfg = load_config(demo_project)
    assert (output_roots(cfg)[0] / CHECKPOINT_RECORD).is_file()

    code, output, loaded = _command(["run", str(demo_project), "--quiet"], folder)
    assert code == 0 and "rows: 5 done" in output, output
    assert "torch" not in loaded and "matplotlib" not in loaded, loaded

    for args in (
        ["validate", str(demo_project)],
        ["list", str(demo_project)],
        ["status", str(demo_project)],
        ["merge", str(demo_project)],
    ):
        code, output, loaded = _command(args, folder)
        assert code == 0, (args, output)
        assert "torch" not in loaded, (args, loaded)

    # view: the server is opened, then stopped at once as by Ctrl-C
    stop_at_once = "\n".join(
        [
            "import clam_heat.viewer as viewer",
            "_open = viewer.open_viewer",
            "def _opened(*a, **k):",
            "    server, slide, entries = _open(*a, **k)",
            "    def _stop():",
            "        raise KeyboardInterrupt",
            "    server.serve_forever = _stop",
            "    return server, slide, entries",
            "viewer.open_viewer = _opened",
        ]
    )
    code, output, loaded = _command(
        ["view", str(demo_project), "--port", "0"], folder, stop_at_once
    )
    assert code == 0 and "viewer: http" in output, output
    assert "torch" not in loaded, loaded


# ------------------------------------------------------------------ the checkpoint record


def test_checkpoint_record_skips_the_load_only_while_nothing_changed(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(demo_project)
    record = demo_project.parent / "record.json"
    check_global_inputs(cfg, ["infer"], remember=record)  # a real load, then recorded
    key = json.loads(record.read_text(encoding="utf-8"))
    assert key["model_type"] == "clam_sb" and key["checkpoint"]["size"] > 0

    loads: list[Path] = []

    def counting_load(path: Path, *args: object, **kwargs: object) -> None:
        loads.append(path)
        raise CheckpointError(f"{path}: broken on purpose")

    monkeypatch.setattr("clam_heat.models.load_model", counting_load)
    check_global_inputs(cfg, ["infer"], remember=record)  # same file, same keys: no load
    assert loads == []

    ckpt = Path(cfg.model_arguments.ckpt_path)
    ckpt.write_bytes(ckpt.read_bytes()[:-1])  # a changed (cut) checkpoint is loaded again
    with pytest.raises(GlobalInputError, match="model_arguments.ckpt_path: .*broken on purpose"):
        check_global_inputs(cfg, ["infer"], remember=record)
    assert loads == [ckpt]
    assert json.loads(record.read_text(encoding="utf-8")) == key  # a failure records nothing

    other = cfg.model_copy(
        update={"model_arguments": cfg.model_arguments.model_copy(update={"model_size": "big"})}
    )
    loads.clear()
    ckpt.write_bytes(ckpt.read_bytes())  # keys differ from the record: loaded again
    with pytest.raises(GlobalInputError):
        check_global_inputs(other, ["infer"], remember=record)
    assert len(loads) == 1


def test_shipped_colormap_tables_are_matplotlibs(tmp_path: Path) -> None:
    """colormaps.json holds exactly matplotlib's tables (a stale or hand-edited file fails), and
    a name outside it still comes from matplotlib."""
    import matplotlib

    assert set(matplotlib.colormaps) >= SHIPPED_CMAPS
    shipped = json.loads(SHIPPED_FILE.read_text(encoding="utf-8"))
    assert set(shipped) == SHIPPED_CMAPS
    for name in sorted(SHIPPED_CMAPS):
        cm = matplotlib.colormaps[name]
        rgba = [cm(i) for i in range(cm.N)] + [cm.get_under(), cm.get_over(), cm.get_bad()]
        expected = (np.asarray(rgba) * 255)[:, :3].astype(np.uint8)  # CLAM's truncation
        np.testing.assert_array_equal(colormap_lut(name), expected, err_msg=name)
    assert colormap_lut("jet")[0].tolist() == [0, 0, 127]  # jet starts dark blue
    viridis_r = matplotlib.colormaps["viridis_r"]
    assert colormap_lut("viridis_r")[0].tolist() == [int(v * 255) for v in viridis_r(0)[:3]]
    remade = write_shipped(tmp_path / "colormaps.json")
    assert remade.read_text(encoding="utf-8") == SHIPPED_FILE.read_text(encoding="utf-8")


def test_tissue_names_load_on_first_use() -> None:
    import clam_heat.tissue as tissue

    for name in tissue.__all__:
        assert getattr(tissue, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tissue.nope


# ------------------------------------------------------------------ the model process


def _crash_if_not(pid: int) -> int:
    """Kill the calling process unless it is ``pid`` (a model process dying mid-call)."""
    if os.getpid() != pid:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def _raise_slide_error(path: str) -> None:
    raise SlideError(Path(path), "unreadable on purpose", "re-export it")


def test_model_process_runs_calls_elsewhere_and_returns_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_process, "_can_host", lambda: True)  # this process has torch
    here = os.getpid()
    assert model_process.call(os.getpid) == here  # no model process: runs here
    with model_process.hosting() as hosted:
        assert hosted and model_process.is_running()
        there = model_process.call(os.getpid)
        assert there != here and model_process.call(os.getpid) == there  # one, kept
        with pytest.raises(SlideError, match="slide.tiff: unreadable on purpose") as caught:
            model_process.call(_raise_slide_error, "slide.tiff")
        assert caught.value.exit_code == SlideError.exit_code  # type and fields kept
        assert model_process.call(os.getpid) == there  # an error does not end it
        with pytest.raises(ModelProcessError, match=r"died \(killed by SIGKILL\)"):
            model_process.call(_crash_if_not, here)
        assert not model_process.is_running()
        assert model_process.call(_crash_if_not, here) == here  # later calls run here
    assert not model_process.is_running()
    with pytest.raises(ChildProcessError):
        os.waitpid(there, os.WNOHANG)  # reaped, not left as a zombie


def test_run_keeps_torch_out_of_the_driver(demo_project: Path, tmp_path: Path) -> None:
    """The CLI run forks the model process: the driver never imports torch, and the outputs
    are those of a run that does everything in one process."""
    folder = demo_project.parent
    alone = tmp_path / "alone"
    shutil.copytree(folder, alone)
    code, output, loaded = _command(["run", str(demo_project), "--quiet"], folder)
    assert code == 0 and "rows: 5 done" in output, output
    assert "torch" not in loaded, loaded
    assert "matplotlib" not in loaded, loaded  # jet's table ships in colormaps.json
    env_off = "import os; os.environ['CLAM_HEAT_MODEL_PROCESS'] = '0'"
    code, output, loaded = _command(["run", str(alone / "config.yaml"), "--quiet"], alone, env_off)
    assert code == 0 and "torch" in loaded, output

    def outputs(root: Path) -> dict[str, bytes]:
        found = {}
        for path in sorted((root / "heatmaps").rglob("*")):
            if path.suffix in {".jpg", ".png"}:
                found[str(path.relative_to(root))] = path.read_bytes()
            elif path.name.endswith("_blockmap.h5"):
                with h5py.File(path) as h5:
                    found[str(path.relative_to(root))] = np.asarray(
                        h5["attention_scores"]
                    ).tobytes()
        return found

    ours, theirs = outputs(folder), outputs(alone)
    assert len(ours) > 20 and ours == theirs


def test_a_model_process_that_dies_fails_its_row_only(demo_project: Path) -> None:
    folder = demo_project.parent
    setup = "\n".join(
        [
            "import os, signal",
            "import clam_heat.stages.infer as infer",  # torch-free: the driver stays so
            "driver, real = os.getpid(), infer.write_blockmap",
            "def dying(*args, **kwargs):",  # the first row's model process dies mid-stage
            "    if os.getpid() != driver:",
            "        os.kill(os.getpid(), signal.SIGKILL)",
            "    return real(*args, **kwargs)",
            "infer.write_blockmap = dying",
        ]
    )
    code, output, _loaded = _command(["run", str(demo_project), "--quiet"], folder, setup)
    assert code == 1, output
    assert "rows: 1 failed, 4 done" in output, output
    assert "the model process died (killed by SIGKILL) in <stage infer>" in output, output


@pytest.mark.parametrize("workers", [False, True], ids=["serial", "workers"])
def test_model_process_stays_only_for_a_serial_run(demo_project: Path, workers: bool) -> None:
    """In a fresh interpreter (a fork of a test worker that has loaded torch would inherit its
    threads' locks): the model process serves a serial run and is let go when rows go to
    workers elsewhere (catches a helper left holding torch beside the workers)."""
    code = "\n".join(
        [
            "import os, sys",
            "os.environ.pop('CLAM_HEAT_MODEL_PROCESS', None)",
            "from clam_heat import model_process, runner",
            "from clam_heat.config import load_config",
            "from clam_heat.executors import SerialExecutor",
            "class ExactSerial(SerialExecutor): pass",
            "class Elsewhere(SerialExecutor): pass",  # stands for workers elsewhere
            "runner.SerialExecutor = ExactSerial",
            f"cfg = load_config({str(demo_project)!r})",
            "with model_process.hosting() as hosted:",
            "    assert hosted",
            f"    summary = runner.run_pipeline(cfg, executor=Elsewhere() if {workers} else None)",
            "    assert summary.ok and summary.counts == {'done': 5}, summary.counts",
            "    print('RUNNING', model_process.is_running())",
            "    model_process.release()",
            "    assert not model_process.is_running()",
            "    assert model_process.call(os.getpid) == os.getpid()",
            "print('TORCH', 'torch' in sys.modules)",
        ]
    )
    done = _python(code, demo_project.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"RUNNING {not workers}" in done.stdout, done.stdout
    if not workers:  # (the stand-in for workers runs its rows, torch included, right here)
        assert "TORCH False" in done.stdout, done.stdout  # the driver never loaded it


# ------------------------------------------------------------------ exit without teardown


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_exit_now_keeps_the_code_output_and_exit_handlers(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    done = _python(
        "\n".join(
            [
                "import atexit, logging",
                "from clam_heat.cli.output import exit_now",
                f"handler = logging.FileHandler({str(log)!r})",
                "logging.getLogger('x').addHandler(handler)",
                "logging.getLogger('x').warning('last words')",  # flushed by logging's handler
                "atexit.register(lambda: print('exit handler ran'))",
                "print('to stdout', end='')",  # unflushed output still arrives
                "exit_now(3)",
            ]
        ),
        tmp_path,
    )
    assert done.returncode == 3, done.stderr
    assert "to stdout" in done.stdout and "exit handler ran" in done.stdout
    assert log.read_text(encoding="utf-8") == "last words\n"


def test_exit_now_waits_for_a_live_thread(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    done = _python(
        "\n".join(
            [
                "import threading, time",
                "from pathlib import Path",
                "from clam_heat.cli.output import exit_now",
                "def late():",
                "    time.sleep(0.5)",
                f"    Path({str(marker)!r}).write_text('done')",
                "threading.Thread(target=late).start()",
                "exit_now(0)",
            ]
        ),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert marker.read_text(encoding="utf-8") == "done"


def test_console_entry_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text(LIST_TEXT, encoding="utf-8")
    ok = subprocess.run(
        [sys.executable, "-m", "clam_heat", "status", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0 and "5 rows" in ok.stdout, ok.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "clam_heat", "status", str(tmp_path / "nope.csv")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: {tmp_path / 'nope.csv'}: process list file not found")
