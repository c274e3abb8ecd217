"""``heatmap``: the coarse blockmap image and the production heatmap, drawn as CLAM draws them,
plus the optional plain slide image and the exports switched on in :mod:`.exports` (pyramidal
TIFF, attention GeoJSON)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..h5io import read_scores
from ..ledger import Ledger, file_identity
from ..rows import (
    RowContext,
    blockmap_h5_path,
    blockmap_png_path,
    cohort_scores_path,
    orig_path,
    overlap_h5_path,
    production_heatmap_path,
    segmentation_geojson_path,
)
from .base import Stage, StageRun, base_fingerprint
from .exports import export_paths, export_switches

if TYPE_CHECKING:  # the drawing code loads with the stage's run, not with the registry
    from ..heatmap import HeatmapSpec


def _vis_level(ctx: RowContext, configured: int) -> int:
    """The row's vis level (CLAM's -1 made concrete), by the heatmap package's one rule."""
    from ..heatmap.plan import resolve_vis_level

    return resolve_vis_level(ctx.slide(), configured)


def _remembered_auto_level(ctx: RowContext) -> int | None:
    """The level CLAM's -1 resolved to when this row's heatmap was last drawn from this very
    slide file (the ledger records it), or None. Checking a done row then needs no slide
    opened just to name its ``_orig_<level>`` image: 8 ms per row locally, far more on a
    network filesystem, on every rerun of a 10,000-row list."""
    record = Ledger.load(ctx.ledger_path).record("heatmap") or {}
    fingerprint = record.get("fingerprint") or {}
    level = (record.get("result") or {}).get("vis_level")
    drawn_at_auto = (fingerprint.get("heatmap_arguments") or {}).get("vis_level", 0) < 0
    if record.get("state") != "done" or not drawn_at_auto or not isinstance(level, int):
        return None
    return level if fingerprint.get("slide") == file_identity(ctx.slide_path) else None


def production_spec(
    ctx: RowContext, vis_level: int, *, overlap: float = 0.0, use_percentiles: bool = True
) -> HeatmapSpec:
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
    preload = ("clam_heat.heatmap", "imagecodecs", "tifffile")

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
            outputs={**export_switches(ctx.cfg), "segment": runner.segment_heatmap},
            slide=file_identity(ctx.slide_path),
            blockmap=file_identity(blockmap_h5_path(ctx)),
            overlap_scores=file_identity(overlap_h5_path(ctx)) if calc else None,
            tissue=file_identity(segmentation_geojson_path(ctx)),
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        return self._outputs(ctx, remembered=True)

    def _outputs(self, ctx: RowContext, *, remembered: bool) -> dict[str, Path]:
        hm = ctx.cfg.heatmap_arguments
        outs = {"blockmap": blockmap_png_path(ctx), "production": production_heatmap_path(ctx)}
        if hm.save_orig:
            level = hm.vis_level
            if level < 0:
                known = _remembered_auto_level(ctx) if remembered else None
                level = _vis_level(ctx, -1) if known is None else known
            outs["orig"] = orig_path(ctx, level)
        return outs | export_paths(ctx)

    def run(self, ctx: RowContext) -> StageRun:
        from ..heatmap import HeatmapSpec, render_heatmap, save_orig
        from ..heatmap.meta import image_meta
        from ..heatmap.writers import EXPORTS
        from ..tissue import load_geojson

        hm = ctx.cfg.heatmap_arguments
        runner = ctx.cfg.runner_arguments
        slide = ctx.slide()
        scores, coords, patch_l0 = read_scores(blockmap_h5_path(ctx))
        tissue = load_geojson(segmentation_geojson_path(ctx)) if runner.segment_heatmap else None
        outs = self._outputs(ctx, remembered=False)
        exports = {name: (EXPORTS[name], outs[name]) for name in export_paths(ctx)}

        coarse_scores, coarse_pct = _on_scale(ctx, scores, True)
        coarse = HeatmapSpec(
            vis_level=_vis_level(ctx, -1),
            alpha=hm.alpha,
            cmap=hm.cmap,
            use_percentiles=coarse_pct,
            segment=runner.segment_heatmap,
        )
        scale = "cohort" if hm.score_scale == "cohort" else "percentile"
        meta = image_meta(hm.cmap, scale=scale)
        render_heatmap(
            slide,
            coords,
            coarse_scores,
            patch_l0,
            coarse,
            tissue=tissue,
            out_path=outs["blockmap"],
            meta=meta,
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
            exports={path: e.sink for e, path in exports.values() if e.sink is not None},
            meta=meta,
        )
        if "orig" in outs:
            save_orig(slide, level, hm.custom_downsample, outs["orig"])
        for export, path in exports.values():
            if export.write is not None:  # from the patches drawn, before any cohort scaling
                export.write(coords, scores, patch_l0, path)
        return StageRun(list(outs.values()), {"vis_level": level})


# ------------------------------------ cohort scale (docs/beyond-clam.md#cohort-colour-scale)


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


def _on_scale(
    ctx: RowContext, scores: np.ndarray, use_percentiles: bool
) -> tuple[np.ndarray, bool]:
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


def _slide_percentiles_as_scores(ctx: RowContext, pct: np.ndarray) -> np.ndarray:
    """Under the cohort scale, fine-pass percentiles (of the slide's bag scores, CLAM's
    ``use_ref_scores``) as the bag score at that rank, so the cohort file can place them; exact
    for a patch whose score equals a bag score, the lower neighbour's otherwise.

    CLAM's rank rule puts a score at a whole or half rank (``pct * n / 100``); the overlap file
    stores float32, so the rank is rounded to the nearest half before ``ceil`` (a float32
    ``r + 1e-6`` would otherwise land one bag score too high)."""
    if ctx.cfg.heatmap_arguments.score_scale != "cohort":
        return pct
    ref = np.sort(read_scores(blockmap_h5_path(ctx))[0])
    rank = np.round(np.asarray(pct, dtype=np.float64) * len(ref) / 50) / 2
    k = np.clip(np.ceil(rank) - 1, 0, len(ref) - 1)
    return ref[k.astype(np.int64)]
