"""``segment``: tissue contours and CLAM's overview image from the slide (CLAM's segmentation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..ledger import file_identity
from ..rows import RowContext, mask_jpg_path, segmentation_geojson_path
from .base import Stage, StageRun, base_fingerprint


def _seg_params(ctx: RowContext) -> Any:
    from ..tissue import SegmentationParams

    return SegmentationParams.from_row_params(ctx.row_params)


class SegmentStage(Stage):
    name = "segment"
    preload = ("clam_heat.slide", "clam_heat.tissue", "openslide", "PIL.Image")

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        return base_fingerprint(
            params=_seg_params(ctx).to_dict(), slide=file_identity(ctx.slide_path)
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        return {"geojson": segmentation_geojson_path(ctx), "mask": mask_jpg_path(ctx)}

    def run(self, ctx: RowContext) -> StageRun:
        from ..errors import SegmentationError
        from ..tissue import draw_overview, save_geojson, save_overview_jpg, segment_slide

        params = _seg_params(ctx)
        slide = ctx.slide()
        tissue, level = segment_slide(slide, params)
        if len(tissue) == 0:
            raise SegmentationError(
                f"{ctx.slide_path}: no tissue found at seg level {level} "
                f"(lower sthresh/a_t in the preset or the row, or check the slide)"
            )
        outs = self.outputs(ctx)
        save_geojson(tissue, outs["geojson"])
        overview = draw_overview(
            slide, tissue, vis_level=params.vis_level, line_thickness=params.line_thickness
        )
        save_overview_jpg(overview, outs["mask"])
        return StageRun(
            [outs["geojson"], outs["mask"]], {"seg_level": level, "n_contours": len(tissue)}
        )
