"""``explain``: attribution maps beyond attention (``heatmap_arguments.method``), one blockmap
H5 and one production image per method (and per class with ``classes``), computed by
:mod:`clam_heat.explain` from the features and the checkpoint only.

``attention`` stays with the ``infer`` and ``heatmap`` stages (CLAM's files, unchanged), so this
stage runs only when another method is asked. Signed maps are drawn with ``signed_cmap``
centred on zero; unsigned ones like the production heatmap (slide percentiles).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import HeatmapConfig
from ..ledger import file_identity
from ..rows import (
    RowContext,
    method_heatmap_path,
    method_scores_h5_path,
    segmentation_geojson_path,
)
from .base import Stage, StageRun, base_fingerprint
from .class_maps import class_names

__all__ = ["ExplainStage", "explain_options", "extra_methods", "targets_of"]


def extra_methods(cfg: HeatmapConfig) -> list[str]:
    """The asked methods this stage computes (all but ``attention``)."""
    return [m for m in cfg.heatmap_arguments.methods() if m != "attention"]


def explain_options(cfg: HeatmapConfig) -> Any:
    from ..explain import ExplainOptions

    hm = cfg.heatmap_arguments
    return ExplainOptions(
        ig_steps=hm.ig_steps, ig_baseline=hm.ig_baseline, occlusion_group=hm.occlusion_group
    )


def targets_of(cfg: HeatmapConfig) -> list[tuple[str | None, int | None]]:
    """(class name or None, class index or None) pairs: ``[(None, None)]`` for the predicted
    class, else one per class of ``classes``."""
    if cfg.heatmap_arguments.classes == "predicted":
        return [(None, None)]
    index = {name: i for i, name in cfg.data_arguments.label_names().items()}
    return [(name, index[name]) for name in class_names(cfg)]


class ExplainStage(Stage):
    name = "explain"
    depends_on = ("segment", "infer")
    needs_model = True
    preload = ("clam_heat.explain", "clam_heat.heatmap", "clam_heat.features", "captum.attr")

    def enabled(self, cfg: HeatmapConfig) -> bool:
        return bool(extra_methods(cfg))

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        from .infer import _features_path

        return base_fingerprint(
            methods=extra_methods(ctx.cfg),
            targets=[name for name, _ in targets_of(ctx.cfg)],
            drawn={
                k: v
                for k, v in ctx.cfg.block("heatmap_arguments").items()
                if not k.startswith("faithfulness")  # the faithfulness stage's keys
            },
            model=ctx.cfg.block("model_arguments"),
            checkpoint=file_identity(Path(ctx.cfg.model_arguments.ckpt_path)),
            features=file_identity(_features_path(ctx)),
            segment=ctx.cfg.runner_arguments.segment_heatmap,
            tissue=file_identity(segmentation_geojson_path(ctx)),
            roi=list(ctx.roi() or ()),
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        outs: dict[str, Path] = {}
        for method in extra_methods(ctx.cfg):
            for name, _ in targets_of(ctx.cfg):
                key = method if name is None else f"{method}_{name}"
                outs[f"scores_{key}"] = method_scores_h5_path(ctx, method, name)
                outs[f"heatmap_{key}"] = method_heatmap_path(ctx, method, name)
        return outs

    def run(self, ctx: RowContext) -> StageRun:
        from ..explain import METHODS, explain_bag, signed_percent
        from ..h5io import write_scores_h5
        from ..heatmap import render_heatmap
        from ..tissue import load_geojson
        from .heatmap import _vis_level, production_spec
        from .infer import load_row_bag
        from .resources import model_for

        hm = ctx.cfg.heatmap_arguments
        runner = ctx.cfg.runner_arguments
        slide = ctx.slide()
        bag = load_row_bag(ctx, slide)
        model, _ = model_for(ctx.cfg)
        pairs = targets_of(ctx.cfg)
        maps = explain_bag(
            model,
            bag.features,
            extra_methods(ctx.cfg),
            targets=None if pairs == [(None, None)] else [i for _, i in pairs],  # type: ignore[misc]
            options=explain_options(ctx.cfg),
            coords=bag.coords_l0,
            patch_size=int(bag.patch_size_l0),
        )
        tissue = load_geojson(segmentation_geojson_path(ctx)) if runner.segment_heatmap else None
        base = production_spec(ctx, _vis_level(ctx, hm.vis_level))
        labels = ctx.cfg.data_arguments.label_names()
        written: list[Path] = []
        result: dict[str, Any] = {}
        for (method, target), attribution in maps.items():
            name = None if pairs == [(None, None)] else labels[target]
            signed = METHODS[method].signed
            h5 = write_scores_h5(
                method_scores_h5_path(ctx, method, name),
                attribution.scores,
                bag.coords_l0,
                attrs={
                    **attribution.attrs,
                    "signed": signed,
                    "class_index": target,
                    "class_name": labels.get(target, str(target)),
                },
                coords_attrs={"patch_size_level0": int(bag.patch_size_l0)},
            )
            scores = attribution.scores
            spec = base
            if signed:
                scores = signed_percent(scores, hm.signed_scale)
                spec = replace(base, cmap=hm.signed_cmap, use_percentiles=False)
            out = method_heatmap_path(ctx, method, name)
            render_heatmap(
                slide, bag.coords_l0, scores, bag.patch_size_l0, spec, tissue=tissue, out_path=out
            )
            written += [h5, out]
            for key in ("completeness_error", "sum_error"):
                if key in attribution.attrs:
                    result[f"{method}_{key}"] = float(np.round(attribution.attrs[key], 9))
        return StageRun(written, result)
