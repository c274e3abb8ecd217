"""The commands around a run (``doctor``, ``compare``, ``video``) through the real CLI app; the
libraries behind them are tested in test_doctor.py, test_compare.py and test_video.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
from typer.testing import CliRunner

from clam_heat.cli import app
from clam_heat.config import load_config
from clam_heat.runner import run_pipeline


def _finished_demo(config: Path) -> Path:
    cfg = load_config(config, overrides=["sample_arguments.samples=[]"])
    assert run_pipeline(cfg).ok
    return config


def test_doctor_command_exit_codes(demo_project: Path, tmp_path: Path) -> None:
    """Catches: the command ignoring the report's exit code, or printing nothing."""
    ok = CliRunner().invoke(app, ["doctor", str(demo_project), "--output-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "checkpoint:" in ok.output and ok.output.splitlines()[-1].startswith("ready:")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    bad = CliRunner().invoke(app, ["doctor", "--output-dir", str(blocker / "out")])
    assert bad.exit_code == 1, bad.output
    assert "is a file, not a folder" in bad.output


def test_compare_command_writes_the_csv_and_says_the_means(demo_project: Path) -> None:
    """Catches: the command not calling compare_runs with both configs, or a wrong summary."""
    _finished_demo(demo_project)
    copy = demo_project.parent.parent / "copy"
    shutil.copytree(demo_project.parent, copy)
    out = demo_project.parent.parent / "cmp"
    result = CliRunner().invoke(
        app, ["compare", str(demo_project), str(copy / "config.yaml"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "5 slides; mean spearman 1.000" in result.output
    assert (out / "comparison.csv").is_file() and (out / "summary.json").is_file()


def test_compare_of_unrun_configs_is_one_line_error(demo_project: Path) -> None:
    """Catches: a traceback (or exit 0) when neither run has finished a slide."""
    out = demo_project.parent.parent / "cmp"
    result = CliRunner().invoke(
        app, ["compare", str(demo_project), str(demo_project), "--out", str(out)]
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_video_command_writes_the_asked_frames(demo_project: Path, tmp_path: Path) -> None:
    """Catches: options not reaching make_flythrough (frame count/size), or a bad --size
    accepted."""
    _finished_demo(demo_project)
    out = tmp_path / "x.mp4"
    args = ["video", str(demo_project), "--slide", "demo_000", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--seconds", "1", "--fps", "8", "--size", "160x90"])
    assert result.exit_code == 0, result.output
    assert "8 frames" in result.output
    capture = cv2.VideoCapture(str(out))
    try:
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
        assert int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 160
        assert int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == 90
    finally:
        capture.release()
    bad = CliRunner().invoke(app, [*args, "--size", "big"])
    assert bad.exit_code == 2 and "--size must look like 1280x720" in bad.output
