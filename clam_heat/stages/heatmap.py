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
    cohort_scores_path,
    orig_path,
    overlap_h5_path,
    production_heatmap_path,
    pyramid_heatmap_path,
    segmentation_geojson_path,
)
from .base import Stage, StageRun, base_fingerprint


def _vis_level(ctx: RowContext, configured: int) -> int:
    return configured if configured >= 0 else ctx.slide().best_level_for_downsample(32)


def production_spec(
    ctx: RowContext, vis_level: int, *, overlap: float = 0.0, use_percentiles: bool = True
) -> Any:
    """The :class:`~clam_heat.heatmap.HeatmapSpec` of a production image under the row's
    ``heatmap_arguments`` (the main heatmap and each class map draw alike)."""
    from ..heatmap import HeatmapSpec

    hm = ctx.cfg.heatmap_arguments
    return HeatmapSpec(
        vis_level=vis_level,
        alpha=hm.alpha,
        cmap=hm.cmap,
        blank_canvas=hm.blank_canvas,
        blur=hm.blur,
        overlap=overlap,
        binarize=hm.binarize,
        binary_thresh=hm.binary_thresh,
        use_percentiles=use_percentiles,
        custom_downsample=hm.custom_downsample,
        segment=ctx.cfg.runner_arguments.segment_heatmap,
        roi=ctx.roi(),
    )


class HeatmapStage(Stage):
    name = "heatmap"
    depends_on = ("segment", "infer", "overlap")
    preload = ("clam_heat.heatmap", "matplotlib", "imagecodecs", "tifffile")

    def enabled(self, cfg: Any) -> bool:
        return "attention" in cfg.heatmap_arguments.methods()  # other maps: the explain stage

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        runner = ctx.cfg.runner_arguments
        calc = ctx.cfg.heatmap_arguments.calc_heatmap
        return base_fingerprint(
            **_scale_fingerprint(ctx),
            heatmap_arguments=_drawn_keys(ctx),
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

        coarse_scores, coarse_pct = _on_scale(ctx, scores, True)
        coarse = HeatmapSpec(
            vis_level=_vis_level(ctx, -1),
            alpha=hm.alpha,
            cmap=hm.cmap,
            use_percentiles=coarse_pct,
            segment=runner.segment_heatmap,
        )
        render_heatmap(
            slide, coords, coarse_scores, patch_l0, coarse, tissue=tissue, out_path=outs["blockmap"]
        )

        level = _vis_level(ctx, hm.vis_level)
        # production scores: CLAM's overlapping pass when calc_heatmap, else the bag's own scores
        use_percentiles = True
        if hm.calc_heatmap:
            scores, coords, patch_l0 = read_scores(overlap_h5_path(ctx))
            use_percentiles = not hm.use_ref_scores
        if hm.calc_heatmap and hm.use_ref_scores:  # the overlap file holds slide percentiles
            scores = _slide_percentiles_as_scores(ctx, scores)
        scores_drawn, use_percentiles = _on_scale(ctx, scores, use_percentiles)
        spec = production_spec(
            ctx, level, overlap=ctx.cfg.patching_arguments.overlap, use_percentiles=use_percentiles
        )
        render_heatmap(
            slide,
            coords,
            scores_drawn,
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


# ---------------------------------------------------------------- cohort scale (issue 16)


def _drawn_keys(ctx: RowContext) -> dict[str, Any]:
    """The heatmap_arguments this stage draws with (``classes`` belongs to ``class_maps``)."""
    block = ctx.cfg.block("heatmap_arguments")
    for key in ("classes", *type(ctx.cfg.heatmap_arguments).QUIET_DEFAULTS):  # other stages'
        block.pop(key, None)
    return block


def _scale_fingerprint(ctx: RowContext) -> dict[str, Any]:
    """The cohort file's digest under ``score_scale: cohort`` (nothing for the slide scale)."""
    if ctx.cfg.heatmap_arguments.score_scale != "cohort":
        return {}
    from ..cohort import read_digest

    return {"cohort": read_digest(cohort_scores_path(ctx.cfg))}


def _on_scale(ctx: RowContext, scores: Any, use_percentiles: bool) -> tuple[Any, bool]:
    """Scores as drawn: unchanged on the slide scale (CLAM), cohort percentiles otherwise."""
    if ctx.cfg.heatmap_arguments.score_scale != "cohort":
        return scores, use_percentiles
    from ..cohort import cohort_percentiles
    from ..errors import OutputError

    path = cohort_scores_path(ctx.cfg)
    if not path.is_file():
        raise OutputError(
            f"{path}: no cohort scores (score_scale: cohort); run the whole pipeline "
            "(clam-heat run), which writes them after the infer stage"
        )
    return cohort_percentiles(path, scores), False


def _slide_percentiles_as_scores(ctx: RowContext, pct: Any) -> Any:
    """Under the cohort scale, fine-pass percentiles (of the slide's bag scores, CLAM's
    ``use_ref_scores``) as the bag score at that rank, so the cohort file can place them; exact
    for a patch whose score equals a bag score, the lower neighbour's otherwise."""
    if ctx.cfg.heatmap_arguments.score_scale != "cohort":
        return pct
    import numpy as np

    ref = np.sort(read_scores(blockmap_h5_path(ctx))[0])
    k = np.clip(np.ceil(np.asarray(pct, dtype=np.float64) / 100 * len(ref)) - 1, 0, len(ref) - 1)
    return ref[k.astype(np.int64)]
