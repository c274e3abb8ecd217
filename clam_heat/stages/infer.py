"""``infer``: the bag's attention scores and prediction (CLAM's ``_blockmap.h5``).

The bag comes from the provided feature H5, or (``extract_features``) from our own encoder pass
over CLAM's non-overlapping in-tissue grid, cached as ``<raw>/<id>.h5``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import HeatmapConfig
from ..errors import FeatureError, SlideError
from ..h5io import write_blockmap
from ..ledger import file_identity
from ..rows import RowContext, blockmap_h5_path, features_cache_path, segmentation_geojson_path
from .base import Stage, StageRun, base_fingerprint
from .resources import encode_kwargs, encoder_fingerprint, grid, model_for

if TYPE_CHECKING:
    from ..features import Bag
    from ..slide import Slide


def load_row_bag(ctx: RowContext, slide: Slide | None, path: Path | None = None) -> Bag:
    """The row's bag as every model stage reads it: the run's patch-size rules and its
    ``max_patches`` bound (docs/reliability.md), from ``path`` or the row's features file."""
    from ..features import load_bag

    runner = ctx.cfg.runner_arguments
    return load_bag(
        path if path is not None else _features_path(ctx),
        slide=slide,
        patch_size_level0_override=runner.patch_size_level0,
        patches_dir=runner.patches_dir,
        max_patches=runner.max_patches,
    )


def _features_path(ctx: RowContext) -> Path:
    from ..features import find_features_file

    try:
        return find_features_file(
            ctx.slide_id, features_dir=ctx.cfg.runner_arguments.features_dir, raw_dir=ctx.raw_dir
        )
    except FeatureError:
        if ctx.cfg.runner_arguments.extract_features:
            return features_cache_path(ctx)  # CLAM's raw feature cache, written by the infer stage
        raise


def _extracting(ctx: RowContext) -> bool:
    """True when the bag's features come from our own encoder pass (no H5 was provided)."""
    return ctx.cfg.runner_arguments.extract_features and _features_path(ctx) == features_cache_path(
        ctx
    )


def _extract_bag_features(ctx: RowContext) -> None:
    """CLAM's blocky pass: encode the non-overlapping in-tissue grid into ``<raw>/<id>.h5``."""
    from ..encoders import encode_patches, write_features_h5

    coords, side = grid(ctx, 0.0, None)
    kwargs = encode_kwargs(ctx.cfg)
    features = encode_patches(ctx.slide_path, coords, **kwargs)
    write_features_h5(
        features_cache_path(ctx),
        features,
        coords,
        attrs={"encoder": json.dumps(kwargs["encoder"].fingerprint(), default=str)},
        coords_attrs={"patch_size_level0": side},
    )


def check_coords_in_slide(
    coords_l0: np.ndarray, side: int, dims: tuple[int, int], h5: Path, slide_path: Path
) -> str | None:
    """Patches that do not overlap the slide at all: every one -> :class:`FeatureError` with
    the counts and the likely cause; some -> a one-line warning for the row (else None).

    >>> inside = np.array([[0, 0], [900, 0]])  # the second patch overlaps the right edge
    >>> check_coords_in_slide(inside, 256, (1000, 800), Path("a.h5"), Path("a.svs")) is None
    True
    >>> check_coords_in_slide(inside * 2, 256, (1000, 800), Path("a.h5"), Path("a.svs"))[:36]
    'a.h5: 1 of 2 patches lie outside the'

    """
    if len(coords_l0) == 0:
        return None
    width, height = dims
    x, y = coords_l0[:, 0].astype(np.int64), coords_l0[:, 1].astype(np.int64)
    outside = (x >= width) | (y >= height) | (x + side <= 0) | (y + side <= 0)
    n_out, n = int(outside.sum()), len(coords_l0)
    if n_out == 0:
        return None
    reach_x, reach_y = int(x.max()) + side, int(y.max()) + side
    where = (
        f"{slide_path} is {width}x{height} px at level 0, the coordinates reach "
        f"x {reach_x}, y {reach_y}"
    )
    scale = max(reach_x / width, reach_y / height)
    if scale > 1.5 and abs(scale - 2 ** round(np.log2(scale))) / scale < 0.15:
        cause = (
            f"coordinates at another level or magnification (about {scale:.1f}x the slide), "
            "or features of another slide"
        )
    else:
        cause = "features of another slide, or coordinates at another level"
    if n_out == n:
        raise FeatureError(
            f"{h5}: all {n} patch coordinates lie outside the slide ({where}); likely cause: "
            f"{cause}; check features_dir and the H5's coords"
        )
    return (
        f"{h5}: {n_out} of {n} patches lie outside the slide ({where}); they get scores but "
        f"are not drawn; likely cause: {cause}"
    )


class InferStage(Stage):
    name = "infer"
    depends_on = ("segment",)  # only when it extracts features itself
    preload = ("clam_heat.features", "clam_heat.models", "h5py")
    needs_model = True

    def upstream(self, cfg: HeatmapConfig) -> tuple[str, ...]:
        return self.depends_on if cfg.runner_arguments.extract_features else ()

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        model = ctx.cfg.model_arguments
        extra: dict[str, Any] = {}
        try:
            path = _features_path(ctx)
            features = file_identity(path)
            if _extracting(ctx):
                extra["encoder"] = encoder_fingerprint(ctx.cfg)
                extra["tissue"] = file_identity(segmentation_geojson_path(ctx))
                features = {"path": str(path)}  # our own cache: identified by the encoder + tissue
        except FeatureError as err:
            features = {"error": str(err)}
        return base_fingerprint(
            **extra,
            model={
                "model_type": model.model_type,
                "model_size": model.model_size,
                "embed_dim": model.embed_dim,
                "n_classes": ctx.cfg.exp_arguments.n_classes,
            },
            patch_size_level0=ctx.cfg.runner_arguments.patch_size_level0,
            checkpoint=file_identity(Path(model.ckpt_path)),
            features=features,
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        outs = {"blockmap": blockmap_h5_path(ctx)}
        try:
            if _extracting(ctx):
                outs["features"] = features_cache_path(ctx)
        except FeatureError:
            pass
        return outs

    def run(self, ctx: RowContext) -> StageRun:
        from ..models import run_attention

        path = _features_path(ctx)
        if _extracting(ctx):
            _extract_bag_features(ctx)
        slide = None
        try:
            slide = ctx.slide()
        except SlideError:
            slide = None  # the patch size can usually be resolved from the H5 alone
        bag = load_row_bag(ctx, slide, path)
        warnings: list[str] = []
        if slide is not None:
            warning = check_coords_in_slide(
                bag.coords_l0, int(bag.patch_size_l0), slide.dimensions, path, ctx.slide_path
            )
            if warning:
                warnings.append(warning)
        model, device = model_for(ctx.cfg)
        from ..explain import check_methods

        check_methods(model, ctx.cfg.heatmap_arguments.methods())  # one line, before any work
        try:
            out = run_attention(model, bag.features, device=device)
        except FeatureError as err:  # run_attention's messages do not name the file; add it
            raise FeatureError(f"{path}: {err}") from None
        names = ctx.cfg.data_arguments.label_names()
        result = {
            "bag_size": int(bag.features.shape[0]),
            "pred": out.pred,
            "top_ids": [int(i) for i in out.top_ids],
            "top_names": [names.get(int(i), str(i)) for i in out.top_ids],
            "top_probs": [float(out.probs[i]) for i in out.top_ids],
            "probs": [float(p) for p in out.probs],
            "attention_mean": float(np.mean(out.attention)),
            "attention_std": float(np.std(out.attention)),
            "patch_size_level0": int(bag.patch_size_l0),
            "patch_size_rule": bag.patch_size_rule,
            "features_path": str(path),
        }
        if warnings:
            result["warnings"] = warnings
        write_blockmap(blockmap_h5_path(ctx), out.attention, bag.coords_l0, result)
        return StageRun(list(self.outputs(ctx).values()), result)
