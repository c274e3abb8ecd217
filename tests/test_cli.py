"""Every README command, run through the CLI on real generated files."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from clam_heat.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "list", "run", "quick", "status", "merge", "demo"):
        assert command in result.output


def test_help_at_80_columns_shows_every_option_name(monkeypatch) -> None:
    """Catches: a help layout that cuts option names (rich's table showed ``--model-type,-…``
    and hid ``--model_name`` at 80 columns)."""
    import typer.main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    group = typer.main.get_command(app)
    assert group.commands  # type: ignore[attr-defined]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        result = runner.invoke(app, [name, "--help"], terminal_width=80)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert max(len(line) for line in lines) <= 80, (name, max(lines, key=len))
        words = set(result.output.replace(",", " ").replace("/", " ").split())
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("-"):
                    assert flag in words, f"clam-heat {name} --help hides {flag}"


def test_validate_shipped_template_by_bare_name(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["validate", "clam_template.yaml"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "heatmap_arguments" in result.output


def test_validate_reports_misspelt_key_and_bad_value(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "clam_template.yaml").read_text()
    text = text.replace("alpha: 0.4", "alpah: 0.4").replace("binary_thresh: -1", "binary_thresh: 2")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip().startswith("alpah"))
    assert f"bad.yaml:{line} heatmap_arguments.alpah: unknown key (did you mean 'alpha'?)" in (
        result.output
    )
    assert "binary_thresh" in result.output


def test_validate_bad_alpha_names_key_and_bound(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "clam_template.yaml").read_text().replace("alpha: 0.4", "alpha: 1.5")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "heatmap_arguments.alpha" in result.output and "1" in result.output


def test_list_twice_changes_nothing_and_keeps_edited_status(demo_project: Path) -> None:
    first = runner.invoke(app, ["list", str(demo_project)])
    assert first.exit_code == 0, first.output
    csv = demo_project.parent / "process_lists" / "demo.csv"
    df = pd.read_csv(csv, dtype={"slide_id": str}, keep_default_na=False)
    for col in (
        "slide_id",
        "process",
        "status",
        "seg_level",
        "sthresh",
        "mthresh",
        "close",
        "use_otsu",
        "keep_ids",
        "exclude_ids",
        "a_t",
        "a_h",
        "max_n_holes",
        "vis_level",
        "line_thickness",
        "use_padding",
        "contour_fn",
        "stage",
        "error",
        "updated_at",
    ):
        assert col in df.columns, col
    before = csv.read_bytes()
    second = runner.invoke(app, ["list", str(demo_project)])
    assert second.exit_code == 0 and csv.read_bytes() == before
    df.loc[df["slide_id"] == "demo_001", "status"] = "done"
    df.to_csv(csv, index=False)
    runner.invoke(app, ["list", str(demo_project)])
    again = pd.read_csv(csv, dtype={"slide_id": str}, keep_default_na=False)
    assert again.set_index("slide_id").loc["demo_001", "status"] == "done"


def test_run_dry_run_status_and_failure_exit_code(demo_project: Path) -> None:
    dry = runner.invoke(app, ["run", str(demo_project), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "demo_000: segment: no previous run" in dry.output
    done = runner.invoke(app, ["run", str(demo_project), "--quiet"])
    assert done.exit_code == 0, done.output
    assert "rows: 5 done" in done.output
    up = runner.invoke(
        app, ["run", str(demo_project), "--dry-run", "--set", "heatmap_arguments.alpha=0.5"]
    )
    assert "heatmap: changed: heatmap_arguments.alpha 0.4 -> 0.5" in up.output
    assert "segment: up to date" in up.output
    csv = demo_project.parent / "process_lists" / "demo.csv"
    status = runner.invoke(app, ["status", str(csv)])
    assert status.exit_code == 0 and "5 done" in status.output
    # a slide that vanished mid-list makes its row fail and the exit code non-zero
    (demo_project.parent / "slides" / "demo_004.tiff").rename(
        demo_project.parent / "slides" / "demo_004.tiff.bak"
    )
    os.utime(demo_project)  # nothing else changes
    df = pd.read_csv(csv, dtype={"slide_id": str}, keep_default_na=False)
    df = pd.concat([df, pd.DataFrame({"slide_id": ["ghost"], "label": ["tumour"]})])
    df.to_csv(csv, index=False)
    (demo_project.parent / "slides" / "ghost.tiff").write_bytes(b"not a slide")
    failed = runner.invoke(app, ["run", str(demo_project), "--quiet"])
    assert failed.exit_code == 1
    assert "failed ghost:" in failed.output
    report = runner.invoke(app, ["status", str(csv)])
    assert "failed ghost:" in report.output


def test_docs_picture_script_fails_in_one_line_on_a_missing_folder(tmp_path: Path) -> None:
    """Catches: the script exiting 0 having written nothing (cv2.imwrite into a missing
    folder only returns False)."""
    import subprocess
    import sys

    missing = tmp_path / "new_dir"
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "make_compare_video_pictures.py"), str(missing)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    fix = f"create it first (mkdir -p {missing})"
    assert done.stderr == f"error: {missing}: no such folder; {fix}\n"
    assert not missing.exists()
