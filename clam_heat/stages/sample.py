"""``sample``: CLAM's sampled patches (top-k / range of attention), one folder per sampler."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..h5io import read_scores
from ..ledger import Ledger, file_identity
from ..rows import (
    RowContext,
    blockmap_h5_path,
    sampled_patches_dir,
    threshold_export_dir,
    threshold_file_names,
)
from .base import Stage, StageRun, base_fingerprint

if TYPE_CHECKING:
    import numpy as np

    from ..config import SampleSpec


class SampleStage(Stage):
    name = "sample"
    depends_on = ("infer",)
    preload = ("clam_heat.sampling",)

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        patching = ctx.cfg.patching_arguments
        return base_fingerprint(
            samplers=[s.model_dump() for s in ctx.cfg.sample_arguments.samples if s.sample],
            patch_level=patching.patch_level,
            slide=file_identity(ctx.slide_path),
            blockmap=file_identity(blockmap_h5_path(ctx)),
            label=ctx.label,
        )

    def run(self, ctx: RowContext) -> StageRun:
        from ..sampling import sample_patches

        scores, coords, patch_l0 = read_scores(blockmap_h5_path(ctx))
        infer = Ledger.load(ctx.ledger_path).record("infer") or {}
        pred = int(infer.get("result", {}).get("pred", 0))
        level = ctx.cfg.patching_arguments.patch_level
        written: list[Path] = []
        warnings: list[str] = []
        for spec in ctx.cfg.sample_arguments.samples:
            if not spec.sample:
                continue
            if spec.mode == "threshold":
                paths, warning = _export_threshold(ctx, spec, pred, scores, coords, patch_l0)
                written.extend(paths)
                if warning:
                    warnings.append(f"{spec.name}: {warning}")
                continue
            paths, warning = sample_patches(
                ctx.slide(),
                coords,
                scores,
                folder=sampled_patches_dir(ctx, pred, spec.name),
                slide_id=ctx.slide_id,
                patch_level=level,
                patch_size_level0=patch_l0,
                spec=spec,
            )
            written.extend(paths)
            if warning:
                warnings.append(f"{spec.name}: {warning}")
        return StageRun(written, {"n_patches": len(written), "warnings": warnings})


def _export_threshold(
    ctx: RowContext,
    spec: SampleSpec,
    pred: int,
    scores: np.ndarray,
    coords: np.ndarray,
    patch_l0: int,
) -> tuple[list[Path], str | None]:
    """A ``mode: threshold`` sampler: every patch at/above the threshold, a folder per slide."""
    from ..sampling import export_threshold

    return export_threshold(
        ctx.slide(),
        coords,
        scores,
        spec=spec,
        slide_id=ctx.slide_id,
        folder=threshold_export_dir(ctx, pred, spec.name),
        patch_level=ctx.cfg.patching_arguments.patch_level,
        patch_size_level0=patch_l0,
        file_names=threshold_file_names(ctx.slide_id),
    )
