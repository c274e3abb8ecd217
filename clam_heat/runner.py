"""The resumable stage runner behind ``clam-heat run``.

For every process-list row with ``process == 1`` the stages run in order
(segment -> infer -> heatmap -> sample). Each stage is a function from a :class:`RowContext` to the
files it writes plus a small JSON-able result. Before running a stage the runner computes its
fingerprint (the config keys it reads, the identity of its input files, the package version) and
asks the slide's :class:`~clam_heat.ledger.Ledger` whether the stage is up to date; only stale
stages run. Outputs are written atomically by the stage modules, then the ledger records the
fingerprint, so a kill at any point leaves either the old complete output or none.

The driver owns the process-list CSV: after each row it writes status, last completed stage,
error and results back atomically, and a row's failure never stops the others.
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .config import HeatmapConfig
from .errors import ClamHeatError, FeatureError, ProcessListError, SlideError
from .ledger import Ledger, Reason, Timer, file_identity, now_iso, write_text_atomic

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("segment", "infer", "overlap", "heatmap", "sample")

__all__ = [
    "STAGES",
    "RowContext",
    "stages_for",
    "RowOutcome",
    "RunSummary",
    "plan_row",
    "process_row",
    "run_pipeline",
]


# --------------------------------------------------------------------------------------------
# Row context
# --------------------------------------------------------------------------------------------


@dataclass
class RowContext:
    """Everything one row's stages need; built by the driver, usable in a worker process."""

    cfg: HeatmapConfig
    slide_id: str
    row: dict[str, Any]
    slide_path: Path
    label: str
    row_params: dict[str, Any]
    _slide: Any = field(default=None, repr=False)

    @property
    def raw_root(self) -> Path:
        exp = self.cfg.exp_arguments
        return Path(exp.raw_save_dir) / exp.save_exp_code

    @property
    def production_root(self) -> Path:
        exp = self.cfg.exp_arguments
        return Path(exp.production_save_dir) / exp.save_exp_code

    @property
    def raw_dir(self) -> Path:
        """CLAM's ``raw_save_dir/save_exp_code/<grouping>/<slide_id>/``."""
        return self.raw_root / self.label / self.slide_id

    @property
    def production_dir(self) -> Path:
        return self.production_root / self.label

    @property
    def ledger_path(self) -> Path:
        return self.raw_dir / f"{self.slide_id}.ledger.json"

    def raw(self, suffix: str) -> Path:
        return self.raw_dir / f"{self.slide_id}{suffix}"

    def slide(self) -> Any:
        """The opened slide (opened once per row, lazily)."""
        if self._slide is None:
            from .slide import open_slide

            self._slide = open_slide(self.slide_path)
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def roi(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x1, y1, x2, y2) from the row when ``use_roi``; a clear error if unusable."""
        if not self.cfg.heatmap_arguments.use_roi:
            return None
        values = []
        for key in ("x1", "y1", "x2", "y2"):
            raw = self.row.get(key)
            try:
                number = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                number = float("nan")
            if not np.isfinite(number):
                raise ProcessListError(
                    f"slide {self.slide_id}: heatmap_arguments.use_roi is true but column {key!r} "
                    f"is {raw!r}; fill x1, y1, x2, y2 (level-0 px) or set use_roi: false"
                )
            values.append(int(number))
        x1, y1, x2, y2 = values
        if x2 <= x1 or y2 <= y1:
            raise ProcessListError(
                f"slide {self.slide_id}: ROI x1={x1}, y1={y1}, x2={x2}, y2={y2} is empty "
                "(need x2 > x1 and y2 > y1)"
            )
        return x1, y1, x2, y2


def grouping_for(row: dict[str, Any], label_names: dict[int, str]) -> str:
    """CLAM's per-row sub-folder: the label if it is a name, else the label_dict name of the int."""
    label = row.get("label")
    if label is None or (isinstance(label, float) and np.isnan(label)) or str(label).strip() == "":
        return "Unspecified"
    text = str(label).strip()
    try:
        as_int = int(float(text))
    except ValueError:
        return text
    return label_names.get(as_int, text)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRun:
    """What a stage wrote and the small result recorded in the ledger and the CSV."""

    outputs: list[Path]
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    fingerprint: Callable[[RowContext], dict[str, Any]]
    expected_outputs: Callable[[RowContext], list[Path]]
    run: Callable[[RowContext], StageRun]


def _base_fingerprint(**parts: Any) -> dict[str, Any]:
    return {"package_version": __version__, **parts}


def _seg_params(ctx: RowContext) -> Any:
    from .segmentation import SegmentationParams

    return SegmentationParams.from_row_params(ctx.row_params)


# segment ------------------------------------------------------------------------------------


def _segment_fingerprint(ctx: RowContext) -> dict[str, Any]:
    return _base_fingerprint(params=_seg_params(ctx).to_dict(), slide=file_identity(ctx.slide_path))


def _segment_outputs(ctx: RowContext) -> list[Path]:
    return [ctx.raw("_segmentation.geojson"), ctx.raw("_mask.jpg")]


def _segment_run(ctx: RowContext) -> StageRun:
    from .errors import SegmentationError
    from .segmentation import draw_overview, save_geojson, save_overview_jpg, segment_slide

    params = _seg_params(ctx)
    slide = ctx.slide()
    tissue, level = segment_slide(slide, params)
    if len(tissue) == 0:
        raise SegmentationError(
            f"{ctx.slide_path}: no tissue found at seg level {level} "
            f"(lower sthresh/a_t in the preset or the row, or check the slide)"
        )
    geojson_path, mask_path = _segment_outputs(ctx)
    save_geojson(tissue, geojson_path)
    overview = draw_overview(
        slide, tissue, vis_level=params.vis_level, line_thickness=params.line_thickness
    )
    save_overview_jpg(overview, mask_path)
    return StageRun([geojson_path, mask_path], {"seg_level": level, "n_contours": len(tissue)})


# infer --------------------------------------------------------------------------------------


def _features_path(ctx: RowContext) -> Path:
    from .features import find_features_file

    try:
        return find_features_file(
            ctx.slide_id, features_dir=ctx.cfg.runner_arguments.features_dir, raw_dir=ctx.raw_dir
        )
    except FeatureError:
        if ctx.cfg.runner_arguments.extract_features:
            return ctx.raw(".h5")  # CLAM's raw feature cache, written by the infer stage
        raise


def _extracting(ctx: RowContext) -> bool:
    """True when the bag's features come from our own encoder pass (no H5 was provided)."""
    return ctx.cfg.runner_arguments.extract_features and _features_path(ctx) == ctx.raw(".h5")


def _encoder_fingerprint(cfg: HeatmapConfig) -> dict[str, Any]:
    from .encoders import find_encoder_weights

    enc = cfg.encoder_arguments
    weights = find_encoder_weights(enc.model_name, cfg.runner_arguments.encoder_weights)
    return {
        "model_name": enc.model_name,
        "target_img_size": enc.target_img_size,
        "weights": file_identity(weights) if weights is not None else None,
        "patching": cfg.block("patching_arguments") | {"overlap": None},
        "use_center_shift": cfg.heatmap_arguments.use_center_shift,
    }


def _infer_fingerprint(ctx: RowContext) -> dict[str, Any]:
    model = ctx.cfg.model_arguments
    extra: dict[str, Any] = {}
    try:
        path = _features_path(ctx)
        features = file_identity(path)
        if _extracting(ctx):
            extra["encoder"] = _encoder_fingerprint(ctx.cfg)
            extra["tissue"] = file_identity(ctx.raw("_segmentation.geojson"))
            features = {"path": str(path)}  # our own cache: identified by the encoder + tissue
    except FeatureError as err:
        features = {"error": str(err)}
    return _base_fingerprint(
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


def _infer_outputs(ctx: RowContext) -> list[Path]:
    outs = [ctx.raw("_blockmap.h5")]
    try:
        if _extracting(ctx):
            outs.append(ctx.raw(".h5"))
    except FeatureError:
        pass
    return outs


_ENCODER_CACHE: dict[tuple, Any] = {}


def _encoder_for(cfg: HeatmapConfig) -> Any:
    """Build the configured patch encoder once per process."""
    from .encoders import build_encoder
    from .models import resolve_device

    enc = cfg.encoder_arguments
    device = resolve_device(cfg.runner_arguments.device)
    key = (
        enc.model_name,
        enc.target_img_size,
        str(cfg.runner_arguments.encoder_weights),
        cfg.model_arguments.embed_dim,
        str(device),
    )
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE.clear()
        _ENCODER_CACHE[key] = build_encoder(
            enc.model_name,
            target_img_size=enc.target_img_size,
            weights=cfg.runner_arguments.encoder_weights,
            device=device,
            dim=cfg.model_arguments.embed_dim,
        )
    return _ENCODER_CACHE[key]


def _patch_geometry(ctx: RowContext, overlap: float) -> tuple[int, int]:
    """Level-0 (patch side, step) of CLAM's grid: patch_size at patch_level x custom_downsample."""
    patching = ctx.cfg.patching_arguments
    slide = ctx.slide()
    slide.check_level(patching.patch_level)
    downsample = int(slide.level_downsamples[patching.patch_level][0])
    side = int(patching.patch_size * downsample * patching.custom_downsample)
    step = int(patching.patch_size * (1 - overlap)) * downsample * patching.custom_downsample
    return side, max(1, int(step))


def _grid(
    ctx: RowContext, overlap: float, roi: tuple[int, int, int, int] | None
) -> tuple[np.ndarray, int]:
    """In-tissue grid (CLAM's heatmap dataset: four_pt_hard, centre shift by overlap)."""
    from .errors import SegmentationError
    from .segmentation import center_shift_for_overlap, grid_coords, load_geojson

    side, step = _patch_geometry(ctx, overlap)
    tissue = load_geojson(ctx.raw("_segmentation.geojson"))
    coords = grid_coords(
        tissue,
        patch_size_l0=side,
        step_l0=step,
        slide_dims=ctx.slide().dimensions,
        roi=roi,
        contour_fn="four_pt_hard",
        center_shift=center_shift_for_overlap(overlap, ctx.cfg.heatmap_arguments.use_center_shift),
    )
    if len(coords) == 0:
        raise SegmentationError(
            f"{ctx.slide_path}: no patch of {side} px lies fully in tissue"
            + (" inside the ROI" if roi else "")
            + " (check the segmentation overview _mask.jpg, patch_size or the ROI)"
        )
    return coords, side


def _encode_kwargs(cfg: HeatmapConfig) -> dict[str, Any]:
    patching = cfg.patching_arguments
    return {
        "encoder": _encoder_for(cfg),
        "patch_level": patching.patch_level,
        "patch_size": patching.patch_size,
        "custom_downsample": patching.custom_downsample,
        "batch_size": cfg.exp_arguments.batch_size,
        "num_workers": cfg.runner_arguments.loader_workers,
        "amp": cfg.runner_arguments.amp,
    }


def _extract_bag_features(ctx: RowContext) -> None:
    """CLAM's blocky pass: encode the non-overlapping in-tissue grid into ``<raw>/<id>.h5``."""
    from .encoders import encode_patches, write_features_h5

    coords, side = _grid(ctx, 0.0, None)
    kwargs = _encode_kwargs(ctx.cfg)
    features = encode_patches(ctx.slide_path, coords, **kwargs)
    write_features_h5(
        ctx.raw(".h5"),
        features,
        coords,
        attrs={"encoder": json.dumps(kwargs["encoder"].fingerprint(), default=str)},
        coords_attrs={"patch_size_level0": side},
    )


_MODEL_CACHE: dict[tuple, Any] = {}


def _model_for(cfg: HeatmapConfig) -> tuple[Any, Any]:
    """Load the model once per process (keyed by checkpoint identity and architecture)."""
    from .models import load_model, resolve_device

    args = cfg.model_arguments
    device = resolve_device(cfg.runner_arguments.device)
    ident = file_identity(Path(args.ckpt_path))
    key = (
        str(args.ckpt_path),
        ident.get("sha256", ident.get("mtime_ns")),
        args.model_type,
        args.model_size,
        args.embed_dim,
        cfg.exp_arguments.n_classes,
        str(device),
    )
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(
            Path(args.ckpt_path),
            args.model_type,
            n_classes=cfg.exp_arguments.n_classes,
            embed_dim=args.embed_dim,
            model_size=args.model_size,
            device=device,
        )
    return _MODEL_CACHE[key], device


def _infer_run(ctx: RowContext) -> StageRun:
    from .features import load_bag
    from .models import run_attention

    path = _features_path(ctx)
    if _extracting(ctx):
        _extract_bag_features(ctx)
    slide = None
    try:
        slide = ctx.slide()
    except SlideError:
        slide = None  # the patch size can usually be resolved from the H5 alone
    bag = load_bag(
        path,
        slide=slide,
        patch_size_level0_override=ctx.cfg.runner_arguments.patch_size_level0,
        patches_dir=ctx.cfg.runner_arguments.patches_dir,
    )
    model, device = _model_for(ctx.cfg)
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
    blockmap = ctx.raw("_blockmap.h5")
    _write_blockmap(blockmap, out.attention, bag.coords_l0, result)
    return StageRun(_infer_outputs(ctx), result)


def _write_blockmap(path: Path, scores: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    """CLAM's ``_blockmap.h5`` (attention_scores (N, 1) float32, coords (N, 2) int64), atomic,
    with the prediction stored beside the scores as provenance."""
    from .encoders import write_scores_h5

    write_scores_h5(
        path,
        scores,
        coords,
        attrs={"prediction": json.dumps(attrs)},
        coords_attrs={"patch_size_level0": int(attrs["patch_size_level0"])},
    )


def _read_blockmap(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    import h5py

    with h5py.File(path, "r") as h5:
        scores = h5["attention_scores"][:].reshape(-1).astype(np.float32)
        coords = h5["coords"][:].astype(np.int64)
        size = int(h5["coords"].attrs["patch_size_level0"])
    return scores, coords, size


# overlap (CLAM's calc_heatmap pass) ---------------------------------------------------------


def _overlap_path(ctx: RowContext) -> Path:
    from .encoders import overlap_h5_name

    overlap = ctx.cfg.patching_arguments.overlap
    return ctx.raw_dir / overlap_h5_name(
        ctx.slide_id, f"{overlap:g}", ctx.cfg.heatmap_arguments.use_roi
    )


def _overlap_fingerprint(ctx: RowContext) -> dict[str, Any]:
    hm = ctx.cfg.heatmap_arguments
    return _base_fingerprint(
        encoder=_encoder_fingerprint(ctx.cfg),
        overlap=ctx.cfg.patching_arguments.overlap,
        roi=list(ctx.roi() or ()),
        use_ref_scores=hm.use_ref_scores,
        checkpoint=file_identity(Path(ctx.cfg.model_arguments.ckpt_path)),
        blockmap=file_identity(ctx.raw("_blockmap.h5")),
        tissue=file_identity(ctx.raw("_segmentation.geojson")),
        slide=file_identity(ctx.slide_path),
    )


def _overlap_run(ctx: RowContext) -> StageRun:
    """Encode the overlapping grid and score it (vs the blockmap scores with use_ref_scores)."""
    from .encoders import overlap_scores, write_scores_h5

    hm = ctx.cfg.heatmap_arguments
    coords, side = _grid(ctx, ctx.cfg.patching_arguments.overlap, ctx.roi())
    reference, _, _ = _read_blockmap(ctx.raw("_blockmap.h5"))
    infer = Ledger.load(ctx.ledger_path).record("infer") or {}
    model, device = _model_for(ctx.cfg)
    scores = overlap_scores(
        ctx.slide_path,
        coords,
        model=model,
        device=device,
        branch=int(infer.get("result", {}).get("pred", 0)),
        reference_scores=reference if hm.use_ref_scores else None,
        **_encode_kwargs(ctx.cfg),
    )
    out = _overlap_path(ctx)
    write_scores_h5(out, scores, coords, coords_attrs={"patch_size_level0": side})
    return StageRun([out], {"n_patches": int(len(coords))})


# heatmap ------------------------------------------------------------------------------------


def _vis_level(ctx: RowContext, configured: int) -> int:
    return configured if configured >= 0 else ctx.slide().best_level_for_downsample(32)


def production_heatmap_path(ctx: RowContext) -> Path:
    """Where the ``heatmap`` stage writes the row's production heatmap (CLAM's long name)."""
    from .heatmap import production_heatmap_name

    overlap = ctx.cfg.patching_arguments.overlap
    name = production_heatmap_name(ctx.slide_id, ctx.cfg.block("heatmap_arguments"), overlap)
    return ctx.production_dir / name


def pyramid_heatmap_path(ctx: RowContext) -> Path:
    """Where the ``heatmap`` stage writes the pyramidal TIFF (``write_pyramid_tiff``)."""
    return ctx.production_dir / f"{ctx.slide_id}_heatmap_pyramid.tiff"


def _heatmap_outputs(ctx: RowContext) -> list[Path]:
    from .heatmap import blockmap_name, orig_name

    hm = ctx.cfg.heatmap_arguments
    outs = [ctx.raw_dir / blockmap_name(ctx.slide_id), production_heatmap_path(ctx)]
    if hm.save_orig:
        level = hm.vis_level if hm.vis_level >= 0 else _vis_level(ctx, -1)
        outs.append(ctx.production_dir / orig_name(ctx.slide_id, level, hm.save_ext))
    runner = ctx.cfg.runner_arguments
    if runner.write_pyramid_tiff:
        outs.append(pyramid_heatmap_path(ctx))
    if runner.write_geojson:
        outs.append(ctx.production_dir / f"{ctx.slide_id}_attention.geojson")
    return outs


def _heatmap_fingerprint(ctx: RowContext) -> dict[str, Any]:
    runner = ctx.cfg.runner_arguments
    return _base_fingerprint(
        heatmap_arguments=ctx.cfg.block("heatmap_arguments"),
        overlap=ctx.cfg.patching_arguments.overlap,
        roi=list(ctx.roi() or ()),
        outputs={
            "pyramid_tiff": runner.write_pyramid_tiff,
            "geojson": runner.write_geojson,
            "segment": runner.segment_heatmap,
        },
        slide=file_identity(ctx.slide_path),
        blockmap=file_identity(ctx.raw("_blockmap.h5")),
        overlap_scores=(
            file_identity(_overlap_path(ctx)) if ctx.cfg.heatmap_arguments.calc_heatmap else None
        ),
        tissue=file_identity(ctx.raw("_segmentation.geojson")),
    )


def _heatmap_run(ctx: RowContext) -> StageRun:
    from .heatmap import HeatmapSpec, render_heatmap, save_orig, write_attention_geojson
    from .segmentation import load_geojson

    hm = ctx.cfg.heatmap_arguments
    runner = ctx.cfg.runner_arguments
    slide = ctx.slide()
    scores, coords, patch_l0 = _read_blockmap(ctx.raw("_blockmap.h5"))
    tissue = load_geojson(ctx.raw("_segmentation.geojson")) if runner.segment_heatmap else None
    outs = _heatmap_outputs(ctx)
    blockmap_png, production = outs[0], outs[1]

    coarse = HeatmapSpec(
        vis_level=_vis_level(ctx, -1),
        alpha=hm.alpha,
        cmap=hm.cmap,
        use_percentiles=True,
        segment=runner.segment_heatmap,
    )
    render_heatmap(slide, coords, scores, patch_l0, coarse, tissue=tissue, out_path=blockmap_png)

    level = _vis_level(ctx, hm.vis_level)
    # production scores: CLAM's overlapping pass when calc_heatmap, else the bag's own scores
    use_percentiles = True
    if hm.calc_heatmap:
        scores, coords, patch_l0 = _read_blockmap(_overlap_path(ctx))
        use_percentiles = not hm.use_ref_scores
    pyramid = pyramid_heatmap_path(ctx)
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
        out_path=production,
        pyramid_tiff_path=pyramid if runner.write_pyramid_tiff else None,
    )
    written = [blockmap_png, production]
    if hm.save_orig:
        orig = outs[2]
        save_orig(slide, level, hm.custom_downsample, orig)
        written.append(orig)
    if runner.write_pyramid_tiff:
        written.append(pyramid)
    if runner.write_geojson:
        geo = ctx.production_dir / f"{ctx.slide_id}_attention.geojson"
        write_attention_geojson(coords, scores, patch_l0, geo)
        written.append(geo)
    return StageRun(written, {"vis_level": level})


# sample -------------------------------------------------------------------------------------


def _sample_fingerprint(ctx: RowContext) -> dict[str, Any]:
    patching = ctx.cfg.patching_arguments
    return _base_fingerprint(
        samplers=[s.model_dump() for s in ctx.cfg.sample_arguments.samples if s.sample],
        patch_level=patching.patch_level,
        slide=file_identity(ctx.slide_path),
        blockmap=file_identity(ctx.raw("_blockmap.h5")),
        label=ctx.label,
    )


def _sample_run(ctx: RowContext) -> StageRun:
    from .sampling import sample_patches

    scores, coords, patch_l0 = _read_blockmap(ctx.raw("_blockmap.h5"))
    infer = Ledger.load(ctx.ledger_path).record("infer") or {}
    pred = int(infer.get("result", {}).get("pred", 0))
    level = ctx.cfg.patching_arguments.patch_level
    written: list[Path] = []
    warnings: list[str] = []
    for spec in ctx.cfg.sample_arguments.samples:
        if not spec.sample:
            continue
        folder = (
            ctx.production_root / "sampled_patches" / f"label_{ctx.label}_pred_{pred}" / spec.name
        )
        paths, warning = sample_patches(
            ctx.slide(),
            coords,
            scores,
            folder=folder,
            slide_id=ctx.slide_id,
            patch_level=level,
            patch_size_level0=patch_l0,
            spec=spec,
        )
        written.extend(paths)
        if warning:
            warnings.append(f"{spec.name}: {warning}")
    return StageRun(written, {"n_patches": len(written), "warnings": warnings})


STAGE_TABLE: dict[str, Stage] = {
    "segment": Stage("segment", _segment_fingerprint, _segment_outputs, _segment_run),
    "infer": Stage("infer", _infer_fingerprint, _infer_outputs, _infer_run),
    "overlap": Stage(
        "overlap", _overlap_fingerprint, lambda ctx: [_overlap_path(ctx)], _overlap_run
    ),
    "heatmap": Stage("heatmap", _heatmap_fingerprint, _heatmap_outputs, _heatmap_run),
    "sample": Stage("sample", _sample_fingerprint, lambda ctx: [], _sample_run),
}


def stages_for(cfg: HeatmapConfig, requested: Sequence[str] = STAGES) -> tuple[str, ...]:
    """The stages a config runs: ``overlap`` only with ``heatmap_arguments.calc_heatmap``."""
    return tuple(
        name for name in requested if name != "overlap" or cfg.heatmap_arguments.calc_heatmap
    )


# --------------------------------------------------------------------------------------------
# Row processing
# --------------------------------------------------------------------------------------------


@dataclass
class RowOutcome:
    """Result of one row, returned by a worker to the driver."""

    slide_id: str
    status: str  # done | failed
    stage: str = ""
    error: str = ""
    ran: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for stages that ran
    reasons: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _one_line(err: BaseException, ctx: RowContext) -> str:
    if isinstance(err, ClamHeatError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err} (slide {ctx.slide_path}; unexpected, see the run log)"
    return " ".join(text.split())


#: Which earlier stages' outputs each stage reads (for --dry-run's "upstream reruns").
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "segment": (),
    "infer": ("segment",),  # only when it extracts features itself; harmless otherwise
    "overlap": ("segment", "infer"),
    "heatmap": ("segment", "infer", "overlap"),
    "sample": ("infer",),
}


def plan_row(ctx: RowContext, stages: Sequence[str] = STAGES) -> dict[str, Reason | None]:
    """Why each stage would run now (None = up to date); a stage whose inputs rerun also reruns."""
    ledger = Ledger.load(ctx.ledger_path)
    plan: dict[str, Reason | None] = {}
    for name in stages:
        stage = STAGE_TABLE[name]
        try:
            reason = ledger.reason(name, stage.fingerprint(ctx), stage.expected_outputs(ctx))
        except ClamHeatError as err:
            reason = Reason("changed", f"cannot fingerprint ({err})")
        if reason is None:
            rerun = [dep for dep in DEPENDS_ON.get(name, ()) if plan.get(dep) is not None]
            if name == "infer" and not ctx.cfg.runner_arguments.extract_features:
                rerun = []
            if rerun:
                reason = Reason("upstream", ", ".join(rerun))
        plan[name] = reason
    return plan


def process_row(ctx: RowContext, stages: Sequence[str] = STAGES) -> RowOutcome:
    """Run the stale stages of one row; never raises for a bad slide (returns a failed outcome)."""
    timer = Timer()
    outcome = RowOutcome(ctx.slide_id, "done")
    ledger = Ledger.load(ctx.ledger_path)
    try:
        for name in stages:
            stage = STAGE_TABLE[name]
            reason = ledger.reason(name, stage.fingerprint(ctx), stage.expected_outputs(ctx))
            if reason is not None:
                outcome.reasons[name] = str(reason)
                stage_timer = Timer()
                old_outputs = set((ledger.record(name) or {}).get("outputs", []))
                ledger.mark_started(name)
                run = stage.run(ctx)
                for stale in old_outputs - {str(p) for p in run.outputs}:
                    Path(stale).unlink(missing_ok=True)
                # fingerprint again: the stage may have created inputs of its own fingerprint
                ledger.mark_done(
                    name,
                    stage.fingerprint(ctx),
                    run.outputs,
                    seconds=stage_timer.seconds,
                    result=run.result,
                )
                outcome.ran[name] = stage_timer.seconds
                log.info(
                    "%s: %s done in %.2fs (%s)", ctx.slide_id, name, stage_timer.seconds, reason
                )
            rec = ledger.record(name) or {}
            outcome.stage = name
            outcome.warnings.extend(rec.get("result", {}).get("warnings", []))
        infer = ledger.record("infer")
        if infer:
            outcome.result = dict(infer.get("result", {}))
    except Exception as err:  # noqa: BLE001 - one bad slide must never stop the run
        outcome.status = "failed"
        outcome.error = _one_line(err, ctx)
        log.error("%s failed: %s\n%s", ctx.slide_id, outcome.error, traceback.format_exc())
    finally:
        ctx.close()
        outcome.seconds = timer.seconds
    return outcome


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """End-of-run numbers for the CLI summary."""

    counts: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    slowest: list[tuple[str, float]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    plans: dict[str, dict[str, str | None]] = field(default_factory=dict)
    process_list: Path | None = None
    results_csv: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _result_columns(outcome_result: dict[str, Any], n_classes: int) -> dict[str, Any]:
    """CLAM's results columns: bag_size then rank-ordered Pred_c/p_c, plus attention stats."""
    if not outcome_result:
        return {}
    cols: dict[str, Any] = {"bag_size": outcome_result["bag_size"]}
    names, probs = outcome_result["top_names"], outcome_result["top_probs"]
    for c in range(n_classes):
        cols[f"Pred_{c}"] = names[c]
        cols[f"p_{c}"] = round(float(probs[c]), 6)
    cols["attention_mean"] = round(outcome_result["attention_mean"], 6)
    cols["attention_std"] = round(outcome_result["attention_std"], 6)
    return cols


def _set_row(df: pd.DataFrame, slide_id: str, values: dict[str, Any]) -> pd.DataFrame:
    """The process list's own :func:`~clam_heat.process_list.update_row`, with integer result
    columns kept as nullable ints so a count is written as 59 (not 59.0) next to empty cells."""
    from .process_list import update_row

    for key, value in values.items():
        if key in df.columns and isinstance(value, int) and not isinstance(value, bool):
            df[key] = pd.to_numeric(df[key], errors="coerce").astype("Int64")
    return update_row(df, slide_id, **values)


def build_contexts(cfg: HeatmapConfig, df: pd.DataFrame) -> list[RowContext]:
    """Contexts for the rows with ``process == 1`` (process-list order)."""
    from .process_list import load_preset, row_params, slide_path_for_row

    defaults = load_preset(cfg.data_arguments.preset)
    names = cfg.data_arguments.label_names()
    contexts = []
    for record in df.to_dict("records"):
        try:
            process = int(float(record.get("process", 1)))
        except (TypeError, ValueError):
            process = 0
        if process != 1:
            continue
        slide_id = str(record["slide_id"])
        contexts.append(
            RowContext(
                cfg=cfg,
                slide_id=slide_id,
                row=record,
                slide_path=slide_path_for_row(record, cfg.data_arguments),
                label=grouping_for(record, names),
                row_params=row_params(record, defaults),
            )
        )
    return contexts


def _save_resolved_config(cfg: HeatmapConfig) -> Path:
    import yaml

    path = Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code / "config.yaml"
    text = yaml.safe_dump(cfg.to_yaml_dict(), default_flow_style=False, sort_keys=True)
    write_text_atomic(path, text)
    return path


def check_writable(path: Path) -> None:
    """Fail early, naming the folder, if an output root cannot be created or written."""
    from .errors import OutputError

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".clam_heat_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(
            f"{path}: output folder is not writable ({err.strerror or err}); "
            "fix its permissions or set exp_arguments.raw_save_dir/production_save_dir elsewhere"
        ) from None


def run_pipeline(
    cfg: HeatmapConfig,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
    stages: Sequence[str] = STAGES,
    executor: Any = None,
    on_row: Callable[[RowOutcome], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> RunSummary:
    """Run (or, with ``dry_run``, plan) every pending row; the library call behind ``run``.

    ``executor`` (see :mod:`clam_heat.executors`) runs rows elsewhere; None runs them here, or
    in ``runner_arguments.workers`` local processes when that is > 1. ``shard=(i, n)`` runs only
    shard i of n and records into ``<list>.shard-i-of-n.csv`` (``clam-heat merge`` folds it back).
    """
    from .executors import LocalExecutor

    if executor is None and cfg.runner_arguments.workers > 1:
        executor = LocalExecutor(cfg.runner_arguments.workers)
    args = (cfg, retry_failed, dry_run, stages, executor, on_row, on_start, shard)
    if dry_run or not isinstance(executor, LocalExecutor) or executor.pids:
        return _run_pipeline(*args)
    graceful = False
    try:
        # start the workers now: they load their libraries while this process builds the list
        executor.start()
        summary = _run_pipeline(*args)
        graceful = True
        return summary
    finally:
        executor.shutdown(graceful=graceful)


def _run_pipeline(
    cfg: HeatmapConfig,
    retry_failed: bool,
    dry_run: bool,
    stages: Sequence[str],
    executor: Any,
    on_row: Callable[[RowOutcome], None] | None,
    on_start: Callable[[int], None] | None,
    shard: tuple[int, int] | None,
) -> RunSummary:
    """:func:`run_pipeline` once the executor is settled."""
    from .executors import shard_frame, shard_path
    from .process_list import build_process_list, write_csv_atomic

    start = time.perf_counter()
    stages = stages_for(cfg, stages)
    summary = RunSummary()
    df, list_path = build_process_list(cfg, write=not dry_run)
    results_csv = cfg.results_csv_path
    if shard is not None:
        df = shard_frame(df, list_path, *shard)
        list_path = shard_path(list_path, *shard)
        results_csv = shard_path(results_csv, *shard)
    summary.process_list = list_path
    contexts = build_contexts(cfg, df)
    status = dict(zip(df["slide_id"].astype(str), df["status"].astype(str), strict=False))
    missing = (
        dict(zip(df["slide_id"].astype(str), df["missing"].astype(bool), strict=False))
        if "missing" in df.columns
        else {}
    )
    pending = []
    vanished: list[RowContext] = []
    for ctx in contexts:
        if status.get(ctx.slide_id) == "failed" and not retry_failed:
            summary.counts["failed"] = summary.counts.get("failed", 0) + 1
            continue
        if missing.get(ctx.slide_id):
            summary.counts["skipped"] = summary.counts.get("skipped", 0) + 1
            vanished.append(ctx)
            continue
        pending.append(ctx)

    if dry_run:
        for ctx in pending:
            plan = plan_row(ctx, stages)
            summary.plans[ctx.slide_id] = {k: (str(v) if v else None) for k, v in plan.items()}
            ctx.close()
        summary.seconds = time.perf_counter() - start
        return summary

    check_writable(Path(cfg.exp_arguments.raw_save_dir))
    check_writable(Path(cfg.exp_arguments.production_save_dir))
    exp = cfg.exp_arguments
    swept = 0
    if shard is None:  # array tasks share the output roots: never sweep a live shard's temp files
        swept = sweep_temp_files(
            Path(exp.raw_save_dir) / exp.save_exp_code,
            Path(exp.production_save_dir) / exp.save_exp_code,
        )
    # this run is the only writer of its list and results CSV (or of its own shard files)
    swept += sweep_temp_files_of(list_path, results_csv)
    if swept:
        log.info("removed %d temp files left by an interrupted run", swept)
    _save_resolved_config(cfg)
    summary.results_csv = results_csv
    n_classes = cfg.exp_arguments.n_classes

    if vanished:  # say why on the row; the next `list`/`run` picks it up once the file is back
        for ctx in vanished:
            df = _set_row(
                df,
                ctx.slide_id,
                {
                    "status": "skipped",
                    "error": f"slide file not found: {ctx.slide_path} "
                    "(restore it, or set process to 0 for this row)",
                    "updated_at": now_iso(),
                },
            )
        write_csv_atomic(df, list_path)

    if on_start:
        on_start(len(pending))

    def record(outcome: RowOutcome) -> None:
        nonlocal df
        values: dict[str, Any] = {
            "status": outcome.status,
            "stage": outcome.stage,
            "error": outcome.error,
            "updated_at": now_iso(),
        }
        values.update(_result_columns(outcome.result, n_classes))
        df = _set_row(df, outcome.slide_id, values)
        write_csv_atomic(df, list_path)
        processed = df[pd.to_numeric(df["process"], errors="coerce") == 1].reset_index(drop=True)
        write_csv_atomic(processed, results_csv)
        summary.counts[outcome.status] = summary.counts.get(outcome.status, 0) + 1
        for name, secs in outcome.ran.items():
            summary.stage_seconds[name] = summary.stage_seconds.get(name, 0.0) + secs
        summary.slowest.append((outcome.slide_id, outcome.seconds))
        if outcome.status == "failed":
            summary.failed.append((outcome.slide_id, outcome.error))
        if on_row:
            on_row(outcome)

    if executor is None:
        for ctx in pending:
            df = _set_row(df, ctx.slide_id, {"status": "running", "updated_at": now_iso()})
            write_csv_atomic(df, list_path)
            record(process_row(ctx, stages))
    else:
        for ctx in pending:
            df = _set_row(df, ctx.slide_id, {"status": "running", "updated_at": now_iso()})
        write_csv_atomic(df, list_path)
        for outcome in executor.map_rows(pending, stages):
            record(outcome)

    summary.slowest = sorted(summary.slowest, key=lambda item: -item[1])[:5]
    summary.seconds = time.perf_counter() - start
    return summary


def sweep_temp_files(*roots: Path) -> int:
    """Delete temp files left by a killed run (hidden names containing ``.tmp``).

    Called by the driver before any worker starts, so no live write can be affected.
    """
    import os

    removed = 0
    for root in roots:
        if not Path(root).is_dir():
            continue
        for folder, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(".") and ".tmp" in name:
                    Path(folder, name).unlink(missing_ok=True)
                    removed += 1
    return removed


def sweep_temp_files_of(*files: Path) -> int:
    """Delete the temp files a killed run left beside ``files`` (``.<name>.<random>.tmp``), and
    nothing else in their folders, which may hold other lists and their live writes."""
    removed = 0
    for target in files:
        folder = Path(target).parent
        if not folder.is_dir():
            continue
        for path in folder.glob(glob.escape(f".{Path(target).name}.") + "*"):
            if path.is_file() and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def clean_outputs(paths: Iterable[Path]) -> None:
    """Remove files/folders (used by tests and ``--force``)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
