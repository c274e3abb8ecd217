"""Tissue segmentation, masks, patch tests and GeoJSON on hand-made images with known answers.

The synthetic image has a big pink square (with two white holes) and a small pink square; at a
segmentation downsample of 16, one ``a_t``/``a_h`` unit is 512² / 16² = 1024 seg pixels. Areas
are OpenCV polygon areas through boundary-pixel centres: the 200 px big square is 199² = 39601,
the small 40 px one 39² = 1521, the 60 px hole 3719 (61² minus two cut corners), the 20 px hole
439.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from clam_heat import tissue
from clam_heat.errors import ConfigError, SegmentationError
from clam_heat.slide import ArraySlide, open_slide
from clam_heat.tissue import (
    SegmentationParams,
    TissueContours,
    center_shift_for_overlap,
    contours_to_geojson,
    draw_overview,
    grid_coords,
    load_geojson,
    patch_in_tissue,
    rasterize_tissue,
    save_geojson,
    save_overview_jpg,
    segment_array,
    segment_slide,
)

PINK = (220, 120, 180)  # HSV saturation 116
PALE = (235, 225, 230)  # saturation 10: below the default sthresh 15
DS16 = (16.0, 16.0)
EXACT = {"mthresh": 1, "close": 0}  # no blur/closing: areas are exactly those in the docstring


def squares_image(color: tuple[int, int, int] = PINK) -> np.ndarray:
    img = np.full((300, 400, 3), 255, np.uint8)
    img[50:250, 50:250] = color  # big square
    img[120:180, 120:180] = 255  # big hole (area 3719)
    img[70:90, 200:220] = 255  # small hole (area 439)
    img[100:140, 300:340] = color  # small square (area 1521)
    return img


def by_left_edge(tc: TissueContours) -> list[int]:
    """Contour indices ordered left to right (big square first)."""
    return sorted(range(len(tc)), key=lambda i: int(tc.tissue[i][:, 0].min()))


def hole_areas(tc: TissueContours, i: int) -> list[float]:
    return [cv2.contourArea((h / 16).astype(np.int32)) for h in tc.holes[i]]


# --- segment_array ---------------------------------------------------------------------------


def test_small_a_t_keeps_both_squares_with_level0_coordinates() -> None:
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=0.1, **EXACT))
    assert len(tc) == 2 and not tc.is_empty()
    big, small = by_left_edge(tc)
    assert tc.tissue[big].dtype == np.int32 and tc.tissue[big].shape[1] == 2
    assert tc.tissue[big].min(axis=0).tolist() == [50 * 16, 50 * 16]
    assert tc.tissue[big].max(axis=0).tolist() == [249 * 16, 249 * 16]
    assert tc.tissue[small].min(axis=0).tolist() == [300 * 16, 100 * 16]
    assert hole_areas(tc, big) == [3719.0, 439.0]  # sorted by area, descending
    assert tc.holes[small] == ()


def test_large_a_t_drops_the_small_square() -> None:
    # 2 units = 2048 px > 1521 (small square) but < 39601 - 3719 - 439 (big square, net).
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=2, a_h=0.1, **EXACT))
    assert len(tc) == 1
    assert tc.tissue[0].min(axis=0).tolist() == [800, 800]


def test_a_t_is_compared_with_the_net_area_strictly() -> None:
    net_big = 39601 - 3719 - 439  # 35443 seg px; unit at downsample 1 is 512² = 262144
    keep = SegmentationParams(a_t=(net_big - 1) / 262144, a_h=0, **EXACT)
    drop = SegmentationParams(a_t=net_big / 262144, a_h=0, **EXACT)
    kept = segment_array(squares_image(), (1.0, 1.0), keep)
    assert len(kept) == 1 and kept.tissue[0].min(axis=0).tolist() == [50, 50]
    assert segment_array(squares_image(), (1.0, 1.0), drop).is_empty()


def test_holes_filtered_by_a_h() -> None:
    # a_h 1 unit = 1024 px: the 439 px hole goes, the 3719 px hole stays; 4 units: both go.
    one = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=1, **EXACT))
    assert hole_areas(one, by_left_edge(one)[0]) == [3719.0]
    four = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=4, **EXACT))
    assert hole_areas(four, by_left_edge(four)[0]) == []


def test_max_n_holes_keeps_the_largest() -> None:
    p = SegmentationParams(a_t=1, a_h=0, max_n_holes=1, **EXACT)
    tc = segment_array(squares_image(), DS16, p)
    assert hole_areas(tc, by_left_edge(tc)[0]) == [3719.0]
    none = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, max_n_holes=0))
    assert all(h == () for h in none.holes)


def test_default_blur_and_closing_still_find_both_squares() -> None:
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=0.1))
    assert len(tc) == 2
    assert len(tc.holes[by_left_edge(tc)[0]]) == 2


def test_keep_and_exclude_ids_select_from_the_filtered_list() -> None:
    base = {"a_t": 1, "a_h": 0.1, **EXACT}
    full = segment_array(squares_image(), DS16, SegmentationParams(**base))
    keep1 = segment_array(squares_image(), DS16, SegmentationParams(keep_ids=(1,), **base))
    excl0 = segment_array(squares_image(), DS16, SegmentationParams(exclude_ids=(0,), **base))
    both = segment_array(
        squares_image(), DS16, SegmentationParams(keep_ids=(1, 0), exclude_ids=(1,), **base)
    )
    assert len(full) == 2
    assert keep1 == excl0 == TissueContours((full.tissue[1],), (full.holes[1],))
    assert both == TissueContours((full.tissue[0],), (full.holes[0],))


def test_out_of_range_ids_raise_a_segmentation_error() -> None:
    p = SegmentationParams(a_t=1, keep_ids=(0, 5), exclude_ids=(7,), **EXACT)
    with pytest.raises(SegmentationError) as err:
        segment_array(squares_image(), DS16, p)
    assert str(err.value) == (
        "keep_ids/exclude_ids [5, 7] out of range: segmentation kept 2 tissue contours "
        "(ids 0..1, as numbered in the _mask.jpg of a run without keep_ids/exclude_ids); "
        "fix the ids in the process list"
    )


def test_otsu_finds_pale_tissue_that_the_fixed_threshold_misses() -> None:
    pale = squares_image(PALE)
    assert segment_array(pale, DS16, SegmentationParams(a_t=1, **EXACT)).is_empty()
    tc = segment_array(pale, DS16, SegmentationParams(a_t=1, use_otsu=True, **EXACT))
    assert len(tc) == 2


@pytest.mark.parametrize("value", [255, 0])
def test_blank_image_gives_empty_contours(value: int) -> None:
    blank = np.full((64, 64, 3), value, np.uint8)
    for otsu in (False, True):
        tc = segment_array(blank, DS16, SegmentationParams(use_otsu=otsu, keep_ids=(3,)))
        assert tc.is_empty() and len(tc) == 0 and tc == TissueContours()


def test_segment_array_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB image"):
        segment_array(np.zeros((8, 8), np.uint8), DS16)


# --- parameters ------------------------------------------------------------------------------


def test_params_from_row_dict_ignore_patch_keys_and_convert_types() -> None:
    row = {
        "seg_level": np.int8(-1), "sthresh": np.uint8(8), "mthresh": np.uint8(7),
        "close": np.uint32(4), "use_otsu": np.bool_(False), "keep_ids": [0, 3],
        "exclude_ids": [], "a_t": np.float32(16.0), "a_h": np.float32(4.0),
        "max_n_holes": np.uint32(8), "vis_level": np.int8(-1), "line_thickness": np.uint32(100),
        "use_padding": True, "contour_fn": "four_pt",
    }  # fmt: skip
    p = SegmentationParams.from_row_params(row)
    assert p == SegmentationParams(
        sthresh=8, mthresh=7, close=4, a_t=16.0, a_h=4.0, max_n_holes=8, keep_ids=(0, 3),
        line_thickness=100,
    )  # fmt: skip
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["keep_ids"] == [0, 3] and type(d["sthresh"]) is int and type(d["a_t"]) is float
    assert "vis_level" not in p.to_dict(include_vis=False)


def test_params_parse_clam_id_strings() -> None:
    p = SegmentationParams(keep_ids="0,3", exclude_ids="none")  # type: ignore[arg-type]
    assert p.keep_ids == (0, 3) and p.exclude_ids == ()


def test_bad_params_list_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        SegmentationParams(sthresh=300, mthresh=4, a_t=-1, close="x")  # type: ignore[arg-type]
    assert err.value.problems == [
        "close = 'x': must be an integer",
        "a_t = -1: must be a finite number >= 0",
        "sthresh = 300: must be between 0 and 255",
        "mthresh = 4: must be an odd integer >= 1 (median blur kernel)",
    ]
    assert str(err.value).startswith("4 problems:")
    with pytest.raises(ConfigError, match=r"unknown segmentation parameter\(s\) sthres "):
        SegmentationParams.from_row_params({"sthres": 3})
    with pytest.raises(ConfigError, match=r"keep_ids = 'a': 'a' is not an integer contour id"):
        SegmentationParams(keep_ids="a")  # type: ignore[arg-type]


# --- TissueContours and GeoJSON --------------------------------------------------------------


def test_tissue_contours_normalise_and_compare() -> None:
    square = np.array([[[0, 0]], [[9, 0]], [[9, 9]], [[0, 9]]])  # OpenCV (n, 1, 2) layout
    tc = TissueContours((square,))
    assert tc.tissue[0].shape == (4, 2) and tc.tissue[0].dtype == np.int32
    assert tc.holes == ((),)
    assert not tc.tissue[0].flags.writeable
    assert tc == TissueContours((square.reshape(-1, 2),), ((),))
    assert tc != TissueContours((square.reshape(-1, 2) + 1,))
    with pytest.raises(ValueError, match="one entry per tissue contour"):
        TissueContours((square,), ((), ()))


def test_geojson_round_trip_is_exact(tmp_path: Path) -> None:
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=0.1))
    path = save_geojson(tc, tmp_path / "out" / "s_segmentation.geojson")
    back = load_geojson(path)
    assert back == tc
    assert all(c.dtype == np.int32 for c in back.tissue)
    assert [p.name for p in path.parent.iterdir()] == ["s_segmentation.geojson"]  # no temp left


def test_geojson_has_the_shape_qupath_reads() -> None:
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=0.05, a_h=0.01, **EXACT))
    fc = contours_to_geojson(tc)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    for i, feature in enumerate(fc["features"]):
        assert feature["type"] == "Feature"
        assert feature["properties"] == {
            "objectType": "annotation",
            "classification": {"name": "Tissue", "color": [0, 200, 0]},
            "tissue_id": i,
        }
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        rings = geometry["coordinates"]
        assert len(rings) == 1 + len(tc.holes[i])
        assert all(ring[0] == ring[-1] for ring in rings)
        assert rings[0][:-1] == tc.tissue[i].tolist()
        assert all(isinstance(v, int) for v in rings[0][0])


def test_load_geojson_accepts_qupath_multipolygons_with_float_coordinates(tmp_path: Path) -> None:
    path = tmp_path / "qupath.geojson"
    ring = [[0.0, 0.0], [10.2, 0.0], [10.0, 9.6], [0.0, 10.0], [0.0, 0.0]]
    hole = [[2, 2], [4, 2], [4, 4], [2, 2]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [[ring, hole], [ring]]},
        "properties": {"objectType": "annotation"},
    }
    path.write_text(json.dumps([feature]))
    tc = load_geojson(path)
    assert len(tc) == 2
    assert tc.tissue[0].tolist() == [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert tc.holes[0][0].tolist() == [[2, 2], [4, 2], [4, 4]] and tc.holes[1] == ()


def test_load_geojson_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"geometry": {"type": "Point"}}]}')
    with pytest.raises(SegmentationError) as err:
        load_geojson(bad)
    assert str(err.value) == (
        f"{bad}: not a tissue GeoJSON (feature 0 has geometry 'Point', expected a Polygon); "
        "re-create it with clam-heat or export Polygon annotations from QuPath as GeoJSON"
    )
    with pytest.raises(SegmentationError, match="tissue GeoJSON not found"):
        load_geojson(tmp_path / "missing.geojson")
    bad.write_text("{not json")
    with pytest.raises(SegmentationError, match="not readable as GeoJSON"):
        load_geojson(bad)


# --- rasterize_tissue (CLAM get_seg_mask) ----------------------------------------------------

SQUARE = np.array([[10, 10], [49, 10], [49, 49], [10, 49]])
HOLE = np.array([[20, 20], [29, 20], [29, 29], [20, 29]])


def test_rasterize_fills_contours_and_cuts_holes() -> None:
    tc = TissueContours((SQUARE,), ((HOLE,),))
    expected = np.zeros((60, 60), bool)
    expected[10:50, 10:50] = True
    no_holes = rasterize_tissue(tc, l0_origin=(0, 0), shape=(60, 60), scale=(1, 1), use_holes=False)
    assert np.array_equal(no_holes, expected)
    expected[20:30, 20:30] = False
    mask = rasterize_tissue(tc, l0_origin=(0, 0), shape=(60, 60), scale=(1, 1))
    assert mask.dtype == bool and np.array_equal(mask, expected)
    shifted = rasterize_tissue(tc, l0_origin=(5, 7), shape=(60, 60), scale=(1, 1))
    assert np.array_equal(shifted[:53, :55], expected[7:, 5:])
    assert not shifted[53:, :].any() and not shifted[:, 55:].any()


def test_rasterize_scales_with_truncation_like_clam() -> None:
    tc = TissueContours((SQUARE,), ((HOLE,),))
    mask = rasterize_tissue(tc, l0_origin=(0, 0), shape=(30, 30), scale=(0.5, 0.5))
    expected = np.zeros((30, 30), bool)
    expected[5:25, 5:25] = True  # 10*0.5 = 5, int(49*0.5) = 24
    expected[10:15, 10:15] = False  # 20*0.5 = 10, int(29*0.5) = 14
    assert np.array_equal(mask, expected)
    # origin (3, 3) at scale 0.5: offset int32(-1.5) = -1
    moved = rasterize_tissue(tc, l0_origin=(3, 3), shape=(30, 30), scale=(0.5, 0.5))
    assert np.array_equal(moved[:29, :29], expected[1:, 1:])


def test_rasterize_draws_larger_contours_first_so_islands_in_holes_survive() -> None:
    island = np.array([[23, 23], [26, 23], [26, 26], [23, 26]])
    tc = TissueContours((island, SQUARE), ((), (HOLE,)))  # island listed first
    mask = rasterize_tissue(tc, l0_origin=(0, 0), shape=(60, 60), scale=(1, 1))
    assert mask[24, 24] and not mask[21, 21] and mask[15, 15]


def test_rasterize_tiles_compose_to_the_whole_window() -> None:
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=0.1))
    scale = (1 / 16, 1 / 16)
    whole = rasterize_tissue(tc, l0_origin=(0, 0), shape=(300, 400), scale=scale)
    tiled = np.zeros_like(whole)
    for y in range(0, 300, 64):
        for x in range(0, 400, 96):
            h, w = min(64, 300 - y), min(96, 400 - x)
            tiled[y : y + h, x : x + w] = rasterize_tissue(
                tc, l0_origin=(x * 16, y * 16), shape=(h, w), scale=scale
            )
    assert np.array_equal(tiled, whole)
    assert 0.3 < whole.mean() < 0.4


def test_rasterize_empty_or_far_away_is_all_false() -> None:
    empty = rasterize_tissue(TissueContours(), l0_origin=(0, 0), shape=(5, 6), scale=(1, 1))
    assert empty.shape == (5, 6) and not empty.any()
    tc = TissueContours((SQUARE,))
    far = rasterize_tissue(tc, l0_origin=(1000, 0), shape=(5, 6), scale=(1, 1))
    assert not far.any()


# --- patch_in_tissue -------------------------------------------------------------------------

BOX = np.array([[100, 100], [499, 100], [499, 499], [100, 499]])
BOX_HOLE = np.array([[250, 250], [349, 250], [349, 349], [250, 349]])


def test_patch_inside_straddling_and_on_a_hole() -> None:
    tc = TissueContours((BOX,), ((BOX_HOLE,),))
    coords = np.array(
        [
            [150, 150],  # fully inside
            [450, 150],  # straddles the right edge: centre 500, points 475/525
            [250, 250],  # centred on the hole (centre 300, 300)
            [600, 600],  # outside
            [60, 150],  # left edge: centre 110, points 85/135
        ],
        dtype=np.int64,
    )
    assert patch_in_tissue(coords, 100, tc).tolist() == [True, False, False, False, False]
    easy = patch_in_tissue(coords, 100, tc, contour_fn="four_pt_easy").tolist()
    assert easy == [True, True, False, False, True]
    assert patch_in_tissue(coords, 100, tc, contour_fn="four_pt").tolist() == easy
    assert patch_in_tissue(coords, 100, tc, contour_fn="center").tolist() == [
        True, False, False, False, True,
    ]  # fmt: skip
    assert patch_in_tissue(coords, 100, tc, contour_fn="basic").tolist() == [
        True, True, False, False, False,
    ]  # fmt: skip


def test_edges_count_as_inside_and_hole_edges_do_not_reject() -> None:
    tc = TissueContours((BOX,), ((BOX_HOLE,),))
    # centre exactly on the outer edge (x = 499) and exactly on the hole edge (x = 250)
    coords = np.array([[449, 200], [200, 250]], dtype=np.int64)
    assert patch_in_tissue(coords, 100, tc, contour_fn="center").tolist() == [True, True]
    # odd patch: float centre 250.5 is strictly inside the hole -> rejected
    assert patch_in_tissue(np.array([[200, 250]]), 101, tc, contour_fn="center").tolist() == [False]


def test_zero_shift_tests_the_centre_only() -> None:
    tc = TissueContours((BOX,))
    straddle = np.array([[440, 150]], dtype=np.int64)  # centre 490 inside, 490+25 outside
    assert not patch_in_tissue(straddle, 100, tc, center_shift=0.5)[0]
    assert patch_in_tissue(straddle, 100, tc, center_shift=0.0)[0]


def test_four_points_must_lie_in_the_same_contour() -> None:
    left = np.array([[0, 0], [49, 0], [49, 99], [0, 99]])
    right = np.array([[50, 0], [99, 0], [99, 99], [50, 99]])
    tc = TissueContours((left, right))
    # a patch whose four points split between the two contours fails the hard test
    assert patch_in_tissue(np.array([[25, 25]]), 50, tc).tolist() == [False]
    assert patch_in_tissue(np.array([[25, 25]]), 50, tc, contour_fn="four_pt").tolist() == [True]


def test_patch_in_tissue_empty_inputs() -> None:
    assert patch_in_tissue(np.zeros((3, 2), np.int64), 10, TissueContours()).tolist() == [False] * 3
    assert patch_in_tissue(np.zeros((0, 2), np.int64), 10, TissueContours((BOX,))).shape == (0,)
    with pytest.raises(ConfigError, match="contour_fn = 'four': must be one of four_pt_hard"):
        patch_in_tissue(np.zeros((1, 2), np.int64), 10, TissueContours((BOX,)), contour_fn="four")


def _clam_reference(coords, ps, tc, contour_fn, center_shift):  # type: ignore[no-untyped-def]
    """CLAM's per-patch loop with cv2.pointPolygonTest (test oracle only)."""
    shift = int(ps // 2 * center_shift)
    out = []
    for x, y in coords.tolist():
        cx, cy = x + ps // 2, y + ps // 2
        if contour_fn == "basic":
            pts, need_all = [(x, y)], True
        elif contour_fn == "center" or shift == 0:
            pts, need_all = [(cx, cy)], True
        else:
            pts = [(cx - shift, cy - shift), (cx + shift, cy + shift)]
            pts += [(cx + shift, cy - shift), (cx - shift, cy + shift)]
            need_all = contour_fn == "four_pt_hard"
        hit = False
        for cont, holes in zip(tc.tissue, tc.holes, strict=True):
            c = cont.reshape(-1, 1, 2)
            inside = [cv2.pointPolygonTest(c, (float(a), float(b)), False) >= 0 for a, b in pts]
            if not (all(inside) if need_all else any(inside)):
                continue
            centre = (x + ps / 2, y + ps / 2)
            if any(cv2.pointPolygonTest(h.reshape(-1, 1, 2), centre, False) > 0 for h in holes):
                continue
            hit = True
            break
        out.append(hit)
    return np.array(out, dtype=bool)


@pytest.mark.parametrize("contour_fn", ["four_pt_hard", "four_pt", "center", "basic"])
def test_patch_in_tissue_equals_point_polygon_test_on_real_contours(
    contour_fn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Noisy blobs at downsample 7.3 give diagonal, self-touching contours with holes; a tiny
    # raster budget forces coarse rasters, so the exact near-edge path is exercised too.
    rng = np.random.default_rng(3)
    img = np.full((120, 160, 3), 255, np.uint8)
    blobs = np.zeros((120, 160), np.uint8)
    for _ in range(6):
        centre = (int(rng.integers(20, 140)), int(rng.integers(20, 100)))
        cv2.circle(blobs, centre, int(rng.integers(8, 30)), 255, -1)
    blobs[rng.random(blobs.shape) < 0.04] = 0
    img[blobs > 0] = PINK
    tc = segment_array(img, (7.3, 7.3), SegmentationParams(a_t=0, a_h=0, mthresh=1, close=0))
    assert len(tc) >= 2 and sum(len(h) for h in tc.holes) >= 5
    coords = rng.integers(-50, 1200, size=(1500, 2)).astype(np.int64)
    ps = 37  # odd: the hole test uses a half-pixel centre
    expected = _clam_reference(coords, ps, tc, contour_fn, 0.5)
    monkeypatch.setattr(tissue.polygon, "_RASTER_BUDGET_PX", 40)
    got = patch_in_tissue(coords, ps, tc, contour_fn=contour_fn, center_shift=0.5)
    assert np.array_equal(got, expected)
    assert 0.1 < expected.mean() < 0.9


# --- grid_coords -----------------------------------------------------------------------------

RECT = np.array([[10, 20], [109, 20], [109, 119], [10, 119]])  # bounding rect (10, 20, 100, 100)


def test_grid_is_x_major_per_contour_box() -> None:
    tc = TissueContours((RECT,))
    hard = grid_coords(tc, patch_size_l0=40, step_l0=40, slide_dims=(300, 300))
    assert hard.dtype == np.int64
    assert hard.tolist() == [[10, 20], [10, 60], [50, 20], [50, 60]]
    basic = grid_coords(tc, patch_size_l0=40, step_l0=40, slide_dims=(300, 300), contour_fn="basic")
    xs, ys = (10, 50, 90), (20, 60, 100)
    assert basic.tolist() == [[x, y] for x in xs for y in ys]


def test_grid_roi_clips_start_and_end() -> None:
    tc = TissueContours((RECT,))
    kw = {"patch_size_l0": 40, "step_l0": 40, "slide_dims": (300, 300), "roi": (50, 0, 200, 80)}
    assert grid_coords(tc, **kw).tolist() == [[50, 20], [50, 60]]
    assert grid_coords(tc, contour_fn="basic", **kw).tolist() == [
        [50, 20],
        [50, 60],
        [90, 20],
        [90, 60],
    ]
    outside = grid_coords(
        tc, patch_size_l0=40, step_l0=40, slide_dims=(300, 300), roi=(200, 0, 300, 50)
    )
    assert outside.shape == (0, 2) and outside.dtype == np.int64


def test_grid_without_padding_stops_a_patch_before_the_slide_edge() -> None:
    tc = TissueContours((RECT,))
    coords = grid_coords(
        tc,
        patch_size_l0=40,
        step_l0=40,
        slide_dims=(130, 130),
        contour_fn="basic",
        use_padding=False,
    )
    assert coords.tolist() == [[10, 20], [10, 60], [50, 20], [50, 60], [90, 20], [90, 60]]


def test_grid_holes_and_contour_order() -> None:
    kw = {"patch_size_l0": 100, "step_l0": 50, "slide_dims": (600, 600)}
    coords = grid_coords(TissueContours((BOX, RECT), ((BOX_HOLE,), ())), **kw)
    box_grid = grid_coords(TissueContours((BOX,), ((BOX_HOLE,),)), **kw)
    rect_grid = grid_coords(TissueContours((RECT,)), **kw)
    assert np.array_equal(coords, np.concatenate([box_grid, rect_grid]))  # contours in order
    assert len(rect_grid) == 1 and rect_grid.tolist() == [[10, 20]]
    assert [250, 250] not in box_grid.tolist()  # centre (300, 300) is in the hole
    assert [200, 250] in box_grid.tolist()  # centre (250, 300) is on the hole's edge
    assert [150, 150] in box_grid.tolist()


def test_grid_empty_contours() -> None:
    out = grid_coords(TissueContours(), patch_size_l0=256, step_l0=256, slide_dims=(10, 10))
    assert out.shape == (0, 2) and out.dtype == np.int64


def test_grid_matches_a_reference_loop_on_segmented_contours() -> None:
    tc = segment_array(squares_image(), DS16, SegmentationParams(a_t=1, a_h=0.1))
    ps, step = 256, 128
    got = grid_coords(tc, patch_size_l0=ps, step_l0=step, slide_dims=(6400, 4800), center_shift=0.5)
    parts = []
    for cont, holes in zip(tc.tissue, tc.holes, strict=True):
        x0, y0, w, h = cv2.boundingRect(cont)
        cand = np.array([[x, y] for x in range(x0, x0 + w, step) for y in range(y0, y0 + h, step)])
        keep = _clam_reference(cand, ps, TissueContours((cont,), (holes,)), "four_pt_hard", 0.5)
        parts.append(cand[keep])
    assert np.array_equal(got, np.concatenate(parts))
    assert len(got) > 100


def test_center_shift_table() -> None:
    assert center_shift_for_overlap(0.5, False) == 0.0
    table = {-1.0: 0.375, 0.0: 0.375, 0.2499: 0.375, 0.25: 0.5, 0.75: 0.5, 0.9499: 0.5}
    table |= {0.95: 0.625, 0.99: 0.625}
    assert {o: center_shift_for_overlap(o, True) for o in table} == table
    with pytest.raises(ConfigError, match="overlap = nan: must be a finite number below 1"):
        center_shift_for_overlap(float("nan"), True)


# --- slides, overview ------------------------------------------------------------------------


def big_squares_image() -> np.ndarray:
    """The squares image at 4x size (1600 x 1200), so an ArraySlide has a 16x level."""
    return np.repeat(np.repeat(squares_image(), 4, axis=0), 4, axis=1)


def test_segment_slide_on_an_array_slide_uses_the_best_level_for_32() -> None:
    slide = ArraySlide(big_squares_image(), n_levels=3, level_factor=4)
    assert slide.level_downsamples[2] == (16.0, 16.0)
    tc, level = segment_slide(slide, SegmentationParams(a_t=0.05, a_h=0.01, **EXACT))
    assert level == 2
    direct = segment_array(
        slide.read_level(2), (16.0, 16.0), SegmentationParams(a_t=0.05, a_h=0.01, **EXACT)
    )
    assert tc == direct and len(tc) == 2
    big = tc.tissue[by_left_edge(tc)[0]]
    # level-0 square 200..999; 16x pixels 12 and 62 are part pink (saturated) -> 192 .. 992
    assert big.min(axis=0).tolist() == [192, 192] and big.max(axis=0).tolist() == [992, 992]
    tc0, level0 = segment_slide(slide, SegmentationParams(seg_level=1, a_t=0.05))
    assert level0 == 1 and len(tc0) == 2


def test_segment_slide_through_openslide_on_a_pyramidal_tiff(tmp_path: Path) -> None:
    import tifffile

    image = big_squares_image()
    path = tmp_path / "squares.tiff"
    with tifffile.TiffWriter(path) as tw:
        for level, factor in enumerate((1, 4, 16)):
            tw.write(
                np.ascontiguousarray(image[::factor, ::factor]),
                tile=(64, 64),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if level == 0 else 1,
            )
    with open_slide(path) as slide:
        assert slide.level_count == 3
        tc, level = segment_slide(slide, SegmentationParams(a_t=0.05, a_h=0.01, **EXACT))
    assert level == 2 and len(tc) == 2
    mask = rasterize_tissue(tc, l0_origin=(0, 0), shape=(75, 100), scale=(1 / 16, 1 / 16))
    truth = np.all(image[::16, ::16] == PINK, axis=2)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95


def test_real_he_slide_has_a_plausible_tissue_fraction(real_slide: Path) -> None:
    params = SegmentationParams(
        seg_level=0, sthresh=15, mthresh=11, close=2, a_t=0.1, a_h=1, max_n_holes=2
    )  # bwh_biopsy-like, with a_t small for a 2220 x 2967 crop
    with open_slide(real_slide) as slide:
        tc, level = segment_slide(slide, params)
        w, h = slide.dimensions
        pixels = slide.read_level(0)
    assert level == 0 and len(tc) >= 1
    mask = rasterize_tissue(tc, l0_origin=(0, 0), shape=(h, w), scale=(1, 1))
    assert 0.1 < mask.mean() < 0.9
    # The same pixels served by an in-memory pyramid, segmented at the automatic level (~16x),
    # give nearly the same tissue.
    array_tc, array_level = segment_slide(
        ArraySlide(pixels, n_levels=3, level_factor=4), SegmentationParams(a_t=0.01, a_h=1)
    )
    assert array_level == 2
    coarse = rasterize_tissue(array_tc, l0_origin=(0, 0), shape=(h, w), scale=(1, 1))
    assert (coarse & mask).sum() / (coarse | mask).sum() > 0.8


def test_overview_colours_and_jpeg(tmp_path: Path) -> None:
    slide = ArraySlide(big_squares_image(), n_levels=3, level_factor=4)
    tc, _ = segment_slide(slide, SegmentationParams(a_t=0.05, a_h=0.01, **EXACT))
    overview = draw_overview(slide, tc, vis_level=1, line_thickness=8)
    assert overview.shape == (300, 400, 3) and overview.dtype == np.uint8
    big = by_left_edge(tc)[0]
    x, y = (tc.tissue[big][0] // 4).tolist()
    assert overview[y, x].tolist() == [0, 255, 0]  # tissue outline, 8 / 4 = 2 px thick
    hx, hy = (tc.holes[big][0][0] // 4).tolist()
    assert overview[hy, hx].tolist() == [0, 0, 255]  # hole outline
    red = np.all(overview == (255, 0, 0), axis=2)
    assert red[100:200, 100:200].any()  # contour number near the big square's centroid
    assert np.array_equal(overview[0, 0], [255, 255, 255])  # background untouched
    out = save_overview_jpg(overview, tmp_path / "s_mask.jpg")
    with Image.open(out) as jpg:
        assert jpg.format == "JPEG" and jpg.size == (400, 300)
    assert [p.name for p in tmp_path.iterdir()] == ["s_mask.jpg"]
    auto = draw_overview(slide, tc)  # vis_level -1 -> best level for 32 (16x here)
    assert auto.shape == (75, 100, 3)
    assert np.array_equal(draw_overview(slide, TissueContours(), vis_level=2), slide.read_level(2))


def test_segmentation_recovers_generated_demo_tissue(tmp_path) -> None:
    """Issue 3: IoU > 0.9 against the demo generator's analytic tissue mask at the seg level."""
    from clam_heat.demo import make_demo_slide
    from clam_heat.slide import open_slide

    for seed in (0, 1, 2):
        demo = make_demo_slide(tmp_path / f"s{seed}.tiff", width=4096, height=3072, seed=seed)
        with open_slide(demo.path) as slide:
            params = SegmentationParams(seg_level=2, a_t=1, a_h=1, max_n_holes=2)
            tissue, level = segment_slide(slide, params)
            downsample = slide.level_downsamples[level]
            w, h = slide.level_dimensions[level]
            found = rasterize_tissue(
                tissue, l0_origin=(0, 0), shape=(h, w), scale=(1 / downsample[0], 1 / downsample[1])
            )
        truth = demo.tissue_mask(downsample)
        iou = (found & truth).sum() / (found | truth).sum()
        assert iou > 0.9, (seed, iou)
