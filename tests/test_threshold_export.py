"""Threshold export (docs/beyond-clam.md#threshold-export) on the demo: every patch at or above the
threshold, with a manifest and a QuPath GeoJSON; the oracle is computed from the blockmap H5 with
SciPy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from demo_state import row_contexts
from PIL import Image
from scipy.stats import rankdata

from clam_heat.config import load_config
from clam_heat.errors import ConfigError
from clam_heat.ledger import Ledger
from clam_heat.rows import blockmap_h5_path
from clam_heat.runner import run_pipeline

SAMPLERS = (
    "sample_arguments.samples=["
    "{name: top_pct, mode: threshold, threshold: 0.9},"
    "{name: raw_h5, mode: threshold, score: raw, threshold: RAW, format: h5}]"
)


def _oracle(blockmap: Path, threshold: float, score: str) -> dict[tuple[int, int], float]:
    """(x, y) -> raw score of every patch at/above the threshold, straight from the H5."""
    with h5py.File(blockmap, "r") as h5:
        raw = h5["attention_scores"][:].reshape(-1).astype(np.float64)
        coords = h5["coords"][:]
    values = rankdata(raw, method="average") / len(raw) if score == "percentile" else raw
    return {
        (int(x), int(y)): s
        for (x, y), s, v in zip(coords, raw, values, strict=True)
        if v >= threshold
    }


def _manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_manifest_rows_are_exactly_the_patches_at_or_above_the_threshold(
    demo_project: Path,
) -> None:
    # a raw threshold in the middle of one slide's scores, so both modes export some patches
    cfg = load_config(demo_project, overrides=[SAMPLERS.replace("RAW", "0")])
    run_pipeline(cfg, stages=["infer"])
    first = row_contexts(cfg)[0]
    with h5py.File(blockmap_h5_path(first), "r") as h5:
        raw_threshold = float(np.median(h5["attention_scores"][:]))
    cfg = load_config(demo_project, overrides=[SAMPLERS.replace("RAW", repr(raw_threshold))])
    summary = run_pipeline(cfg, stages=["infer", "sample"])
    assert summary.ok, summary.failed

    for ctx in row_contexts(cfg):
        pred = Ledger.load(ctx.ledger_path).record("infer")["result"]["pred"]
        base = ctx.production_root / "sampled_patches" / f"label_{ctx.label}_pred_{pred}"
        slide = openslide.OpenSlide(str(ctx.slide_path))

        # percentile, PNGs: manifest == oracle, each PNG is the slide's pixels there
        folder = base / "top_pct" / ctx.slide_id
        rows = _manifest(folder / "manifest.csv")
        assert list(rows[0]) == [
            "slide_id", "x", "y", "level", "patch_size", "score", "percentile", "path",
        ]  # fmt: skip
        oracle = _oracle(blockmap_h5_path(ctx), 0.9, "percentile")
        got = {(int(r["x"]), int(r["y"])): float(r["score"]) for r in rows}
        assert got.keys() == oracle.keys() and len(rows) == len(got)
        for key, s in oracle.items():
            assert got[key] == pytest.approx(s, rel=1e-6)
        assert all(float(r["percentile"]) >= 0.9 for r in rows)
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True)  # highest first
        r = rows[0]
        size = int(r["patch_size"])
        png = np.asarray(Image.open(folder / r["path"]))
        want = np.asarray(
            slide.read_region((int(r["x"]), int(r["y"])), int(r["level"]), (size, size))
        )[..., :3]
        np.testing.assert_array_equal(png, want)
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(r["path"] for r in rows)

        # the QuPath GeoJSON: one square per exported patch
        geo = json.loads((folder / f"{ctx.slide_id}_patches.geojson").read_text())
        corners = {tuple(f["geometry"]["coordinates"][0][0]) for f in geo["features"]}
        assert corners == set(oracle)
        ring = geo["features"][0]["geometry"]["coordinates"][0]
        assert ring[2][0] - ring[0][0] == size  # level 0 = patch level in the demo

        # raw, one HDF5: manifest == oracle, imgs[i] is the patch the manifest row names
        folder = base / "raw_h5" / ctx.slide_id
        rows = _manifest(folder / "manifest.csv")
        oracle = _oracle(blockmap_h5_path(ctx), raw_threshold, "raw")
        assert {(int(r["x"]), int(r["y"])) for r in rows} == oracle.keys()
        assert not list(folder.glob("*.png"))
        if rows:
            name, index = rows[-1]["path"].split("#")
            with h5py.File(folder / name, "r") as h5:
                assert h5["imgs"].shape == (len(rows), size, size, 3)
                x, y = h5["coords"][int(index)]
                assert (int(x), int(y)) == (int(rows[-1]["x"]), int(rows[-1]["y"]))
                want = np.asarray(slide.read_region((int(x), int(y)), 0, (size, size)))[..., :3]
                np.testing.assert_array_equal(h5["imgs"][int(index)], want)
        slide.close()


def test_percentile_threshold_outside_0_1_is_a_config_error(demo_project: Path) -> None:
    bad = "sample_arguments.samples=[{name: t, mode: threshold, threshold: 90}]"
    with pytest.raises(ConfigError, match="threshold"):
        load_config(demo_project, overrides=[bad])
