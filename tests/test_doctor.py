"""``clam-heat doctor`` on a real demo project: passes when all is well, and names each fault.

Real components throughout (the generated demo's slides, H5 files and checkpoint, OpenSlide,
torch); faults are injected by breaking files or by hiding a package from the importer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

from clam_heat.doctor import (
    DEPENDENCIES,
    Check,
    DoctorReport,
    exit_code,
    format_report,
    run_doctor,
)
from clam_heat.doctor.environment import OPENSLIDE_LIBRARY_MIN

ROOT = Path(__file__).resolve().parents[1]


def lines_of(report: DoctorReport) -> list[str]:
    return format_report(report)


def failed_lines(report: DoctorReport) -> list[str]:
    return [line for line in format_report(report) if line.startswith("✗")]


def edit_config(config: Path, block: str, key: str, value: object) -> None:
    """Change one key of the demo's YAML config in place (keeps its header and '---')."""
    text = config.read_text()
    head, _, body = text.partition("---\n")
    data = yaml.safe_load(body)
    data[block][key] = value
    config.write_text(head + "---\n" + yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- all well


def test_demo_project_passes_with_every_check_named(demo_project: Path, tmp_path: Path) -> None:
    """Catches: a false alarm on a correct setup (exit 1 where all is fine), or a check that
    silently stopped running (its line missing)."""
    report = run_doctor(demo_project, output_dir=tmp_path / "out")
    text = "\n".join(lines_of(report))
    assert exit_code(report) == 0, text
    assert not report.failed, text
    names = {check.name for check in report}
    for name in ("python", "numpy", "h5py", "torch", "openslide-python", "OpenSlide library",
                 "OpenSlide pyramid", "torch devices", "forward on cpu", "timm", "config",
                 "process list", "slides", "features", "checkpoint", "disk estimate",
                 "time estimate", "browser"):  # fmt: skip
        assert name in names, f"no {name!r} line in:\n{text}"
    by_name = {check.name: check for check in report}
    assert "HDF5 " in by_name["h5py"].detail
    assert by_name["process list"].detail.endswith(": 5 of 5 rows still to process")
    assert by_name["slides"].detail == "5 of 5 found and open"
    assert by_name["features"].detail.startswith("5 of 5 H5 found")
    assert (
        "rough" in by_name["time estimate"].detail and "5 rows" in by_name["time estimate"].detail
    )
    assert any(c.name.startswith("output ") and c.ok for c in report), text
    assert any("--output-dir out/; the run creates them" in c.detail for c in report), text
    assert not (tmp_path / "out").exists(), "the doctor must not create output folders"
    assert text.splitlines()[-1].startswith("ready:")


def test_rows_to_process_leave_out_the_done_rows(demo_project: Path, tmp_path: Path) -> None:
    """Catches: the doctor saying "5 of 5 rows to process" after a run finished all five."""
    from clam_heat.config import load_config
    from clam_heat.process_list import read_process_list, write_csv_atomic
    from clam_heat.runner import run_pipeline

    cfg = load_config(demo_project)
    assert run_pipeline(cfg, stages=("infer",)).ok
    df = read_process_list(cfg.process_list_path)
    df.loc[df["slide_id"] == "demo_001", "status"] = "failed"
    write_csv_atomic(df, cfg.process_list_path)
    by_name = {c.name: c for c in run_doctor(demo_project, output_dir=tmp_path / "out")}
    assert by_name["process list"].detail.endswith(
        ": 1 of 5 rows still to process (4 done, 1 failed: rerun with --retry-failed)"
    ), by_name["process list"].detail


def test_environment_only_without_config(tmp_path: Path) -> None:
    """Catches: the plain ``clam-heat doctor`` (no config) crashing or checking config things."""
    report = run_doctor(None, output_dir=tmp_path)
    assert exit_code(report) == 0, "\n".join(lines_of(report))
    names = [check.name for check in report]
    assert "config" not in names and "checkpoint" not in names
    assert "OpenSlide pyramid" in names and "forward on cpu" in names


def test_importing_the_doctor_is_cheap() -> None:
    """Catches: a module-level torch/h5py import that makes every CLI call slow, and makes a
    missing package a traceback at import instead of a doctor line."""
    code = (
        "import sys, clam_heat.doctor\n"
        "heavy = [m for m in ('torch', 'h5py', 'pandas', 'openslide') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)


# --------------------------------------------------------------------------- environment faults


@pytest.mark.parametrize(
    ("module", "dist", "required"),
    [
        ("cv2", "opencv-python-headless", True),
        ("scipy", "scipy", True),
        ("tensorboard", "tensorboard", False),
    ],  # fmt: skip
)
def test_missing_dependency_names_package_and_pip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str, dist: str, required: bool
) -> None:
    """Catches: a missing package reported as a traceback, without its pip name, or (for a
    required one) with exit 0; an optional one failing the run."""
    monkeypatch.setitem(sys.modules, module, None)  # the importer now refuses it
    report = run_doctor(None, output_dir=tmp_path)
    line = next(line for line in lines_of(report) if line.split(" ", 1)[1].startswith(dist + ":"))
    assert "not installed" in line and f"pip install '{dist}>=" in line, line
    if required:
        assert line.startswith("✗") and exit_code(report) == 1
    else:
        assert line.startswith("!") and exit_code(report) == 0


def test_too_old_dependency_says_upgrade(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches: a package below pyproject's minimum passing because it imports."""
    monkeypatch.setitem(sys.modules, "yaml", types.SimpleNamespace(__version__="5.4.1"))
    report = run_doctor(None, output_dir=tmp_path)
    line = next(line for line in lines_of(report) if " pyyaml:" in line)
    assert line.startswith("✗") and "5.4.1 (needs >= 6)" in line and "--upgrade" in line
    assert exit_code(report) == 1


def test_broken_openslide_fails_the_pyramid_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Catches: a broken OpenSlide (no library, no JPEG codec) passing because it imports."""
    import clam_heat.slide
    from clam_heat.errors import SlideError

    def refuse(path: str | Path) -> None:
        raise SlideError(path, "unsupported or unrecognised slide format")

    monkeypatch.setattr(clam_heat.slide, "open_slide", refuse)
    report = run_doctor(None, output_dir=tmp_path)
    (line,) = [line for line in failed_lines(report) if "OpenSlide pyramid" in line]
    assert "unsupported" in line and "fix: pip install --upgrade openslide-bin" in line
    assert exit_code(report) == 1


def test_output_folder_under_a_file_fails_with_fix(tmp_path: Path) -> None:
    """Catches: an output path that can never be created (a file in the way) passing the
    doctor and failing after the first slide's work."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    report = run_doctor(None, output_dir=blocker / "heatmaps")
    (line,) = failed_lines(report)
    assert "is a file, not a folder" in line and str(blocker) in line
    assert "fix: choose another folder" in line
    assert exit_code(report) == 1


def test_unwritable_output_folder_names_the_owner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Catches: a read-only output folder passing (root ignores chmod, so os.access is made to
    refuse this one folder, as it would for a normal user)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        return False if Path(str(path)) == locked else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    report = run_doctor(None, output_dir=locked)
    (line,) = failed_lines(report)
    assert f"output {locked}" in line and "permission denied" in line and "fix:" in line
    assert exit_code(report) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_configured_without_a_gpu(demo_project: Path, tmp_path: Path) -> None:
    """Catches: device: cuda on a CPU-only machine passing the doctor, then failing slide 1."""
    edit_config(demo_project, "runner_arguments", "device", "cuda")
    report = run_doctor(demo_project, output_dir=tmp_path)
    (line,) = [line for line in failed_lines(report) if "torch devices" in line]
    assert "'cuda' is configured" in line and "set device: cpu" in line


# --------------------------------------------------------------------------- config faults


def test_invalid_config_lists_every_problem(demo_project: Path, tmp_path: Path) -> None:
    """Catches: config problems hidden behind the first one, or the environment checks
    skipped because the config is bad."""
    edit_config(demo_project, "heatmap_arguments", "alpha", 1.5)
    edit_config(demo_project, "heatmap_arguments", "alpah", 0.3)
    report = run_doctor(demo_project, output_dir=tmp_path)
    config_lines = [line for line in failed_lines(report) if line.startswith("✗ config:")]
    assert len(config_lines) == 2, config_lines
    assert any("alpha = 1.5" in line for line in config_lines)
    assert any("did you mean 'alpha'" in line for line in config_lines)
    assert any(check.name == "forward on cpu" and check.ok for check in report)
    assert exit_code(report) == 1


def test_missing_slide_is_named(demo_project: Path, tmp_path: Path) -> None:
    """Catches: a missing slide found only when the run reaches its row."""
    slide = demo_project.parent / "slides" / "demo_003.tiff"
    slide.unlink()
    report = run_doctor(demo_project, output_dir=tmp_path)
    (line,) = [line for line in failed_lines(report) if line.startswith("✗ slides:")]
    assert "missing 1 of 5: demo_003" in line and str(slide) in line
    assert "data_dir" in line  # the fix
    assert exit_code(report) == 1
    assert any(c.name == "time estimate" and c.ok for c in report), "other rows still timed"


def test_corrupt_slide_is_named(demo_project: Path, tmp_path: Path) -> None:
    """Catches: a truncated slide file counted as present because it exists."""
    slide = demo_project.parent / "slides" / "demo_001.tiff"
    slide.write_bytes(slide.read_bytes()[:300])
    report = run_doctor(demo_project, output_dir=tmp_path)
    (line,) = [line for line in failed_lines(report) if "cannot open" in line]
    assert "1 of 5: demo_001" in line


def test_missing_and_wrong_width_features_are_named(demo_project: Path, tmp_path: Path) -> None:
    """Catches: a missing H5, or features from another encoder (wrong width), found mid-run."""
    import h5py
    import numpy as np

    features = demo_project.parent / "features"
    (features / "demo_002.h5").unlink()
    with h5py.File(features / "demo_004.h5", "r+") as handle:
        n = handle["features"].shape[0]
        del handle["features"]
        handle["features"] = np.zeros((n, 32), dtype=np.float32)
    report = run_doctor(demo_project, output_dir=tmp_path)
    lines = [line for line in failed_lines(report) if line.startswith("✗ features:")]
    assert any("no features H5 for 1 of 5: demo_002" in line for line in lines), lines
    assert any("demo_004" in line and "32 wide, embed_dim 64" in line for line in lines), lines
    assert exit_code(report) == 1


@pytest.mark.parametrize("fault", ["garbage", "other_model"])
def test_bad_checkpoint_is_named(demo_project: Path, tmp_path: Path, fault: str) -> None:
    """Catches: an unreadable checkpoint, or one of another architecture, found only when the
    first slide reaches the model."""
    import torch

    ckpt = demo_project.parent / "ckpts" / "s_0_checkpoint.pt"
    if fault == "garbage":
        ckpt.write_bytes(b"this is not a checkpoint")
    else:
        torch.save({"encoder.weight": torch.zeros(4, 4)}, ckpt)
    report = run_doctor(demo_project, output_dir=tmp_path)
    (line,) = [line for line in failed_lines(report) if line.startswith("✗ checkpoint:")]
    assert str(ckpt) in line and "fix: set model_arguments.ckpt_path" in line
    assert exit_code(report) == 1
    assert not any(c.name == "time estimate" for c in report), "no model, nothing to time"


# --------------------------------------------------------------------------- report and tables


def test_format_and_exit_code_rules() -> None:
    """Catches: a warning failing the exit code, a fix shown on passing lines, ASCII fallback."""
    report = DoctorReport([
        Check("a", True, "fine", "never shown"),
        Check("b", None, "optional missing", "pip install b"),
    ])  # fmt: skip
    assert exit_code(report) == 0
    assert format_report(report) == [
        "✓ a: fine",
        "! b: optional missing -> fix: pip install b",
        "ready: 2 checks, 0 failed, 1 warnings",
    ]
    report.add("c", False, "broken", "fix c")
    assert exit_code(report) == 1
    ascii_lines = format_report(report, ascii_only=True)
    assert ascii_lines[2] == "FAIL c: broken -> fix: fix c"
    assert all(line.isascii() for line in ascii_lines)


def _minimums(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        name, _, minimum = req.partition(">=")
        out[name.strip().lower()] = minimum.strip()
    return out


def test_dependency_table_matches_pyproject() -> None:
    """Catches: pyproject.toml raising a minimum or adding a package the doctor never checks."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = _minimums(project["dependencies"])
    optional: dict[str, str] = {}
    for group in project["optional-dependencies"].values():
        optional |= _minimums(group)
    table = {dep.dist.lower(): dep for dep in DEPENDENCIES}
    assert required.pop("openslide-bin") == OPENSLIDE_LIBRARY_MIN
    required.pop(
        "pyvips-binary"
    )  # the libvips library: checked by importing pyvips, which loads it
    for dist, minimum in required.items():
        assert dist in table, f"pyproject requires {dist} but the doctor does not check it"
        assert table[dist].required and table[dist].minimum == minimum, dist
    for dist, dep in table.items():
        if not dep.required and dist in optional:
            assert dep.minimum == optional[dist], dist
