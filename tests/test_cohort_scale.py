"""Cohort-wide colour scale (docs/beyond-clam.md#cohort-colour-scale) on the demo: one score, one
colour on every slide; switching score_scale reruns only the heatmap stage."""

from __future__ import annotations

from pathlib import Path

import h5py
import matplotlib
import numpy as np
from demo_state import TINY_ENCODER, done_stages, row_contexts
from PIL import Image
from scipy.stats import percentileofscore

from clam_heat.config import load_config
from clam_heat.h5io import read_scores, write_scores_h5
from clam_heat.rows import (
    blockmap_h5_path,
    cohort_scores_path,
    overlap_h5_path,
    production_heatmap_path,
)
from clam_heat.runner import run_pipeline

#: alpha 1 and PNG: a patch's pixels are exactly its colour (no blending, no JPEG loss)
EXACT = ["heatmap_arguments.alpha=1.0", "heatmap_arguments.save_ext=png"]


def _pixel(ctx, x: int, y: int, side: int) -> np.ndarray:
    """The production heatmap's colour at the centre of the level-0 patch (x, y)."""
    image = np.asarray(Image.open(production_heatmap_path(ctx)).convert("RGB"))
    slide = ctx.slide()
    level = slide.best_level_for_downsample(32)
    ds = slide.level_downsamples[level][0]
    ctx.close()
    return image[int((y + side / 2) / ds), int((x + side / 2) / ds)]


def test_same_score_same_colour_and_only_heatmap_reruns(demo_project: Path) -> None:
    cfg = load_config(demo_project, overrides=EXACT)
    cohort = load_config(demo_project, overrides=[*EXACT, "heatmap_arguments.score_scale=cohort"])
    assert run_pipeline(cfg).ok
    before = done_stages(cfg)
    summary = run_pipeline(cohort)
    assert summary.ok, summary.failed
    after = done_stages(cohort)
    changed = {key for key in before if before[key] != after[key]}
    assert {stage for _, stage in changed} == {"heatmap"}  # segment, infer, sample kept
    assert {sid for sid, _ in changed} == {c.slide_id for c in row_contexts(cfg)}
    run_pipeline(cohort)  # a second cohort run has nothing to do
    assert done_stages(cohort) == after

    # plant slide A's median score on slide B's lowest patch (B's bag file, as infer writes it)
    a, b = row_contexts(cfg)[:2]
    sa, ca, side = read_scores(blockmap_h5_path(a))
    sb, cb, _ = read_scores(blockmap_h5_path(b))
    ia, ib = int(np.argsort(sa)[len(sa) // 2]), int(np.argmin(sb))
    sb[ib] = sa[ia]
    with h5py.File(blockmap_h5_path(b), "r") as h5:
        attrs = dict(h5.attrs)
    write_scores_h5(
        blockmap_h5_path(b), sb, cb, attrs=attrs, coords_attrs={"patch_size_level0": side}
    )
    assert run_pipeline(cohort, stages=["heatmap"]).ok  # a new cohort file: every map redrawn
    assert all(done_stages(cohort)[(c.slide_id, "heatmap")] != after[(c.slide_id, "heatmap")]
               for c in row_contexts(cfg))  # fmt: skip

    # oracle: SciPy's percentileofscore over every slide's bag scores, matplotlib's colormap
    everything = np.concatenate([read_scores(blockmap_h5_path(c))[0] for c in row_contexts(cfg)])
    with h5py.File(cohort_scores_path(cohort), "r") as h5:
        np.testing.assert_array_equal(h5["scores"][:], np.sort(everything))
    pct = percentileofscore(everything, sa[ia], kind="rank")
    want = (np.asarray(matplotlib.colormaps["jet"](pct / 100))[:3] * 255).astype(np.uint8)
    (ctx_a, ctx_b) = [c for c in row_contexts(cohort) if c.slide_id in (a.slide_id, b.slide_id)]
    colour_a = _pixel(ctx_a, *ca[ia], side)
    colour_b = _pixel(ctx_b, *cb[ib], side)
    np.testing.assert_array_equal(colour_a, want)
    np.testing.assert_array_equal(colour_b, want)

    # on the slide scale the same score is coloured by each slide's own ranks, so the two
    # patches differ (the bug this catches: score_scale ignored)
    assert run_pipeline(cfg, stages=["heatmap"]).ok
    ctx_a, ctx_b = (next(c for c in row_contexts(cfg) if c.slide_id == x.slide_id) for x in (a, b))
    assert not np.array_equal(_pixel(ctx_a, *ca[ia], side), _pixel(ctx_b, *cb[ib], side))


def test_cohort_scale_with_use_ref_scores_colours_each_patch_by_its_bag_score(
    demo_project: Path,
) -> None:
    """``calc_heatmap`` + ``use_ref_scores`` under the cohort scale: the overlap file holds each
    patch's percentile among its slide's bag scores, which the heatmap must turn back into that
    bag score before placing it in the cohort. Overlap 0 and bag features from the same encoder
    make the fine grid the bag grid with the same scores, so every patch must get the colour of
    its own bag score's cohort rank (oracle: SciPy's percentileofscore, matplotlib's jet)."""
    cfg = load_config(
        demo_project,
        overrides=[
            *EXACT,
            "heatmap_arguments.score_scale=cohort",
            "heatmap_arguments.calc_heatmap=true",
            "heatmap_arguments.use_ref_scores=true",
            *TINY_ENCODER,
            "runner_arguments.features_dir=null",
            "runner_arguments.extract_features=true",
        ],
    )
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed
    contexts = row_contexts(cfg)
    bags = {c.slide_id: read_scores(blockmap_h5_path(c)) for c in contexts}
    everything = np.concatenate([scores for scores, _, _ in bags.values()])
    jet = matplotlib.colormaps["jet"]
    checked = 0
    for ctx in contexts:
        scores, coords, side = bags[ctx.slide_id]
        fine = read_scores(overlap_h5_path(ctx))
        np.testing.assert_array_equal(fine[1], coords)  # the same grid, in the same order
        assert np.ptp(fine[0]) > 50  # percentiles (0..100), not raw attention
        for score, (x, y) in zip(scores, coords, strict=True):
            pct = percentileofscore(everything, score, kind="rank")
            want = (np.asarray(jet(pct / 100))[:3] * 255).astype(np.uint8)
            np.testing.assert_array_equal(_pixel(ctx, x, y, side), want, err_msg=f"{x}, {y}")
            checked += 1
    assert checked == len(everything) > 100
