"""``overlap``: CLAM's ``calc_heatmap`` pass, scoring the overlapping patch grid.

Runs only with ``heatmap_arguments.calc_heatmap``; the heatmap stage then draws these scores
(percentiles against the bag's own scores with ``use_ref_scores``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import HeatmapConfig
from ..h5io import read_scores
from ..ledger import Ledger, file_identity
from ..rows import RowContext, blockmap_h5_path, overlap_h5_path, segmentation_geojson_path
from .base import Stage, StageRun, base_fingerprint
from .resources import encode_kwargs, encoder_fingerprint, grid, model_for


class OverlapStage(Stage):
    name = "overlap"
    depends_on = ("segment", "infer")
    needs_model = True

    def enabled(self, cfg: HeatmapConfig) -> bool:
        return cfg.heatmap_arguments.calc_heatmap

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        hm = ctx.cfg.heatmap_arguments
        return base_fingerprint(
            encoder=encoder_fingerprint(ctx.cfg),
            overlap=ctx.cfg.patching_arguments.overlap,
            roi=list(ctx.roi() or ()),
            use_ref_scores=hm.use_ref_scores,
            checkpoint=file_identity(Path(ctx.cfg.model_arguments.ckpt_path)),
            blockmap=file_identity(blockmap_h5_path(ctx)),
            tissue=file_identity(segmentation_geojson_path(ctx)),
            slide=file_identity(ctx.slide_path),
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        return {"scores": overlap_h5_path(ctx)}

    def run(self, ctx: RowContext) -> StageRun:
        """Encode the overlapping grid and score it (vs the blockmap scores with use_ref_scores)."""
        from ..encoders import overlap_scores, write_scores_h5

        hm = ctx.cfg.heatmap_arguments
        coords, side = grid(ctx, ctx.cfg.patching_arguments.overlap, ctx.roi())
        reference, _, _ = read_scores(blockmap_h5_path(ctx))
        infer = Ledger.load(ctx.ledger_path).record("infer") or {}
        model, device = model_for(ctx.cfg)
        scores = overlap_scores(
            ctx.slide_path,
            coords,
            model=model,
            device=device,
            branch=int(infer.get("result", {}).get("pred", 0)),
            reference_scores=reference if hm.use_ref_scores else None,
            **encode_kwargs(ctx.cfg),
        )
        out = overlap_h5_path(ctx)
        write_scores_h5(out, scores, coords, coords_attrs={"patch_size_level0": side})
        return StageRun([out], {"n_patches": int(len(coords))})
