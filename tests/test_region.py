"""The on-demand region renderer (``heatmap.region``) and ``clam-heat render``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
import tifffile

from clam_heat.config import load_config
from clam_heat.h5io import read_scores
from clam_heat.heatmap import heatmap_image
from clam_heat.heatmap.meta import read_meta
from clam_heat.heatmap.region import RegionView, ScoreIndex, patch_paint
from clam_heat.runner import run_pipeline


def _grid_4x4(side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """16 patches of ``side`` px on a 4x4 grid, scores 1..16 in a scrambled order."""
    coords = np.array([(x * side, y * side) for y in range(4) for x in range(4)])
    scores = np.array([7, 3, 12, 1, 16, 9, 5, 14, 2, 11, 8, 15, 4, 13, 6, 10], float)
    return coords, scores


def test_index_query_finds_exactly_the_patches_touching_a_box() -> None:
    coords = np.array([[0, 0], [256, 0], [5000, 5000], [511, 511], [-100, 0]])
    index = ScoreIndex(coords, np.arange(5.0), 256)
    # brute force oracle: footprint [c, c + 256) meets [x0, x1)
    for box in [(0, 0, 1, 1), (255, 0, 257, 1), (500, 500, 600, 600), (4000, 4000, 5001, 5001)]:
        x0, y0, x1, y1 = box
        want = [
            i
            for i, (x, y) in enumerate(coords)
            if x < x1 and x + 256 > x0 and y < y1 and y + 256 > y0
        ]
        assert index.query(box).tolist() == want, box


def test_4x4_blockmap_at_level_0_has_edges_on_exact_patch_boundaries() -> None:
    coords, scores = _grid_4x4(8)
    index = ScoreIndex(coords, scores, 8)
    paint = patch_paint(index.percentiles / 100, 0.0)
    view = RegionView(index, paint, (1.0, 1.0), (32, 32), cmap="viridis")
    rgba = view.rgba((0, 0, 32, 32))
    cm = matplotlib.colormaps["viridis"]
    for k, (x, y) in enumerate(coords):
        # rank of score k among 1..16 is its value: percentile = score / 16 * 100
        want = (np.asarray(cm(scores[k] / 16)) * 255).astype(np.uint8)[:3]
        block = rgba[y : y + 8, x : x + 8]
        assert (block[..., :3] == want).all(), (k, block[0, 0], want)
        assert (block[..., 3] == 255).all()
    # an off-grid window: every colour change sits on a multiple of 8 (no blurred edges)
    part = view.rgba((3, 5, 29, 27))
    changes = np.flatnonzero(np.any(part[:, 1:, :3] != part[:, :-1, :3], axis=(0, 2))) + 1 + 3
    assert set(changes.tolist()) == {8, 16, 24}


def test_threshold_hides_low_patches_and_half_downsample_doubles_edges() -> None:
    coords, scores = _grid_4x4(8)
    index = ScoreIndex(coords, scores, 8)
    paint = patch_paint(index.percentiles / 100, 0.5)
    rgba = RegionView(index, paint, (0.5, 0.5), (64, 64)).rgba((0, 0, 64, 64))
    low = int(np.argmin(scores))  # score 1: percentile 6.25 < 50
    x, y = coords[low] * 2
    assert (rgba[y : y + 16, x : x + 16, 3] == 0).all()
    high = int(np.argmax(scores))
    x, y = coords[high] * 2
    assert (rgba[y : y + 16, x : x + 16, 3] == 255).all()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    folder = tmp_path_factory.mktemp("region") / "demo"
    shutil.copytree(demo_source, folder)
    config = folder / "config.yaml"
    assert run_pipeline(load_config(config)).ok
    return config


def _first_row(config: Path):  # noqa: ANN202 - a RowContext
    from clam_heat.process_list import read_process_list
    from clam_heat.rows import build_contexts

    cfg = load_config(config)
    return cfg, build_contexts(cfg, read_process_list(cfg.process_list_path))[0]


def test_region_at_the_production_level_equals_the_production_image(demo_run: Path) -> None:
    from clam_heat.rows import blockmap_h5_path, production_heatmap_path, segmentation_geojson_path
    from clam_heat.stages.heatmap import production_spec
    from clam_heat.tissue import load_geojson
    from clam_heat.viewer.maps import render_region

    cfg, ctx = _first_row(demo_run)
    slide = ctx.slide()
    scores, coords, patch = read_scores(blockmap_h5_path(ctx))
    level = slide.best_level_for_downsample(32)
    tissue = load_geojson(segmentation_geojson_path(ctx))
    spec = production_spec(ctx, level, overlap=cfg.patching_arguments.overlap)
    # the production writer's own pixels (the image the heatmap stage encodes)
    want = heatmap_image(slide, coords, scores, patch, spec, tissue=tissue)
    ds = slide.level_downsamples[level]
    index = ScoreIndex(coords, scores, patch)
    view = RegionView(
        index,
        patch_paint(index.percentiles / 100, 0.0),
        ds,
        slide.level_dimensions[level],
        cmap=spec.cmap,
        alpha=spec.alpha,
        tissue=tissue,
        slide=slide,
        level=level,
    )
    h, w = want.shape[:2]
    assert (view.rgb((0, 0, w, h)) == want).all()
    window = (w // 3, h // 4, w // 3 + 37, h // 4 + 29)  # any window is a crop of it
    assert (view.rgb(window) == want[window[1] : window[3], window[0] : window[2]]).all()
    # through the command's function, as a JPEG: within one level of the production JPEG
    out = demo_run.parent / "roi.jpg"
    _, meta = render_region(cfg, ctx.slide_id, region=None, level=level, out=out)
    prod = cv2.imread(str(production_heatmap_path(ctx)))
    got = cv2.imread(str(out))
    assert got.shape == prod.shape
    assert np.abs(got.astype(int) - prod.astype(int)).max() <= 1
    assert meta["cmap"] == cfg.heatmap_arguments.cmap
    assert read_meta(production_heatmap_path(ctx))["cmap"] == cfg.heatmap_arguments.cmap


def test_render_writes_a_level_0_roi_with_its_metadata(demo_run: Path) -> None:
    from typer.testing import CliRunner

    from clam_heat.cli import app

    cfg, ctx = _first_row(demo_run)
    scores, coords, patch = read_scores(ctx.raw("_blockmap.h5"))
    x, y = (int(v) for v in coords[len(coords) // 2])
    for ext in ("png", "tiff"):
        out = demo_run.parent / f"roi.{ext}"
        result = CliRunner().invoke(
            app,
            [
                "render",
                str(demo_run),
                "--slide",
                ctx.slide_id,
                "--region",
                f"{x},{y},{2 * patch},{patch}",
                "--level",
                "0",
                "--out",
                str(out),
                "--cmap",
                "plasma",
                "--legend",
            ],
        )
        assert result.exit_code == 0, result.output
        meta = read_meta(out)
        assert meta is not None and meta["cmap"] == "plasma" and meta["scale"] == "percentile"
        image = tifffile.imread(out) if ext == "tiff" else cv2.imread(str(out))
        assert image.shape[1] == 2 * patch and image.shape[0] == patch + 44  # + colour bar
    text = tifffile.TiffFile(demo_run.parent / "roi.tiff").pages[0].description
    assert json.loads(text)["map"] == "attention"
    bad = CliRunner().invoke(
        app,
        [
            "render",
            str(demo_run),
            "--slide",
            "nope",
            "--region",
            "0,0,10,10",
            "--out",
            str(demo_run.parent / "x.png"),
        ],
    )
    assert bad.exit_code != 0 and "nope" in bad.output


@pytest.mark.parametrize("ext", ["png", "jpg", "jpeg", "tiff"])
@pytest.mark.parametrize("streamed", [False, True])
def test_every_sink_embeds_the_metadata_and_keeps_the_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str, streamed: bool
) -> None:
    import clam_heat.heatmap.writers as writers
    from clam_heat.heatmap.meta import image_meta

    if streamed:
        monkeypatch.setattr(writers, "STREAM_MIN_PIXELS", 10)
    rgb = np.random.default_rng(0).integers(0, 255, (300, 280, 3), dtype=np.uint8)
    plain, tagged = tmp_path / f"plain.{ext}", tmp_path / f"tagged.{ext}"
    for path, meta in ((plain, None), (tagged, image_meta("plasma", map_name="ig"))):
        (sink,) = writers.open_sinks(path, 280, 300, mpp=None, meta=meta)
        for y in range(0, 300, 256):
            sink.push(y, rgb[y : y + 256])
        sink.close()
    assert read_meta(plain) is None
    assert read_meta(tagged) == {
        "cmap": "plasma",
        "map": "ig",
        "scale": "percentile",
        "low": 0.0,
        "high": 100.0,
    }
    read = tifffile.imread if ext == "tiff" else (lambda p: cv2.imread(str(p)))
    assert (read(plain) == read(tagged)).all()


@pytest.mark.parametrize("ds", [4.0, 16.0, 3.0])
def test_merged_coarse_zoom_equals_patch_by_patch(ds: float) -> None:
    from clam_heat.heatmap.region import merge_patches

    rng = np.random.default_rng(3)
    g = np.arange(0, 160, 2)  # 8 px patches every 2 px: many share a rectangle at ds >= 3
    coords = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    index = ScoreIndex(coords, rng.random(len(coords)).astype(np.float32), 8)
    paint = patch_paint(index.percentiles / 100, 0.3)
    region = (-(-168 // int(ds)), -(-168 // int(ds)))
    merged = merge_patches(index, paint, (ds, ds), region)
    assert len(merged.counts) < len(coords) and merged.counts.sum() == len(coords)
    for blur in (False, True):
        plain = RegionView(index, paint, (ds, ds), region, blur=blur, overlap=0.5)
        fast = RegionView(index, paint, (ds, ds), region, blur=blur, overlap=0.5, merged=merged)
        for window in [(0, 0, *region), (3, 5, region[0] - 2, region[1] - 1)]:
            assert (fast.rgba(window) == plain.rgba(window)).all()
