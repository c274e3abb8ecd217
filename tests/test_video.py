"""``make_flythrough`` on a demo run: frames read back with OpenCV, the opening shows the whole
slide, a hold shows the top-attention patch; the plan's pure parts on small inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from clam_heat.config import load_config
from clam_heat.executors import make_executor
from clam_heat.runner import run_pipeline
from clam_heat.slide import open_slide
from clam_heat.video import VideoError, View, make_flythrough, plan_frames, top_regions

SIZE = (320, 180)
SLIDE = "demo_000"


def _frames(path: Path) -> tuple[list[np.ndarray], float, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames, count, size


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> dict:
    import shutil

    root = tmp_path_factory.mktemp("video")
    shutil.copytree(demo_source, root / "demo")
    config = root / "demo" / "config.yaml"
    summary = run_pipeline(load_config(config), stages=("infer",), executor=make_executor("serial"))
    assert summary.ok, summary.failed
    kwargs = {"seconds": 3.0, "fps": 10, "size": SIZE, "topk": 2}
    shown = make_flythrough(config, SLIDE, root / "out" / "fly.mp4", **kwargs)
    plain = make_flythrough(config, SLIDE, root / "out" / "plain.mp4", alpha=0.0, **kwargs)
    (blockmap,) = (root / "demo" / "heatmaps").rglob(f"{SLIDE}_blockmap.h5")
    with h5py.File(blockmap) as h5:
        scores = h5["attention_scores"][:, 0]
        coords = h5["coords"][:]
        patch = int(h5["coords"].attrs["patch_size_level0"])
    return {
        "config": config,
        "shown": shown,
        "plain": plain,
        "scores": scores,
        "coords": coords,
        "patch": patch,
        "slide": root / "demo" / "slides" / f"{SLIDE}.tiff",
    }


def test_frame_count_and_size_read_back(video_run: dict) -> None:
    info = video_run["shown"]
    frames, count, size = _frames(info.path)
    assert count == 30 == len(frames) == info.n_frames
    assert size == SIZE and frames[0].shape == (SIZE[1], SIZE[0], 3)
    assert info.seconds == pytest.approx(3.0)
    assert not list(info.path.parent.glob(".*"))  # no temp file left beside it


def test_first_frame_is_the_whole_slide(video_run: dict) -> None:
    info = video_run["shown"]
    first = _frames(info.path)[0][0].astype(np.float32)
    with open_slide(video_run["slide"]) as slide:
        (l0_w, l0_h), thumb = slide.dimensions, slide.read_level(1)
    scale = info.overview.l0_width / SIZE[0]  # level-0 px per frame px
    x0 = round((l0_w / 2 - info.overview.l0_cx) / scale + SIZE[0] / 2 - l0_w / scale / 2)
    y0 = round((l0_h / 2 - info.overview.l0_cy) / scale + SIZE[1] / 2 - l0_h / scale / 2)
    w, h = round(l0_w / scale), round(l0_h / scale)
    assert 0 <= x0 <= SIZE[0] - w and 0 <= y0 <= SIZE[1] - h  # all of it shows
    expected = cv2.resize(thumb, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    inner = (slice(y0 + 2, y0 + h - 2), slice(x0 + 2, x0 + w - 2))
    assert np.abs(first[inner] - expected[2:-2, 2:-2]).mean() < 8
    outside = first[:, : max(x0 - 2, 1)]  # letterbox: the background, not slide pixels
    assert outside.mean() < 40


def test_holds_zoom_on_the_top_attention_patch(video_run: dict) -> None:
    scores, coords, patch = video_run["scores"], video_run["coords"], video_run["patch"]
    top, low = coords[np.argmax(scores)], coords[np.argmin(scores)]
    info = video_run["plain"]
    assert info.regions[0] == (top[0] + patch / 2, top[1] + patch / 2)
    first, last = info.holds[0]
    frame = _frames(info.path)[0][(first + last) // 2].astype(np.float32)
    close = 8 * patch  # the close-up is zoom_patches (default 8) patches wide
    half = patch / (close / SIZE[0]) / 2 * 0.7  # inner 70 % of the patch, frame px
    cx, cy = SIZE[0] / 2, SIZE[1] / 2
    crop = frame[int(cy - half) : int(cy + half), int(cx - half) : int(cx + half)]
    with open_slide(video_run["slide"]) as slide:
        want = slide.read_region(tuple(int(v) for v in top), 0, (patch, patch))
        other = slide.read_region(tuple(int(v) for v in low), 0, (patch, patch))
    margin = int(patch * 0.15)
    want = want[margin:-margin, margin:-margin].reshape(-1, 3).mean(axis=0)
    other = other[margin:-margin, margin:-margin].reshape(-1, 3).mean(axis=0)
    got = crop.reshape(-1, 3).mean(axis=0)
    assert np.abs(got - want).max() < 12, (got, want)
    assert np.abs(got - want).sum() < np.abs(got - other).sum()


def test_heatmap_fades_in_over_the_tissue(video_run: dict) -> None:
    shown, _, _ = _frames(video_run["shown"].path)
    plain, _, _ = _frames(video_run["plain"].path)
    diff = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(shown, plain, strict=True)]
    assert diff[0] < 1.0  # the opening frame: no overlay yet
    # 30 frames, 15 % opening: frames 0-3 show the overview with the overlay at 0, 1/3, 2/3, 1
    assert diff[0] < diff[1] < diff[2] < diff[3]
    first, last = video_run["shown"].holds[0]
    assert diff[(first + last) // 2] > 10  # the close-up carries the overlay


def test_errors_name_the_problem(video_run: dict, tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no finished inference"):
        make_flythrough(video_run["config"], "nope", tmp_path / "x.mp4")
    with pytest.raises(VideoError, match="even"):
        make_flythrough(video_run["config"], SLIDE, tmp_path / "x.mp4", size=(321, 180))
    assert not (tmp_path / "x.mp4").exists()


def test_top_regions_are_spread_and_ordered() -> None:
    coords = np.array([[0, 0], [256, 0], [4096, 0], [512, 0], [8192, 0]])
    scores = np.array([0.9, 0.95, 0.5, 0.7, 0.1])
    # 0.95 at 256 first; 0.9 (0) and 0.7 (512) are within 1000 of it; then 0.5, then 0.1
    assert top_regions(coords, scores, 256, 3, 1000) == [
        (384.0, 128.0),
        (4224.0, 128.0),
        (8320.0, 128.0),
    ]
    assert top_regions(coords, scores, 256, 1, 0) == [(384.0, 128.0)]


def test_plan_starts_and_ends_on_the_overview() -> None:
    overview = View(2000, 1500, 6000)
    stops = [View(100, 100, 500), View(3000, 2000, 500)]
    views, heat, holds = plan_frames(overview, stops, 200)
    assert len(views) == len(heat) == 200
    assert views[0] == overview == views[-1] and heat[0] == 0.0 and heat[-1] == 1.0
    assert [views[a] for a, _ in holds] == stops and all(views[b] == views[a] for a, b in holds)
    assert all(b >= a for a, b in holds) and holds[0][1] < holds[1][0]
    widths = [v.l0_width for v in views[holds[0][1] : holds[1][0] + 1]]
    assert max(widths) > 500  # the camera backs out between far-apart regions
