"""Heatmap maths (hand-worked small arrays) and the tile-streamed renderer (real pixels)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import imagecodecs
import matplotlib
import numpy as np
import openslide
import pytest
import tifffile
from scipy.stats import percentileofscore, rankdata

from clam_heat.atomic import is_temp_name, sweep_temp_files
from clam_heat.errors import OutputError
from clam_heat.heatmap import (
    HeatmapSpec,
    accumulate_patches,
    apply_colormap,
    binarize_threshold,
    blend,
    colormap_index,
    gaussian_ksize,
    heatmap_image,
    paint_mask,
    patch_values,
    percentile_of_scores,
    render_heatmap,
    save_orig,
    to_percentiles,
    vis_geometry,
    write_attention_geojson,
)
from clam_heat.rows import blockmap_name, orig_name, production_heatmap_name
from clam_heat.slide import ArraySlide, open_slide
from clam_heat.tissue import TissueContours, rasterize_tissue

# ------------------------------------------------------------------------------- fixtures


def _pattern(h: int, w: int) -> np.ndarray:
    """A smooth, non-constant RGB image so canvas pixels are distinguishable."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx // 7 + yy // 5) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def slide() -> ArraySlide:
    """1600 x 1200 level 0, downsamples 1, 2, 4 (integer, like a scanner pyramid)."""
    return ArraySlide(_pattern(1200, 1600), n_levels=3, level_factor=2)


@pytest.fixture(scope="module")
def patches() -> tuple[np.ndarray, np.ndarray]:
    """An overlapping (step 32, patch 128 level-0) grid with holes and float32 scores."""
    rng = np.random.default_rng(1)
    gx, gy = np.meshgrid(np.arange(100, 1400, 32), np.arange(50, 1100, 32))
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    coords = coords[rng.random(len(coords)) < 0.8]
    scores = (rng.random(len(coords)) * 3 - 1).astype(np.float32)
    return coords, scores


@pytest.fixture(scope="module")
def tissue() -> TissueContours:
    outer = np.array([[80, 60], [1500, 80], [1450, 1150], [60, 1100]])
    hole = np.array([[600, 500], [900, 500], [900, 800], [600, 800]])
    return TissueContours((outer,), ((hole,),))


# ------------------------------------------------------ CLAM reference (literal, with loops)


def clam_visheatmap(
    slide,
    coords,
    scores,
    patch_size,
    *,
    vis_level,
    roi=None,
    blank_canvas=False,
    alpha=0.4,
    blur=False,
    overlap=0.0,
    tissue=None,
    convert_to_percentiles=False,
    binarize=False,
    thresh=-1.0,
    custom_downsample=1,
    cmap="jet",
):
    """CLAM's visHeatmap written step by step from its rules, one patch at a time.

    The rules: docs/rules/heatmaps.md#drawing.

    Only the final shrink uses our documented block mean instead of PIL's bicubic.
    """
    ds = slide.level_downsamples[vis_level]
    scale = np.array([1 / ds[0], 1 / ds[1]])
    scores = np.array(scores).flatten()
    coords = np.asarray(coords)
    threshold = ((1.0 / len(scores)) if thresh < 0 else thresh) if binarize else 0.0
    if roi is not None:
        tl, br = np.array(roi[:2]), np.array(roi[2:])
        inside = np.all((coords >= tl) & (coords <= br), axis=1)
        scores, coords = scores[inside], coords[inside] - tl
        w, h = (br * scale).astype(int) - (tl * scale).astype(int)
        top_left = (int(tl[0]), int(tl[1]))
    else:
        (w, h), top_left = slide.level_dimensions[vis_level], (0, 0)
    ps = np.ceil(np.array([patch_size, patch_size]) * scale).astype(int)
    coords = np.ceil(coords * scale).astype(int)
    if convert_to_percentiles:
        scores = rankdata(scores, "average") / len(scores) * 100
    scores /= 100
    overlay = np.zeros((h, w), dtype=float)
    counter = np.zeros((h, w), dtype=np.uint16)
    for (x, y), s in zip(coords, scores, strict=True):
        value = (1.0 if binarize else s) if s >= threshold else 0.0
        overlay[y : y + ps[1], x : x + ps[0]] += value
        counter[y : y + ps[1], x : x + ps[0]] += 1
    hit = counter > 0
    overlay[hit] = overlay[hit] / counter[hit]
    if binarize:
        overlay[hit] = np.around(overlay[hit])
    ksize = tuple((ps * (1 - overlap)).astype(int) * 2 + 1)
    if blur:
        overlay = cv2.GaussianBlur(overlay, ksize, 0)
    if blank_canvas:
        canvas = np.full((h, w, 3), 255, np.uint8)
    else:
        canvas = slide.read_region(top_left, vis_level, (w, h))
    img = canvas.copy()
    cm = matplotlib.colormaps[cmap]
    for (x, y), s in zip(coords, scores, strict=True):
        if s >= threshold:
            block = img[y : y + ps[1], x : x + ps[0]].copy()
            colour = (cm(overlay[y : y + ps[1], x : x + ps[0]]) * 255)[:, :, :3].astype(np.uint8)
            if tissue is not None:
                inside = tissue[y : y + ps[1], x : x + ps[0]]
                block[inside] = colour[inside]
            else:
                block = colour
            img[y : y + ps[1], x : x + ps[0]] = block
    if blur:
        img = cv2.GaussianBlur(img, ksize, 0)
    if alpha < 1:
        img = cv2.addWeighted(img, alpha, canvas, 1 - alpha, 0)
    cd = custom_downsample
    if cd > 1:
        img = cv2.resize(
            np.ascontiguousarray(img[: h // cd * cd, : w // cd * cd]),
            (w // cd, h // cd),
            interpolation=cv2.INTER_AREA,
        )
    return img


def _region_mask(slide, tc, level, roi):
    ds = slide.level_downsamples[level]
    scale = (1 / ds[0], 1 / ds[1])
    if roi is None:
        (w, h), tl = slide.level_dimensions[level], (0, 0)
    else:
        tl = roi[:2]
        w = int(roi[2] * scale[0]) - int(roi[0] * scale[0])
        h = int(roi[3] * scale[1]) - int(roi[1] * scale[1])
    return rasterize_tissue(tc, l0_origin=tl, shape=(h, w), scale=scale)


# ------------------------------------------------------------------------ percentiles


def test_to_percentiles_ties_hand_worked() -> None:
    assert to_percentiles(np.array([0.1, 0.5, 0.5, 0.9])).tolist() == [25.0, 62.5, 62.5, 100.0]
    assert to_percentiles(np.array([[2.0], [2.0], [2.0], [2.0]])).tolist() == [62.5] * 4
    assert to_percentiles(np.array([7.0])).tolist() == [100.0]
    assert to_percentiles(np.zeros(0)).shape == (0,)


def test_to_percentiles_equals_scipy_rankdata() -> None:
    rng = np.random.default_rng(0)
    for s in (rng.random(999), rng.integers(0, 7, 500).astype(np.float32), rng.normal(size=64)):
        assert np.array_equal(to_percentiles(s), rankdata(s, "average") / len(s) * 100)


def test_to_percentiles_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        to_percentiles(np.array([0.1, np.nan]))


def test_percentile_of_scores_hand_worked() -> None:
    ref = np.array([[0.1], [0.5], [0.5], [0.9]])  # CLAM's (N, 1) reference shape
    got = percentile_of_scores(np.array([[0.5], [0.2], [1.0], [0.0], [0.9]]), ref)
    # tie -> (1 + 3 + 1) * 50 / 4; between -> (1 + 1) * 50 / 4; above max -> 100; below -> 0
    assert got.tolist() == [62.5, 25.0, 100.0, 0.0, 100.0]


def test_percentile_of_scores_matches_scipy_rank_kind() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 20, 300).astype(np.float32)
    s = np.concatenate([rng.integers(-2, 23, 200).astype(np.float32), ref[:10]])
    expected = [percentileofscore(ref, v, kind="rank") for v in s]
    np.testing.assert_allclose(percentile_of_scores(s, ref), expected, rtol=1e-15)


def test_percentile_of_scores_nan_and_empty() -> None:
    assert np.isnan(percentile_of_scores(np.array([np.nan, 1.0]), np.array([1.0]))[0])
    assert np.isnan(percentile_of_scores(np.array([1.0]), np.array([np.nan, 1.0]))).all()
    with pytest.raises(ValueError, match="reference scores are empty"):
        percentile_of_scores(np.array([1.0]), np.zeros(0))


# ---------------------------------------------------------------------- threshold/overlay


def test_binarize_threshold_rule() -> None:
    assert binarize_threshold(-1, 8) == 0.125
    assert binarize_threshold(0.4, 8) == 0.4
    with pytest.raises(ValueError, match="at least one patch"):
        binarize_threshold(-1, 0)


def test_overlap_average_counts_below_threshold_patches() -> None:
    # patch A (score 0.8) covers x,y in [0,2); patch B (score 0.1, below 0.5) covers [1,3)
    values, above = patch_values(np.array([0.8, 0.1]), 0.5)
    assert values.tolist() == [0.8, 0.0] and above.tolist() == [True, False]
    overlay, counter = accumulate_patches(np.array([[0, 0], [1, 1]]), 2, values, (4, 4))
    expected = np.array(
        [[0.8, 0.8, 0, 0], [0.8, 0.4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float64
    )
    np.testing.assert_array_equal(overlay, expected)
    assert counter.tolist() == [[1, 1, 0, 0], [1, 2, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    painted = paint_mask(np.array([[0, 0], [1, 1]]), 2, above, (4, 4))
    assert painted.astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0] * 4]


def test_binarize_rounds_half_to_even() -> None:
    values, _ = patch_values(np.array([0.9, 0.2, 0.9]), 0.25, binarize=True)
    assert values.tolist() == [1.0, 0.0, 1.0]
    xy = np.array([[0, 0], [1, 0], [2, 0]])
    overlay, _ = accumulate_patches(xy, (2, 1), values, (1, 4), binarize=True)
    # column 1: (1 + 0) / 2 = 0.5 -> 0 (half to even); column 2: (0 + 1) / 2 -> 0; col 3: 1
    assert overlay.tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_accumulation_is_clipped_and_exact_for_many_overlaps() -> None:
    rng = np.random.default_rng(5)
    xy = rng.integers(-3, 40, (300, 2))
    xy[:, :] = np.clip(xy, 0, None)
    vals = rng.random(300).astype(np.float32).astype(np.float64)
    overlay, counter = accumulate_patches(xy, (9, 7), vals, (30, 35))
    ref_sum = np.zeros((30, 35))
    ref_cnt = np.zeros((30, 35), int)
    for (x, y), v in zip(xy, vals, strict=True):
        ref_sum[y : y + 7, x : x + 9] += v
        ref_cnt[y : y + 7, x : x + 9] += 1
    hit = ref_cnt > 0
    ref_sum[hit] /= ref_cnt[hit]
    np.testing.assert_array_equal(counter, ref_cnt)
    np.testing.assert_array_equal(overlay, ref_sum)  # float32 inputs: CLAM's sum is exact


def test_vis_geometry_roi_inclusive_and_ceil() -> None:
    coords = np.array([[100, 100], [99, 100], [300, 300], [301, 100], [257, 130]])
    keep, xy, ps, region = vis_geometry(coords, 100, (3.0, 3.0), (100, 100, 300, 300))
    assert keep.tolist() == [True, False, True, False, True]
    assert xy.tolist() == [[0, 0], [67, 67], [53, 10]]  # ceil((c - tl) / 3)
    assert ps.tolist() == [34, 34] and region == (67, 67)  # int(300/3) - int(100/3)


def test_vis_geometry_non_square_pyramid_hand_worked() -> None:
    """A scanner level whose downsample differs in x and y, (4.0, 4.02): every value below is
    worked by hand per axis, so a swap of the x and y downsample fails."""
    coords = np.array([[1001, 1403], [400, 1800], [2001, 500], [399, 900]])
    # ROI (400, 400, 2000, 1800): 1 and 2 kept (x1/y2 inclusive), 3 has x > x2, 4 has x < x1
    keep, xy, ps, region = vis_geometry(coords, 1000, (4.0, 4.02), (400, 400, 2000, 1800))
    assert keep.tolist() == [True, True, False, False]
    # shifted (601, 1003): x ceil(601 / 4) = ceil(150.25) = 151; y ceil(1003 / 4.02) =
    # ceil(249.50) = 250. Shifted (0, 1400): x 0; y ceil(1400 / 4.02) = ceil(348.26) = 349
    assert xy.tolist() == [[151, 250], [0, 349]]
    # patch: x ceil(1000 / 4) = 250; y ceil(1000 / 4.02) = ceil(248.76) = 249
    assert ps.tolist() == [250, 249]
    # region: x int(2000 / 4) - int(400 / 4) = 500 - 100 = 400;
    # y int(1800 / 4.02) - int(400 / 4.02) = int(447.76) - int(99.50) = 447 - 99 = 348
    assert region == (400, 348)
    # no ROI: the level's (w, h) is the region; corners scale per axis
    keep, xy, ps, region = vis_geometry(coords[:1], 1000, (4.0, 4.02), None, (500, 401))
    assert keep.tolist() == [True] and region == (500, 401)
    # (1001, 1403): x ceil(250.25) = 251; y ceil(1403 / 4.02) = ceil(349.00498) = 350
    assert xy.tolist() == [[251, 350]] and ps.tolist() == [250, 249]


def test_canvas_reads_on_a_non_integer_pyramid_match_one_read(patches, tissue) -> None:
    """Level 1 of a 1600 x 1206 slide is 400 x 301: downsample (4.0, 4.0066), as scanners
    write. Tiles read their canvas where CLAM's single region read puts it, with or without
    ROI, so every tiling gives CLAM's picture (rounding vis -> level 0 read one row short)."""
    odd = ArraySlide(_pattern(1206, 1600), n_levels=2, level_factor=4)
    assert odd.level_downsamples[1] == (4.0, 1206 / 301)
    coords, raw = patches
    for roi in (None, (200, 130, 1300, 999)):
        spec = HeatmapSpec(vis_level=1, roi=roi, blur=True, overlap=0.75, use_percentiles=True)
        ref = clam_visheatmap(
            odd, coords, raw, 128, vis_level=1, roi=roi, blur=True, overlap=0.75,
            tissue=_region_mask(odd, tissue, 1, roi), convert_to_percentiles=True,
        )  # fmt: skip
        for tile in (4096, 37, 100):
            got = heatmap_image(odd, coords, raw, 128, replace(spec, tile_size=tile), tissue=tissue)
            np.testing.assert_array_equal(got, ref, err_msg=f"roi {roi}, tile {tile}")


def test_gaussian_kernel_size() -> None:
    assert gaussian_ksize((64, 32), 0.0) == (129, 65)
    assert gaussian_ksize((64, 64), 0.9) == (13, 13)


# ------------------------------------------------------------------------ colour/blend


@pytest.mark.parametrize("cmap", ["jet", "coolwarm", "viridis", "gray"])
def test_colormap_matches_matplotlib_truncation(cmap: str) -> None:
    v = np.concatenate([np.linspace(-0.1, 1.1, 1001), [0.0, 1.0, 0.5, 1 / 3, np.nan]])
    cm = matplotlib.colormaps[cmap]
    expected = (cm(v) * 255)[:, :3].astype(np.uint8)
    np.testing.assert_array_equal(apply_colormap(v, cmap), expected)
    np.testing.assert_array_equal(apply_colormap(v.reshape(-1, 1), cmap)[:, 0], expected)


def test_colormap_index_rules_and_unknown_name() -> None:
    assert colormap_index(np.array([1.0, 0.99999, 0.0]), 256).tolist() == [255, 255, 0]
    with pytest.raises(ValueError, match="not a matplotlib colormap"):
        apply_colormap(np.zeros(2), "no-such-map")


def test_blend_rounds_like_clam() -> None:
    c, s = np.meshgrid(np.arange(256), np.arange(256))
    colour = np.repeat(c[..., None], 3, -1).astype(np.uint8)
    canvas = np.repeat(s[..., None], 3, -1).astype(np.uint8)
    out = blend(colour, canvas, 0.4)
    np.testing.assert_array_equal(out, np.round(0.4 * colour + 0.6 * canvas).astype(np.uint8))
    np.testing.assert_array_equal(blend(canvas, canvas, 0.4), canvas)  # unpainted unchanged
    assert blend(colour, canvas, 1.0) is colour


# ------------------------------------------------------------------ renderer vs CLAM


CASES = {
    "plain": dict(vis_level=1),
    "given-percentiles": dict(vis_level=1, pct=False, alpha=0.5),
    "roi": dict(vis_level=1, roi=(200, 130, 1300, 999)),
    "blur": dict(vis_level=1, blur=True),
    "binarize-blank-blur": dict(vis_level=2, blur=True, binarize=True, blank=True, seg=False),
    "roi-blur-cd3": dict(vis_level=0, roi=(301, 207, 1291, 1003), blur=True, cd=3, alpha=0.7),
    "binarize-cd2-alpha1": dict(vis_level=1, binarize=True, cd=2, alpha=1.0),
    "thresh": dict(vis_level=1, binarize=True, thresh=0.7),
}


def _run_case(slide, patches, tissue, case, tile):
    coords, raw = patches
    kw = CASES[case]
    pct = kw.get("pct", True)
    scores = raw if pct else (np.clip(raw, 0, 1) * 100).astype(np.float32)
    seg = kw.get("seg", True)
    spec = HeatmapSpec(
        vis_level=kw["vis_level"],
        roi=kw.get("roi"),
        blur=kw.get("blur", False),
        binarize=kw.get("binarize", False),
        binary_thresh=kw.get("thresh", -1.0),
        use_percentiles=pct,
        custom_downsample=kw.get("cd", 1),
        blank_canvas=kw.get("blank", False),
        segment=seg,
        alpha=kw.get("alpha", 0.4),
        overlap=0.75,
        tile_size=tile,
    )
    got = heatmap_image(slide, coords, scores, 128, spec, tissue=tissue)
    return got, spec, scores, seg


@pytest.mark.parametrize("case", list(CASES))
def test_renderer_matches_clam_reference_pixel_for_pixel(slide, patches, tissue, case) -> None:
    got, spec, scores, seg = _run_case(slide, patches, tissue, case, tile=4096)
    mask = _region_mask(slide, tissue, spec.vis_level, spec.roi) if seg else None
    ref = clam_visheatmap(
        slide,
        patches[0],
        scores,
        128,
        vis_level=spec.vis_level,
        roi=spec.roi,
        blank_canvas=spec.blank_canvas,
        alpha=spec.alpha,
        blur=spec.blur,
        overlap=spec.overlap,
        tissue=mask,
        convert_to_percentiles=spec.use_percentiles,
        binarize=spec.binarize,
        thresh=spec.binary_thresh,
        custom_downsample=spec.custom_downsample,
    )
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    ("case", "tiles"),
    [
        ("plain", (16, 37, 100)),
        ("binarize-cd2-alpha1", (16, 37, 100)),
        ("blur", (37, 150)),
        ("roi-blur-cd3", (20, 70)),
    ],
)
def test_tile_streaming_gives_the_same_pixels(slide, patches, tissue, case, tiles) -> None:
    whole, *_ = _run_case(slide, patches, tissue, case, tile=4096)
    for tile in tiles:
        tiled, *_ = _run_case(slide, patches, tissue, case, tile=tile)
        np.testing.assert_array_equal(tiled, whole)


def test_tissue_mask_blocks_are_tiling_independent_on_a_large_region(tissue) -> None:
    # > MASK_TILE px wide at vis level 0, so the mask is composed from several blocks
    big = ArraySlide(_pattern(1200, 2600), n_levels=1)
    tc = TissueContours((np.array([[5, 5], [2590, 40], [2500, 1190], [30, 1150]]),))
    gx, gy = np.meshgrid(np.arange(0, 2500, 64), np.arange(0, 1100, 64))
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    scores = np.linspace(0, 1, len(coords)).astype(np.float32)
    images = [
        heatmap_image(big, coords, scores, 128, HeatmapSpec(vis_level=0, tile_size=t), tissue=tc)
        for t in (4096, 300, 1024)
    ]
    np.testing.assert_array_equal(images[1], images[0])
    np.testing.assert_array_equal(images[2], images[0])


def test_threshold_and_holes_show_the_canvas(slide, tissue) -> None:
    # two 256-px level-0 patches -> 128 px at vis level 1; the second is below the threshold
    coords = np.array([[520, 520], [1000, 200]])  # vis squares [260, 388) and x [500, 628)
    scores = np.array([90.0, 20.0], dtype=np.float32)
    spec = HeatmapSpec(vis_level=1, binarize=True, binary_thresh=0.5, alpha=0.5)
    img = heatmap_image(slide, coords, scores, 256, spec, tissue=tissue)
    canvas = slide.read_region((0, 0), 1, slide.level_dimensions[1])
    in_hole = (slice(305, 385), slice(305, 385))  # hole: level-0 600..900 -> vis 300..450
    np.testing.assert_array_equal(img[in_hole], canvas[in_hole])
    below = (slice(100, 228), slice(500, 628))
    np.testing.assert_array_equal(img[below], canvas[below])
    tissue_px = (slice(262, 290), slice(262, 290))  # in the patch, in tissue, not in the hole
    red = np.broadcast_to(np.array([127, 0, 0], np.uint8), (28, 28, 3))  # jet(1.0)
    expected = np.round(0.5 * red + 0.5 * canvas[tissue_px]).astype(np.uint8)
    np.testing.assert_array_equal(img[tissue_px], expected)


def test_segment_false_and_no_tissue_paint_whole_patches(slide) -> None:
    coords = np.array([[0, 0]])
    spec = HeatmapSpec(vis_level=1, alpha=1.0, segment=False)
    img = heatmap_image(slide, coords, np.array([100.0]), 64, spec, tissue=None)
    np.testing.assert_array_equal(img[:32, :32], np.broadcast_to([127, 0, 0], (32, 32, 3)))
    empty = TissueContours()
    img2 = heatmap_image(
        slide, coords, np.array([100.0]), 64, HeatmapSpec(vis_level=1), tissue=empty
    )
    np.testing.assert_array_equal(img2, slide.read_region((0, 0), 1, (800, 600)))


def test_blank_canvas_is_white_where_unpainted(slide) -> None:
    spec = HeatmapSpec(vis_level=2, blank_canvas=True, segment=False)
    img = heatmap_image(slide, np.array([[0, 0]]), np.array([50.0]), 64, spec)
    assert (img[20:, 20:] == 255).all()
    assert not (img[:16, :16] == 255).all()


def test_roi_output_is_the_region(slide, patches) -> None:
    coords, scores = patches
    roi = (400, 200, 1000, 800)
    spec = HeatmapSpec(vis_level=1, roi=roi, use_percentiles=True, segment=False)
    img = heatmap_image(slide, coords, scores, 128, spec)
    assert img.shape == (300, 300, 3)
    full = heatmap_image(
        slide, coords, scores, 128, HeatmapSpec(vis_level=1, segment=False, use_percentiles=True)
    )
    assert not np.array_equal(img, full[100:400, 200:500])  # percentiles are within the ROI


def test_custom_downsample_is_a_block_mean(slide, patches, tissue) -> None:
    coords, scores = patches
    base = dict(vis_level=1, use_percentiles=True)
    full = heatmap_image(slide, coords, scores, 128, HeatmapSpec(**base), tissue=tissue)
    small = heatmap_image(
        slide, coords, scores, 128, HeatmapSpec(**base, custom_downsample=3), tissue=tissue
    )
    assert small.shape == (600 // 3, 800 // 3, 3)
    means = full[:600, :798].reshape(200, 3, 266, 3, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(small - means).max() <= 0.5 + 1e-9


def test_no_patches_gives_the_canvas_and_errors_are_clear(slide) -> None:
    spec = HeatmapSpec(vis_level=2)
    img = heatmap_image(slide, np.zeros((0, 2), int), np.zeros(0, np.float32), 64, spec)
    np.testing.assert_array_equal(img, slide.read_level(2))
    with pytest.raises(ValueError, match="3 scores for 2 coords"):
        heatmap_image(slide, np.zeros((2, 2), int), np.zeros(3), 64, spec)
    with pytest.raises(ValueError, match="NaN or inf"):
        heatmap_image(slide, np.zeros((1, 2), int), np.array([np.nan]), 64, spec)
    with pytest.raises(ValueError, match="overlap = 1.0: must be in"):
        HeatmapSpec(overlap=1.0)
    with pytest.raises(ValueError, match="not a matplotlib colormap"):
        HeatmapSpec(cmap="nope")


# --------------------------------------------------------------------------------- outputs


def test_outputs_jpg_png_tiff_and_pyramid(tmp_path: Path, slide, patches, tissue) -> None:
    coords, scores = patches
    spec = HeatmapSpec(vis_level=0, use_percentiles=True, tile_size=256)
    expected = heatmap_image(slide, coords, scores, 128, spec, tissue=tissue)
    png, jpg, tif = tmp_path / "h.png", tmp_path / "out" / "h.jpg", tmp_path / "h.tiff"
    pyr = tmp_path / "h_pyramid.tiff"
    res = render_heatmap(
        slide, coords, scores, 128, spec, tissue=tissue, out_path=png, pyramid_tiff_path=pyr
    )
    assert res.paths == (png, pyr) and res.shape == (1200, 1600) and res.vis_level == 0
    np.testing.assert_array_equal(imagecodecs.png_decode(png.read_bytes()), expected)
    render_heatmap(slide, coords, scores, 128, spec, tissue=tissue, out_path=jpg)
    decoded = imagecodecs.jpeg8_decode(jpg.read_bytes())
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 1.5  # quality 100
    render_heatmap(slide, coords, scores, 128, spec, tissue=tissue, out_path=tif)
    np.testing.assert_array_equal(tifffile.imread(tif), expected)
    # the pyramid opens in OpenSlide: tiled levels 1, 2, 4, ... and the vis-level MPP
    with openslide.OpenSlide(str(pyr)) as osr:
        assert osr.level_dimensions[:3] == ((1600, 1200), (800, 600), (400, 300))
        assert osr.level_downsamples[:3] == (1.0, 2.0, 4.0)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        level0 = np.asarray(osr.read_region((0, 0), 0, (1600, 1200)))[..., :3]
        assert np.abs(level0.astype(int) - expected).mean() < 3
    with tifffile.TiffFile(pyr) as tf:
        pages = list(tf.pages)
        assert [p.subfiletype for p in pages] == [0] + [1] * (len(pages) - 1)
        assert all(p.is_tiled and p.photometric == 2 and p.compression == 7 for p in pages)
        assert not pages[0].subifds
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == [] and not [p for p in tmp_path.rglob("*") if is_temp_name(p.name)]


def test_pyramid_of_a_custom_downsampled_openslide_slide(tmp_path: Path) -> None:
    """Real OpenSlide on a real tiled pyramid written with tifffile; MPP follows cd."""
    img = _pattern(1024, 1536)
    path = tmp_path / "slide.tiff"
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate((1, 2, 4)):
            level = cv2.resize(img, (1536 // ds, 1024 // ds), interpolation=cv2.INTER_AREA)
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(1e4 / (0.25 * ds), 1e4 / (0.25 * ds)),
                resolutionunit="CENTIMETER",
            )
    gx, gy = np.meshgrid(np.arange(0, 1400, 64), np.arange(0, 900, 64))
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    scores = np.random.default_rng(2).random(len(coords)).astype(np.float32)
    with open_slide(path) as sl:
        spec = HeatmapSpec(vis_level=1, custom_downsample=2, use_percentiles=True, tile_size=64)
        ref = clam_visheatmap(
            sl, coords, scores, 128, vis_level=1, convert_to_percentiles=True, custom_downsample=2
        )
        pyr = tmp_path / "pyr.tiff"
        res = render_heatmap(
            sl, coords, scores, 128, spec, out_path=tmp_path / "h.png", pyramid_tiff_path=pyr
        )
    np.testing.assert_array_equal(imagecodecs.png_decode((tmp_path / "h.png").read_bytes()), ref)
    assert res.shape == (256, 384)
    with openslide.OpenSlide(str(pyr)) as osr:
        assert osr.level_dimensions[0] == (384, 256)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25 * 2 * 2)


def test_save_orig_streams_the_slide(tmp_path: Path, slide) -> None:
    out = save_orig(slide, 1, 1, tmp_path / orig_name("s", 1, "png"), tile_size=100)
    np.testing.assert_array_equal(imagecodecs.png_decode(out.read_bytes()), slide.read_level(1))
    small = save_orig(slide, 1, 4, tmp_path / "s_orig_1_cd4.png")
    assert imagecodecs.png_decode(small.read_bytes()).shape == (150, 200, 3)
    assert out.name == "s_orig_1.png"
    odd = ArraySlide(_pattern(1206, 1600), n_levels=2, level_factor=4)  # (4.0, 4.0066)
    tiled = save_orig(odd, 1, 1, tmp_path / "odd.png", tile_size=16)
    np.testing.assert_array_equal(imagecodecs.png_decode(tiled.read_bytes()), odd.read_level(1))


def _fail_reads_after(monkeypatch: pytest.MonkeyPatch, n_reads: int) -> None:
    """Fault: every ArraySlide read after the first ``n_reads`` raises SlideError."""
    from clam_heat.errors import SlideError

    calls = {"n": 0}
    real = ArraySlide.read_region

    def flaky(self, l0_xy, level, size):
        calls["n"] += 1
        if calls["n"] > n_reads:
            raise SlideError(self.path, "reading pixels failed", "the file is corrupt")
        return real(self, l0_xy, level, size)

    monkeypatch.setattr(ArraySlide, "read_region", flaky)


def test_failed_render_leaves_no_file(tmp_path: Path, slide, monkeypatch) -> None:
    from clam_heat.errors import SlideError

    _fail_reads_after(monkeypatch, 3)
    spec = HeatmapSpec(vis_level=0, tile_size=128)
    with pytest.raises(SlideError, match="reading pixels failed"):
        render_heatmap(
            slide,
            np.zeros((1, 2), int),
            np.ones(1),
            64,
            spec,
            out_path=tmp_path / "h.jpg",
            pyramid_tiff_path=tmp_path / "p.tiff",
        )
    assert list(tmp_path.iterdir()) == []


def test_tiff_writer_failure_is_an_output_error(tmp_path: Path, slide, monkeypatch) -> None:
    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "write", broken)
    spec = HeatmapSpec(vis_level=0, tile_size=128)
    with pytest.raises(OutputError, match="p.tiff: TIFF writing failed .*No space left"):
        render_heatmap(
            slide, np.zeros((1, 2), int), np.ones(1), 64, spec,
            out_path=tmp_path / "h.png", pyramid_tiff_path=tmp_path / "p.tiff",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_explicit_mask_and_jpeg_size_limit(tmp_path: Path, slide, monkeypatch) -> None:
    import clam_heat.heatmap.writers as hm

    mask = np.zeros((300, 400), dtype=bool)
    mask[:, 200:] = True  # right half of vis level 2 is tissue
    spec = HeatmapSpec(vis_level=2, alpha=1.0)
    img = heatmap_image(slide, np.array([[0, 0]]), np.array([100.0]), 1600, spec, tissue=mask)
    np.testing.assert_array_equal(img[:, :200], slide.read_level(2)[:, :200])
    assert (img[:, 200:] == [127, 0, 0]).all()
    with pytest.raises(ValueError, match=r"tissue mask shape \(3, 3\) != region"):
        heatmap_image(slide, np.zeros((0, 2)), np.zeros(0), 64, spec, tissue=np.ones((3, 3), bool))
    monkeypatch.setattr(hm, "JPEG_MAX_SIDE", 300)
    with pytest.raises(OutputError, match="too large for JPEG"):
        render_heatmap(slide, np.zeros((0, 2)), np.zeros(0), 64, spec, out_path=tmp_path / "a.jpg")


def test_unwritable_and_unknown_outputs(tmp_path: Path, slide) -> None:
    spec = HeatmapSpec(vis_level=2)
    with pytest.raises(OutputError, match="unsupported image extension"):
        render_heatmap(
            slide, np.zeros((0, 2), int), np.zeros(0), 64, spec, out_path=tmp_path / "h.bmp"
        )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write here"):
        render_heatmap(
            slide, np.zeros((0, 2), int), np.zeros(0), 64, spec, out_path=blocker / "h.jpg"
        )


def test_real_aperio_slide(real_slide_path: Path, tmp_path: Path) -> None:
    from clam_heat.tissue import SegmentationParams, segment_slide

    with open_slide(real_slide_path) as sl:
        tc, _ = segment_slide(sl, SegmentationParams())
        w, h = sl.dimensions
        gx, gy = np.meshgrid(np.arange(0, w - 256, 128), np.arange(0, h - 256, 128))
        coords = np.stack([gx.ravel(), gy.ravel()], 1)
        scores = np.random.default_rng(0).random(len(coords))
        spec = HeatmapSpec(vis_level=-1, overlap=0.5, use_percentiles=True)
        res = render_heatmap(sl, coords, scores, 256, spec, tissue=tc, out_path=tmp_path / "h.jpg")
        assert res.vis_level == 0 and res.shape == (h, w)
    assert imagecodecs.jpeg8_decode((tmp_path / "h.jpg").read_bytes()).shape == (h, w, 3)


def _wait_for_spool(sink) -> Path:
    """The pyramid writer's first spool file, once the writer thread has made it."""
    import time

    deadline = time.monotonic() + 60
    while not (sink.spools and sink.spools[0].exists()):
        assert time.monotonic() < deadline, "the pyramid writer made no spool file"
        time.sleep(0.01)
    return sink.spools[0]


def test_failed_pyramid_render_leaves_only_swept_temp_names(
    tmp_path: Path, slide, monkeypatch
) -> None:
    """A sink fails after the pyramid's spool exists: every file it had made is a temp name
    (the start-up sweep's), and the failure itself removes them all."""
    from clam_heat.heatmap.writers import TiffSink

    real_push = TiffSink.push
    seen: list[str] = []

    def failing_push(self, y0, strip):
        real_push(self, y0, strip)
        if self.pyramid:
            _wait_for_spool(self)
            seen.extend(p.name for p in tmp_path.iterdir())
            raise RuntimeError("injected sink failure")

    monkeypatch.setattr(TiffSink, "push", failing_push)
    spec = HeatmapSpec(vis_level=0, tile_size=128)
    with pytest.raises(RuntimeError, match="injected sink failure"):
        render_heatmap(
            slide, np.array([[0, 0]]), np.array([50.0]), 256, spec,
            out_path=tmp_path / "h.tiff", pyramid_tiff_path=tmp_path / "p.tiff",
        )  # fmt: skip
    spools = [n for n in seen if n.startswith(".p.tiff.spool-")]
    assert spools and all(is_temp_name(n) for n in seen), seen
    assert {n.split(".")[1] for n in seen} == {"h", "p"}  # both TIFFs' temp files, nothing else
    assert list(tmp_path.iterdir()) == []


_KILL_MID_RENDER = """
import os, signal, sys, time
import numpy as np
from clam_heat.heatmap import HeatmapSpec, render_heatmap
from clam_heat.heatmap.writers import TiffSink
from clam_heat.slide import ArraySlide

real_push = TiffSink.push

def push(self, y0, strip):
    real_push(self, y0, strip)
    if self.pyramid:
        deadline = time.monotonic() + 60
        while not (self.spools and self.spools[0].exists()) and time.monotonic() < deadline:
            time.sleep(0.01)
        print(self.spools[0].name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

TiffSink.push = push
out = sys.argv[1]
slide = ArraySlide(np.full((1200, 1600, 3), 200, np.uint8), n_levels=1)
render_heatmap(
    slide, np.array([[0, 0]]), np.array([50.0]), 256, HeatmapSpec(vis_level=0, tile_size=128),
    out_path=f"{out}/h.tiff", pyramid_tiff_path=f"{out}/p.tiff",
)
"""


def test_render_killed_mid_way_leaves_only_names_the_sweep_removes(tmp_path: Path) -> None:
    """SIGKILL after the pyramid's spool exists (no cleanup runs): what is left is exactly the
    temp files, all named as :func:`~clam_heat.atomic.is_temp_name` expects, and
    :func:`~clam_heat.atomic.sweep_temp_files` removes every one."""
    import os
    import signal
    import subprocess
    import sys

    import clam_heat

    root = Path(clam_heat.__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_RENDER, str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    spool = proc.stdout.strip()
    left = sorted(p.name for p in out.iterdir())
    assert spool in left and spool.startswith(".p.tiff.spool-")
    assert len(left) >= 3 and all(is_temp_name(n) for n in left), left  # h, p and p's spool
    assert sweep_temp_files(tmp_path) == len(left)
    assert list(out.iterdir()) == []


@pytest.fixture()
def real_slide_path(real_slide: Path) -> Path:
    return real_slide


# ------------------------------------------------------------------------- names/geojson


def test_file_names_match_clam() -> None:
    args = dict(
        use_roi=False,
        blur=False,
        use_ref_scores=True,
        blank_canvas=False,
        alpha=0.4,
        vis_level=1,
        binarize=False,
        binary_thresh=-1,
        save_ext="jpg",
    )
    name = production_heatmap_name("C3L-01663-21", args, 0.5)
    assert name == "C3L-01663-21_0.5_roi_0_blur_0_rs_1_bc_0_a_0.4_l_1_bi_0_-1.0.jpg"
    args.update(use_roi=True, blur=True, vis_level=-1, binarize=True, binary_thresh=0.3, alpha=1)
    assert production_heatmap_name("s", args, 0) == (
        "s_0.0_roi_1_blur_1_rs_1_bc_0_a_1.0_l_-1_bi_1_0.3.jpg"
    )
    assert blockmap_name("s") == "s_blockmap.png"
    assert orig_name("s", 2, "tiff") == "s_orig_2.tiff"
    with pytest.raises(ValueError, match="lacks save_ext"):
        production_heatmap_name("s", {k: v for k, v in args.items() if k != "save_ext"}, 0.5)


def test_geojson_for_qupath(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [256, 512], [512, 0]])
    scores = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    out = write_attention_geojson(coords, scores, 256, tmp_path / "a.geojson", chunk=2)
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    feat = doc["features"][1]
    assert feat["type"] == "Feature"
    assert feat["geometry"] == {
        "type": "Polygon",
        "coordinates": [[[256, 512], [512, 512], [512, 768], [256, 768], [256, 512]]],
    }
    assert feat["properties"] == {
        "objectType": "tile",
        "measurements": {"attention": -1.25, "percentile": pytest.approx(100 / 3)},
    }
    assert [f["properties"]["measurements"]["percentile"] for f in doc["features"]] == [
        pytest.approx(200 / 3),
        pytest.approx(100 / 3),
        100.0,
    ]
    empty = write_attention_geojson(np.zeros((0, 2)), np.zeros(0), 256, tmp_path / "e.geojson")
    assert json.loads(empty.read_text())["features"] == []


# --------------------------------------------------------------------------------------------
# large JPEG / PNG: streamed through a TIFF spool and libvips (flat memory)
# --------------------------------------------------------------------------------------------


def test_large_jpeg_and_png_are_streamed_with_the_same_pixels(
    tmp_path: Path, slide, patches, tissue, monkeypatch
) -> None:
    """Above STREAM_MIN_PIXELS the image is never whole in memory; PNG pixels equal the
    in-memory render, JPEG decodes to the in-memory JPEG's pixels (same quality, 4:2:0)."""
    from clam_heat.heatmap import writers

    coords, scores = patches
    spec = HeatmapSpec(vis_level=0, use_percentiles=True, tile_size=256)
    small = {ext: tmp_path / f"small.{ext}" for ext in ("png", "jpg", "jpeg")}
    for path in small.values():
        render_heatmap(slide, coords, scores, 128, spec, tissue=tissue, out_path=path)
    monkeypatch.setattr(writers, "STREAM_MIN_PIXELS", 1600 * 1200 - 1)
    assert isinstance(writers.open_sinks(tmp_path / "x.png", 1600, 1200, mpp=None)[0],
                      writers.StreamedSink)  # fmt: skip
    pushed: list[int] = []
    real_push = writers.StreamedSink.push

    def counting_push(self, y0: int, strip: np.ndarray) -> None:
        pushed.append(len(strip))
        real_push(self, y0, strip)

    monkeypatch.setattr(writers.StreamedSink, "push", counting_push)
    big = {ext: tmp_path / "big" / f"big.{ext}" for ext in small}
    for path in big.values():
        res = render_heatmap(slide, coords, scores, 128, spec, tissue=tissue, out_path=path)
        assert res.paths == (path,)
    assert max(pushed) <= writers.TIFF_TILE and sum(pushed) == 3 * 1200  # strips, not the image
    expected = imagecodecs.png_decode(small["png"].read_bytes())
    np.testing.assert_array_equal(imagecodecs.png_decode(big["png"].read_bytes()), expected)
    for ext in ("jpg", "jpeg"):  # quality 100 and 75
        np.testing.assert_array_equal(
            imagecodecs.jpeg8_decode(big[ext].read_bytes()),
            imagecodecs.jpeg8_decode(small[ext].read_bytes()),
        )
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == [
        "big.jpeg",
        "big.jpg",
        "big.png",
    ]


def test_streamed_render_that_fails_leaves_no_file_or_spool(
    tmp_path: Path, slide, monkeypatch
) -> None:
    from clam_heat.errors import SlideError
    from clam_heat.heatmap import writers

    monkeypatch.setattr(writers, "STREAM_MIN_PIXELS", 0)
    _fail_reads_after(monkeypatch, 3)
    with pytest.raises(SlideError, match="reading pixels failed"):
        render_heatmap(
            slide, np.zeros((1, 2), int), np.ones(1), 64, HeatmapSpec(vis_level=0, tile_size=128),
            out_path=tmp_path / "h.png",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []
