"""Top-patch sampling: CLAM's selection rules, seeding, names and saved pixels."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from clam_heat.config import SampleSpec
from clam_heat.sampling import (
    sample_indices,
    sample_patches,
    sampled_patch_name,
    save_sampled_patches,
)
from clam_heat.slide import ArraySlide

SCORES = np.array([[0.3], [0.9], [0.1], [0.9], [0.5]], dtype=np.float32)  # CLAM's (N, 1)
# percentiles: 0.1 -> 20, 0.3 -> 40, 0.5 -> 60, the two 0.9 -> 90


def test_topk_and_reverse_topk_order() -> None:
    idx, warning = sample_indices(SCORES, mode="topk", k=3)
    assert idx.tolist() == [1, 3, 4] and warning is None  # tie 1/3: lower index first
    assert sample_indices(SCORES, mode="reverse_topk", k=2)[0].tolist() == [2, 0]
    assert sample_indices(SCORES, mode="topk", k=50)[0].tolist() == [1, 3, 4, 0, 2]


def test_range_sample_is_on_the_percentile_scale_and_seeded() -> None:
    idx, warning = sample_indices(SCORES, mode="range_sample", k=10, score_start=40, score_end=90)
    assert sorted(idx.tolist()) == [0, 1, 3, 4] and warning is None
    again, _ = sample_indices(
        SCORES, mode="range_sample", k=2, seed=7, score_start=40, score_end=90
    )
    assert (
        again.tolist()
        == sample_indices(SCORES, mode="range_sample", k=2, seed=7, score_start=40, score_end=90)[
            0
        ].tolist()
    )
    # inclusive bounds: exactly 20 and exactly 60
    assert sorted(
        sample_indices(SCORES, mode="range_sample", k=9, score_start=20, score_end=60)[0]
    ) == [0, 2, 4]


def test_range_sample_draws_like_clam_without_touching_global_state() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(500)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    idx, _ = sample_indices(scores, mode="range_sample", k=15, seed=5, score_start=45, score_end=55)
    assert np.array_equal(np.random.get_state()[1], before)
    # CLAM: np.random.seed(seed); np.random.choice(candidates, min(k, n), replace=False)
    pct = np.argsort(np.argsort(scores)) + 1.0  # distinct scores: rank
    candidates = np.flatnonzero((pct / 500 * 100 >= 45) & (pct / 500 * 100 <= 55))
    np.random.seed(5)
    expected = np.random.choice(candidates, min(15, len(candidates)), replace=False)
    assert idx.tolist() == expected.tolist()


def test_empty_range_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    idx, warning = sample_indices(SCORES, mode="range_sample", k=5, score_start=0, score_end=1)
    assert idx.tolist() == []
    assert (
        warning
        == "range_sample: no patch has a percentile in [0, 1] (0-100 scale; top half: 50-100)"
    )
    slide = ArraySlide(np.zeros((64, 64, 3), np.uint8), n_levels=1)
    spec = SampleSpec(name="r", mode="range_sample", k=3, score_start=0.2, score_end=0.5)
    paths, warn = sample_patches(
        slide,
        np.zeros((5, 2), int),
        SCORES,
        folder=tmp_path / "r",
        slide_id="s",
        patch_level=0,
        patch_size_level0=16,
        spec=spec,
    )
    assert paths == [] and "[0.2, 0.5]" in warn and not (tmp_path / "r").exists()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode 'best' is not one of"):
        sample_indices(SCORES, mode="best", k=1)
    with pytest.raises(ValueError, match="k = 0"):
        sample_indices(SCORES, mode="topk", k=0)
    assert sample_indices(np.zeros(0), mode="topk", k=3)[1] == "topk: no patches to sample from"


def test_saved_patches_names_and_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    slide = ArraySlide(image, n_levels=2, level_factor=2)
    coords = np.array([[0, 0], [256, 128], [512, 256], [64, 320]])
    scores = np.array([0.2, 0.8, 0.5, 0.9])
    folder = tmp_path / "sampled_patches" / "label_A_pred_1" / "topk_high_attention"
    spec = SampleSpec(name="topk_high_attention", mode="topk", k=2)
    paths, warning = sample_patches(
        slide,
        coords,
        scores,
        folder=folder,
        slide_id="slide-1",
        patch_level=1,
        patch_size_level0=128,
        spec=spec,
    )
    assert warning is None
    assert [p.name for p in paths] == [
        "0_slide-1_x_64_y_320_a_100.000.png",
        "1_slide-1_x_256_y_128_a_75.000.png",
    ]
    for path, (x, y) in zip(paths, [(64, 320), (256, 128)], strict=True):
        pixels = imagecodecs.png_decode(path.read_bytes())
        assert pixels.shape == (64, 64, 3)  # 128 level-0 px at level 1 (downsample 2)
        np.testing.assert_array_equal(pixels, slide.read_region((x, y), 1, (64, 64)))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)


def test_save_sampled_patches_direct(tmp_path: Path) -> None:
    slide = ArraySlide(np.full((100, 100, 3), 7, np.uint8), n_levels=1)
    paths = save_sampled_patches(
        slide, np.array([[10, 20]]), np.array([12.3456]), tmp_path, "s", 0, 32
    )
    assert [p.name for p in paths] == ["0_s_x_10_y_20_a_12.346.png"]
    assert sampled_patch_name(3, "a", (1, 2), 5.0) == "3_a_x_1_y_2_a_5.000.png"
    with pytest.raises(ValueError, match="2 scores for 1 coords"):
        save_sampled_patches(slide, np.array([[0, 0]]), np.zeros(2), tmp_path, "s", 0, 8)


def test_threaded_saving_writes_what_one_thread_writes(tmp_path: Path) -> None:
    """Patches are read and encoded on helper threads; files, names and order do not change."""
    import cv2

    from clam_heat.threads import helper_threads

    rng = np.random.default_rng(3)
    slide = ArraySlide(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8), n_levels=2)
    coords = rng.integers(0, 800, (12, 2))
    scores = rng.random(12)
    runs = {}
    previous = cv2.getNumThreads()
    try:
        for threads in (1, 2):
            cv2.setNumThreads(threads)  # how a local worker's CPU budget reaches the stage
            assert helper_threads() == threads
            folder = tmp_path / f"t{threads}"
            paths = save_sampled_patches(slide, coords, scores, folder, "s", 0, 128)
            runs[threads] = [(p.name, p.read_bytes()) for p in paths]
    finally:
        cv2.setNumThreads(previous)
    assert [name for name, _ in runs[2]] == [
        sampled_patch_name(rank, "s", xy, score)
        for rank, (xy, score) in enumerate(zip(coords.tolist(), scores.tolist(), strict=True))
    ]
    assert runs[1] == runs[2]
