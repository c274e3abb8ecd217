"""Training-time attention heatmaps for TensorBoard, drawn from coordinates alone (no slide file).

During validation any registered attention model (CLAM, ABMIL, TransMIL, DSMIL, ILRA, RRT,
Transformer, or one added with :func:`clam_heat.models.register_model`) gives one attention score
per patch through its own reduction. This package paints
those scores at the patches' level-0 positions on a small canvas (:func:`spatial_attention_map`),
or in a square grid when no usable coordinates exist (:func:`grid_attention_map`), and
:class:`AttentionHeatmapLogger` sends one such image per epoch to a TensorBoard
``SummaryWriter`` and/or an experiment tracker (``tracker=``, MLflow or W&B, see
:mod:`clam_heat.trackers`). The logger is built so that it can never stop a training run: any
failure becomes one :class:`HeatmapSkippedWarning` and a skipped image.

Coordinate frames: ``l0_*`` values are level-0 pixels (as stored in feature H5 files);
``vis_*`` values are canvas pixels, i.e. level-0 pixels divided by ``downsample`` and shifted so
that the top-left patch starts at (0, 0).

Scores are normalised to [0, 1] for display (see :func:`normalize_attention`); the default,
``"softmax"``, is softmax over the bag's patches followed by min-max scaling, which shows the
weights the attention pooling actually applies, so a map that sharpens over epochs looks sharper.

TensorBoard is an optional extra: nothing here imports it until :func:`open_summary_writer` is
called, and the logger only needs an object with ``add_image``.
"""

from __future__ import annotations

from .logger import (
    AttentionHeatmapLogger,
    CoordsLoader,
    ImageWriter,
    log_validation_attention,
    open_summary_writer,
)
from .maps import (
    DEFAULT_BACKGROUND,
    MAX_CANVAS_PIXELS,
    AttentionMapWarning,
    GridFallbackWarning,
    HeatmapSkippedWarning,
    Normalisation,
    attention_scores,
    grid_attention_map,
    model_attention,
    normalize_attention,
    spatial_attention_map,
)

__all__ = [
    "DEFAULT_BACKGROUND",
    "MAX_CANVAS_PIXELS",
    "AttentionHeatmapLogger",
    "AttentionMapWarning",
    "CoordsLoader",
    "GridFallbackWarning",
    "HeatmapSkippedWarning",
    "ImageWriter",
    "Normalisation",
    "attention_scores",
    "grid_attention_map",
    "log_validation_attention",
    "model_attention",
    "normalize_attention",
    "open_summary_writer",
    "spatial_attention_map",
]
