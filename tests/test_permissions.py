"""Outputs honour the umask like any file the user's tools write (0644 under 022, 0664 under
002), for every writer: slides and features of the demo, heatmaps, H5, PNG patches, GeoJSON,
pyramid TIFF, ledgers, configs, CSVs and the log."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
os.umask(int(sys.argv[1], 8))
from clam_heat.cli import cli_main
folder = sys.argv[2]
code = cli_main(["demo", "--folder", folder, "--slides", "2", "-q"])
assert code == 0, code
sets = ["--set", "runner_arguments.write_pyramid_tiff=true", "--set", "heatmap_arguments.alpha=0.5"]
code = cli_main(["run", os.path.join(folder, "config.yaml"), "-q", *sets])
assert code == 0, code
"""


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_output_file_follows_the_umask(tmp_path: Path, umask: int) -> None:
    folder = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, f"{umask:o}", str(folder)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in folder.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    # every writer took part (this fails if a format silently stops being written)
    for suffix in (".jpg", ".png", ".h5", ".geojson", ".tiff", ".json", ".yaml", ".csv", ".log"):
        assert suffix in kinds, (suffix, sorted(kinds))
    assert any(p.name.endswith("_heatmap_pyramid.tiff") for p in files)
    assert any("sampled_patches" in p.parts for p in files)
    assert any(p.name.endswith(".ledger.json") for p in files)
    want = 0o666 & ~umask
    wrong = {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in files
        if stat.S_IMODE(p.stat().st_mode) != want
    }
    assert not wrong, f"want {oct(want)}: {wrong}"
    dirs = [p for p in folder.rglob("*") if p.is_dir()]
    wrong_dirs = {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in dirs
        if stat.S_IMODE(p.stat().st_mode) != 0o777 & ~umask
    }
    assert not wrong_dirs, wrong_dirs
