"""``heatmap``: the coarse blockmap image and the production heatmap (plus the optional plain
slide image, pyramidal TIFF and attention GeoJSON), drawn as CLAM draws them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..h5io import read_scores
from ..ledger import file_identity
from ..rows import (
    RowContext,
    attention_geojson_path,
    blockmap_h5_path,
    blockmap_png_path,
    orig_path,
    overlap_h5_path,
    production_heatmap_path,
    pyramid_heatmap_path,
    segmentation_geojson_path,
)
from .base import Stage, StageRun, base_fingerprint


def _vis_level(ctx: RowContext, configured: int) -> int:
    return configured if configured >= 0 else ctx.slide().best_level_for_downsample(32)


class HeatmapStage(Stage):
    name = "heatmap"
    depends_on = ("segment", "infer", "overlap")
    preload = ("clam_heat.heatmap", "matplotlib", "imagecodecs", "tifffile")

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        runner = ctx.cfg.runner_arguments
        calc = ctx.cfg.heatmap_arguments.calc_heatmap
        return base_fingerprint(
            heatmap_arguments=ctx.cfg.block("heatmap_arguments"),
            overlap=ctx.cfg.patching_arguments.overlap,
            roi=list(ctx.roi() or ()),
            outputs={
                "pyramid_tiff": runner.write_pyramid_tiff,
                "geojson": runner.write_geojson,
                "segment": runner.segment_heatmap,
            },
            slide=file_identity(ctx.slide_path),
            blockmap=file_identity(blockmap_h5_path(ctx)),
            overlap_scores=file_identity(overlap_h5_path(ctx)) if calc else None,
            tissue=file_identity(segmentation_geojson_path(ctx)),
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        hm = ctx.cfg.heatmap_arguments
        outs = {"blockmap": blockmap_png_path(ctx), "production": production_heatmap_path(ctx)}
        if hm.save_orig:
            outs["orig"] = orig_path(
                ctx, hm.vis_level if hm.vis_level >= 0 else _vis_level(ctx, -1)
            )
        runner = ctx.cfg.runner_arguments
        if runner.write_pyramid_tiff:
            outs["pyramid"] = pyramid_heatmap_path(ctx)
        if runner.write_geojson:
            outs["geojson"] = attention_geojson_path(ctx)
        return outs

    def run(self, ctx: RowContext) -> StageRun:
        from ..heatmap import HeatmapSpec, render_heatmap, save_orig, write_attention_geojson
        from ..tissue import load_geojson

        hm = ctx.cfg.heatmap_arguments
        runner = ctx.cfg.runner_arguments
        slide = ctx.slide()
        scores, coords, patch_l0 = read_scores(blockmap_h5_path(ctx))
        tissue = load_geojson(segmentation_geojson_path(ctx)) if runner.segment_heatmap else None
        outs = self.outputs(ctx)

        coarse = HeatmapSpec(
            vis_level=_vis_level(ctx, -1),
            alpha=hm.alpha,
            cmap=hm.cmap,
            use_percentiles=True,
            segment=runner.segment_heatmap,
        )
        render_heatmap(
            slide, coords, scores, patch_l0, coarse, tissue=tissue, out_path=outs["blockmap"]
        )

        level = _vis_level(ctx, hm.vis_level)
        # production scores: CLAM's overlapping pass when calc_heatmap, else the bag's own scores
        use_percentiles = True
        if hm.calc_heatmap:
            scores, coords, patch_l0 = read_scores(overlap_h5_path(ctx))
            use_percentiles = not hm.use_ref_scores
        spec = HeatmapSpec(
            vis_level=level,
            alpha=hm.alpha,
            cmap=hm.cmap,
            blank_canvas=hm.blank_canvas,
            blur=hm.blur,
            overlap=ctx.cfg.patching_arguments.overlap,
            binarize=hm.binarize,
            binary_thresh=hm.binary_thresh,
            use_percentiles=use_percentiles,
            custom_downsample=hm.custom_downsample,
            segment=runner.segment_heatmap,
            roi=ctx.roi(),
        )
        render_heatmap(
            slide,
            coords,
            scores,
            patch_l0,
            spec,
            tissue=tissue,
            out_path=outs["production"],
            pyramid_tiff_path=outs.get("pyramid"),
        )
        if "orig" in outs:
            save_orig(slide, level, hm.custom_downsample, outs["orig"])
        if "geojson" in outs:
            write_attention_geojson(coords, scores, patch_l0, outs["geojson"])
        return StageRun(list(outs.values()), {"vis_level": level})
