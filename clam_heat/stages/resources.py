"""What several stages share, cached once per process: the model, the patch encoder, CLAM's
patch grid and the H5 score files.

A worker process keeps one model and one encoder (keyed by their identity), so a pool loads them
once, not once per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import HeatmapConfig
from ..ledger import file_identity
from ..rows import RowContext, segmentation_geojson_path

__all__ = [
    "encode_kwargs",
    "encoder_fingerprint",
    "encoder_for",
    "grid",
    "model_for",
    "patch_geometry",
]


def encoder_fingerprint(cfg: HeatmapConfig) -> dict[str, Any]:
    from ..encoders import find_encoder_weights

    enc = cfg.encoder_arguments
    weights = find_encoder_weights(enc.model_name, cfg.runner_arguments.encoder_weights)
    return {
        "model_name": enc.model_name,
        "target_img_size": enc.target_img_size,
        "weights": file_identity(weights) if weights is not None else None,
        "patching": cfg.block("patching_arguments") | {"overlap": None},
        "use_center_shift": cfg.heatmap_arguments.use_center_shift,
    }


_ENCODER_CACHE: dict[tuple, Any] = {}


def encoder_for(cfg: HeatmapConfig) -> Any:
    """Build the configured patch encoder once per process."""
    from ..encoders import build_encoder
    from ..models import resolve_device

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


def patch_geometry(ctx: RowContext, overlap: float) -> tuple[int, int]:
    """Level-0 (patch side, step) of CLAM's grid: patch_size at patch_level x custom_downsample."""
    patching = ctx.cfg.patching_arguments
    slide = ctx.slide()
    slide.check_level(patching.patch_level)
    downsample = int(slide.level_downsamples[patching.patch_level][0])
    side = int(patching.patch_size * downsample * patching.custom_downsample)
    step = int(patching.patch_size * (1 - overlap)) * downsample * patching.custom_downsample
    return side, max(1, int(step))


def grid(
    ctx: RowContext, overlap: float, roi: tuple[int, int, int, int] | None
) -> tuple[np.ndarray, int]:
    """In-tissue grid (CLAM's heatmap dataset: four_pt_hard, centre shift by overlap)."""
    from ..errors import SegmentationError
    from ..tissue import center_shift_for_overlap, grid_coords, load_geojson

    side, step = patch_geometry(ctx, overlap)
    tissue = load_geojson(segmentation_geojson_path(ctx))
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


def encode_kwargs(cfg: HeatmapConfig) -> dict[str, Any]:
    patching = cfg.patching_arguments
    return {
        "encoder": encoder_for(cfg),
        "patch_level": patching.patch_level,
        "patch_size": patching.patch_size,
        "custom_downsample": patching.custom_downsample,
        "batch_size": cfg.exp_arguments.batch_size,
        "num_workers": cfg.runner_arguments.loader_workers,
        "amp": cfg.runner_arguments.amp,
    }


_MODEL_CACHE: dict[tuple, Any] = {}


def model_for(cfg: HeatmapConfig) -> tuple[Any, Any]:
    """Load the model once per process (keyed by checkpoint identity and architecture)."""
    from ..models import load_model, resolve_device

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
