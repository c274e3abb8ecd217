"""``class_maps``: one heatmap per class (``heatmap_arguments.classes: all | [names]``).

For models with one attention map per class (a :class:`~clam_heat.models.registry.ModelSpec`
with ``per_class``: CLAM_MB, DSMIL, any registered model that says so), each asked class's bag
attention is scored through the model's own reduction, saved in CLAM's score layout
(``<id>_class_<name>_blockmap.h5``) and drawn like the production heatmap, named with the class
(``<id>_class_<name>.<ext>``). The maps use the bag's grid (the overlap pass scores only the
predicted class) on the slide's own percentile scale. ``predicted`` (the default) skips the
stage: the production heatmap is CLAM's predicted-class map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import HeatmapConfig
from ..errors import ConfigError
from ..ledger import file_identity
from ..rows import (
    RowContext,
    class_heatmap_path,
    class_scores_h5_path,
    segmentation_geojson_path,
)
from .base import Stage, StageRun, base_fingerprint


def class_names(cfg: HeatmapConfig) -> list[str]:
    """The class names whose maps are drawn, in class-index order."""
    names = cfg.data_arguments.label_names()
    chosen = cfg.heatmap_arguments.classes
    every = [names[i] for i in sorted(names)]
    return every if chosen == "all" else [n for n in every if n in set(chosen)]


def check_per_class(cfg: HeatmapConfig) -> None:
    """A one-line error unless the configured model has one attention map per class."""
    from ..models.registry import get_model_spec, parse_model_type

    args = cfg.model_arguments
    name = parse_model_type(args.model_type, embed_dim=args.embed_dim).name
    if not get_model_spec(name).per_class:
        raise ConfigError(
            f"heatmap_arguments.classes: {cfg.heatmap_arguments.classes} needs a model with one "
            f"attention map per class (clam_mb, dsmil), but model_type {args.model_type} has one "
            "map; set classes: predicted"
        )


class ClassMapsStage(Stage):
    name = "class_maps"
    depends_on = ("segment", "infer")
    preload = ("clam_heat.heatmap", "clam_heat.features", "clam_heat.models")
    needs_model = True

    def enabled(self, cfg: HeatmapConfig) -> bool:
        hm = cfg.heatmap_arguments
        return hm.classes != "predicted" and "attention" in hm.methods()

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        from .infer import _features_path

        hm = ctx.cfg.heatmap_arguments
        return base_fingerprint(
            classes=class_names(ctx.cfg),
            drawn={k: v for k, v in ctx.cfg.block("heatmap_arguments").items() if k != "classes"},
            model=ctx.cfg.block("model_arguments"),
            checkpoint=file_identity(Path(ctx.cfg.model_arguments.ckpt_path)),
            features=file_identity(_features_path(ctx)),
            segment=ctx.cfg.runner_arguments.segment_heatmap,
            tissue=file_identity(segmentation_geojson_path(ctx)),
            roi=list(ctx.roi() or ()),
            save_ext=hm.save_ext,
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        outs: dict[str, Path] = {}
        for name in class_names(ctx.cfg):
            outs[f"scores_{name}"] = class_scores_h5_path(ctx, name)
            outs[f"heatmap_{name}"] = class_heatmap_path(ctx, name)
        return outs

    def run(self, ctx: RowContext) -> StageRun:
        from ..h5io import write_scores_h5
        from ..heatmap import render_heatmap
        from ..heatmap.meta import image_meta
        from ..models import attention_logits
        from ..tissue import load_geojson
        from .heatmap import _vis_level, production_spec
        from .infer import load_row_bag
        from .resources import model_for

        check_per_class(ctx.cfg)
        hm = ctx.cfg.heatmap_arguments
        runner = ctx.cfg.runner_arguments
        slide = ctx.slide()
        bag = load_row_bag(ctx, slide)
        model, _ = model_for(ctx.cfg)
        index = {name: i for i, name in ctx.cfg.data_arguments.label_names().items()}
        tissue = load_geojson(segmentation_geojson_path(ctx)) if runner.segment_heatmap else None
        spec = production_spec(ctx, _vis_level(ctx, hm.vis_level))
        written: list[Path] = []
        for name in class_names(ctx.cfg):
            scores = attention_logits(model, bag.features, branch=index[name])
            h5 = write_scores_h5(
                class_scores_h5_path(ctx, name),
                scores,
                bag.coords_l0,
                attrs={"class_name": name, "class_index": index[name]},
                coords_attrs={"patch_size_level0": int(bag.patch_size_l0)},
            )
            out = class_heatmap_path(ctx, name)
            meta = image_meta(spec.cmap, map_name=f"class {name}")
            render_heatmap(
                slide,
                bag.coords_l0,
                scores,
                bag.patch_size_l0,
                spec,
                tissue=tissue,
                out_path=out,
                meta=meta,
            )
            written += [h5, out]
        return StageRun(written, {"classes": class_names(ctx.cfg)})
