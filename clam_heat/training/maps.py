"""Training-time attention maps: scores from any registered model, drawn from coordinates.

Coordinate frames: ``l0_*`` values are level-0 pixels (as stored in feature H5 files);
``vis_*`` values are canvas pixels, i.e. level-0 pixels divided by ``downsample`` and shifted so
that the top-left patch starts at (0, 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np

__all__ = [
    "DEFAULT_BACKGROUND",
    "MAX_CANVAS_PIXELS",
    "AttentionMapWarning",
    "GridFallbackWarning",
    "HeatmapSkippedWarning",
    "attention_scores",
    "grid_attention_map",
    "model_attention",
    "normalize_attention",
    "spatial_attention_map",
]

Normalisation = Literal["softmax", "rank", "minmax"]

#: Largest canvas (in pixels) :func:`spatial_attention_map` will allocate (4096 x 4096).
MAX_CANVAS_PIXELS = 4096 * 4096

#: Colour of canvas pixels no patch covers. Mid-grey is not on "hot", "jet" or "viridis".
DEFAULT_BACKGROUND = (128, 128, 128)


class AttentionMapWarning(UserWarning):
    """Base class: a training-time attention map was drawn differently than asked, or skipped."""


class GridFallbackWarning(AttentionMapWarning):
    """Coordinates were missing or did not match the scores, so patches were drawn in a grid."""


class HeatmapSkippedWarning(AttentionMapWarning):
    """Drawing or logging one heatmap failed; the image was skipped and training went on."""


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _as_float_array(value: Any) -> np.ndarray:
    """Tensor (any device/dtype, grad or not) or array-like -> float64 ndarray (a copy)."""
    if hasattr(value, "detach"):  # torch.Tensor without importing torch here
        value = value.detach().cpu().double().numpy()
    return np.array(value, dtype=np.float64)


def _is_forward_output(value: Any) -> bool:
    """True for CLAM's ``(logits, Y_prob, Y_hat, A_raw, results_dict)`` tuple."""
    return (
        isinstance(value, tuple)
        and len(value) == 5
        and hasattr(value[3], "shape")
        and len(value[3].shape) >= 1
    )


def _is_pair_output(value: Any) -> bool:
    """True for a registered model's ``(logits (C,), attention)`` forward output."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(hasattr(part, "shape") for part in value)
        and len(value[1].shape) >= 1
    )


def attention_scores(attention: Any, *, class_index: int | None = None) -> np.ndarray:
    """Raw per-patch attention of one bag as a (N,) float64 array, in bag (coords) order.

    Accepts CLAM_SB/CLAM_MB's forward output ``(logits, Y_prob, Y_hat, A_raw, results_dict)``
    (``A_raw`` (K, N) pre-softmax; for K > 1 the row of the predicted class ``Y_hat`` is used,
    as CLAM's heatmaps do), the ``(logits, attention)`` forward output of every other registered
    model (ABMIL, TransMIL, DSMIL, ILRA, RRT, Transformer: attention (N,) already reduced by the
    model; a (K, N) attention takes the row of ``argmax(logits)``), or a tensor/array of shape
    (N,), (1, N), (K, N) or (1, K, N). For a class other than the predicted one on models that
    reduce inside their forward (DSMIL), use :func:`model_attention`.
    ``class_index`` picks the row explicitly (e.g. the true label) and overrides ``Y_hat``; a
    plain (K, N) input with K > 1 needs it. Non-finite scores are rejected so that a diverged
    model gives a clear message rather than a black image.

    >>> attention_scores([[0.5, -1.0, 2.0]])
    array([ 0.5, -1. ,  2. ])
    >>> attention_scores([[0.0, 1.0], [5.0, 6.0]], class_index=1)
    array([5., 6.])
    """
    y_hat: int | None = None
    if _is_forward_output(attention):
        y_hat = int(_as_float_array(attention[2]).reshape(-1)[0])
        attention = attention[3]
    elif _is_pair_output(attention):
        y_hat = int(np.argmax(_as_float_array(attention[0]).reshape(-1)))
        attention = attention[1]
    arr = _as_float_array(attention)
    shape = arr.shape
    if arr.ndim == 3 and shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        if arr.shape[0] == 1:
            arr = arr[0]
        else:
            row = class_index if class_index is not None else y_hat
            if row is None:
                raise ValueError(
                    f"attention of shape {shape} has {arr.shape[0]} branches (K, N): pass "
                    "class_index, or the model's full forward output so Y_hat picks the branch"
                )
            if not 0 <= row < arr.shape[0]:
                raise ValueError(
                    f"class_index {row} is out of range for attention with {arr.shape[0]} branches"
                )
            arr = arr[row]
    if arr.ndim != 1:
        raise ValueError(
            f"attention must have shape (N,), (1, N), (K, N) or (1, K, N); got {shape}"
        )
    if arr.size == 0:
        raise ValueError("attention is empty (a bag with no patches has no heatmap)")
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"attention has {bad} non-finite score(s) of {arr.size} (NaN or inf)")
    return arr


def normalize_attention(scores: np.ndarray, method: Normalisation = "softmax") -> np.ndarray:
    """Map raw scores (N,) to display values (N,) float64 in [0, 1].

    - ``"softmax"`` (default): softmax over the bag's patches, then min-max. These are the
      weights attention pooling applies, so concentration (a sharpening map) stays visible.
    - ``"rank"``: (average rank - 1) / (N - 1); uniform spread, hides how peaked attention is.
    - ``"minmax"``: min-max of the raw (pre-softmax) scores.

    A constant bag (including N = 1) has no contrast and maps to 0.5 everywhere.

    >>> np.round(normalize_attention(np.array([0.0, np.log(2.0), np.log(3.0)])), 6)
    array([0. , 0.5, 1. ])
    >>> normalize_attention(np.array([3.0, 1.0, 2.0, 2.0]), "rank")
    array([1. , 0. , 0.5, 0.5])
    >>> normalize_attention(np.array([0.0, 1.0, 4.0]), "minmax")
    array([0.  , 0.25, 1.  ])
    >>> normalize_attention(np.array([7.0, 7.0]))
    array([0.5, 0.5])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if method == "rank":
        from scipy.stats import rankdata

        n = scores.size
        if n < 2 or np.ptp(scores) == 0:
            return np.full(n, 0.5)
        return (rankdata(scores, method="average") - 1.0) / (n - 1.0)
    if method == "softmax":
        values = np.exp(scores - scores.max())  # softmax up to its sum; min-max removes the sum
    elif method == "minmax":
        values = scores
    else:
        raise ValueError(f"normalize must be 'softmax', 'rank' or 'minmax', got {method!r}")
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.full(values.shape, 0.5)
    return (values - low) / (high - low)


def model_attention(
    model: Any, features: Any, *, class_index: int | None = None, method: str = "attention"
) -> np.ndarray:
    """Per-patch attention (N,) float64 of a registered model on one whole bag, through the
    model's own reduction (:mod:`clam_heat.models.inference`), in eval mode and without grad.

    ``features`` (N, D) tensor or array. ``class_index`` None: the predicted class's map (as
    :func:`~clam_heat.models.run_attention` gives it); else that class's map for models with one
    map per class (CLAM_MB, DSMIL), ignored by single-map models. The model's training mode is
    restored afterwards. ``method``: another attribution method of :mod:`clam_heat.explain`
    (``contribution``, ``integrated_gradients`` ...), for the class ``class_index`` or the
    predicted one (signed scores).
    """
    from ..models.inference import attention_logits, run_attention

    bag = _as_float_array(features).astype(np.float32)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        if method != "attention":
            from ..explain import explain_bag

            targets = None if class_index is None else [class_index]
            (found,) = explain_bag(model, bag, [method], targets=targets).values()
            scores = found.scores
        elif class_index is None:
            scores = run_attention(model, bag).attention
        else:
            scores = attention_logits(model, bag, branch=class_index)
    finally:
        model.train(was_training)
    return scores.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _colourise(
    values: np.ndarray, cmap: str, background: tuple[int, int, int] | None
) -> np.ndarray:
    """(H, W) float in [0, 1], NaN = no patch -> (H, W, 3) uint8 RGB, or (H, W, 4) RGBA.

    Colours follow the production heatmaps' rule (:func:`clam_heat.heatmap.apply_colormap`:
    CLAM's ``uint8(cmap(v) * 255)``). With ``background=None`` uncovered pixels are transparent
    (alpha 0) instead of coloured.

    >>> _colourise(np.array([[0.0, np.nan, 1.0]]), "gray", (9, 9, 9))[0].tolist()
    [[0, 0, 0], [9, 9, 9], [255, 255, 255]]
    """
    from ..heatmap import apply_colormap, colormap_lut

    try:
        lut = colormap_lut(cmap)
    except ValueError:
        raise ValueError(
            f"unknown colormap {cmap!r} (use a matplotlib name such as 'hot', 'jet', 'viridis')"
        ) from None
    covered = np.isfinite(values)
    rgb = apply_colormap(np.clip(np.where(covered, values, 0.0), 0.0, 1.0), lut)
    if background is None:
        alpha = np.where(covered, 255, 0).astype(np.uint8)[..., None]
        return np.concatenate([rgb, alpha], axis=-1)
    rgb[~covered] = np.asarray(background, dtype=np.uint8)
    return rgb


def _render_with_colorbar(
    image: np.ndarray,
    *,
    cmap: str,
    label: str,
    vis_extent: tuple[float, float, float, float] | None,
    axis_label: str,
) -> np.ndarray:
    """Draw ``image`` with axes and a colour bar on an Agg canvas -> (H', W', 3) uint8 RGB.

    Uses ``Figure`` + ``FigureCanvasAgg`` directly (no pyplot, so no global figure registry to
    leak) and clears the figure before returning. Small maps are enlarged (nearest neighbour) so
    that the longer side is at least 320 px; large ones are shown at up to 1024 px.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    vis_h, vis_w = image.shape[:2]
    longest = max(vis_h, vis_w)
    scale = min(max(longest, 320), 1024) / longest
    map_w, map_h = vis_w * scale, vis_h * scale
    left, bottom, gap, bar, right, top = 70.0, 50.0, 12.0, 16.0, 60.0, 20.0
    fig_w, fig_h = left + map_w + gap + bar + right, bottom + map_h + top
    dpi = 100.0
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    try:
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_axes((left / fig_w, bottom / fig_h, map_w / fig_w, map_h / fig_h))
        bar_left = (left + map_w + gap) / fig_w
        cax = fig.add_axes((bar_left, bottom / fig_h, bar / fig_w, map_h / fig_h))
        ax.imshow(image, extent=vis_extent, interpolation="nearest", aspect="auto")
        ax.set_xlabel(axis_label, fontsize=8)
        ax.tick_params(labelsize=7)
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        colorbar = fig.colorbar(mappable, cax=cax)
        colorbar.set_label(label, fontsize=8)
        colorbar.ax.tick_params(labelsize=7)
        canvas.draw()
        rgb = np.array(np.asarray(canvas.buffer_rgba())[..., :3])
    finally:
        fig.clear()
    return rgb


def spatial_attention_map(
    attention: Any,
    coords: Any,
    patch_size: float = 256,
    downsample: float = 32,
    *,
    class_index: int | None = None,
    cmap: str = "hot",
    normalize: Normalisation = "softmax",
    colorbar: bool = False,
    background: tuple[int, int, int] | None = DEFAULT_BACKGROUND,
    max_pixels: int = MAX_CANVAS_PIXELS,
    smooth: bool = False,
) -> np.ndarray:
    """Paint each patch's attention at its level-0 position on a small canvas.

    ``smooth``: interpolate bilinearly between patch centres (within the covered area) instead
    of flat squares; uncovered pixels stay background.

    ``attention``: anything :func:`attention_scores` accepts (N scores after branch choice).
    ``coords``: (N, 2) level-0 top-left (x, y) of each patch, row i belonging to score i.
    ``patch_size``: patch side in level-0 pixels (TRIDENT's ``patch_size_level0``).

    Geometry, overlap averaging and colours are the production heatmaps' own
    (:mod:`clam_heat.heatmap`): with coordinates taken relative to their top-left minimum,
    patch i covers canvas pixels from ``ceil(l0 / downsample)`` over
    ``ceil(patch_size / downsample)`` pixels (CLAM's ``vis_geometry``); the canvas ends at the
    last patch's far edge; where patches overlap their normalised scores are averaged exactly
    (``accumulate_patches``); colours are ``apply_colormap``'s. Pixels no patch covers get
    ``background`` (``None``: transparent, RGBA output).

    Returns (H, W, 3) uint8 RGB (H, W = canvas size), or with ``colorbar=True`` a larger
    rendered figure (RGB) with a colour bar and axes labelled in downsampled level-0 units
    (level-0 px / ``downsample``, absolute, so they match the slide's own frame).

    >>> img = spatial_attention_map([0.0, 1.0], [[0, 0], [512, 0]], patch_size=256,
    ...                             downsample=128)
    >>> img.shape
    (2, 6, 3)
    >>> img[0, :, 0]  # red channel: low score dark, gap grey, high score white
    array([ 10,  10, 128, 128, 255, 255], dtype=uint8)
    """
    scores = attention_scores(attention, class_index=class_index)
    l0_xy = _as_float_array(coords)
    if l0_xy.ndim != 2 or l0_xy.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2) level-0 (x, y); got {l0_xy.shape}")
    if l0_xy.shape[0] != scores.size:
        raise ValueError(
            f"coords has {l0_xy.shape[0]} rows but attention has {scores.size} scores "
            "(use grid_attention_map, or AttentionHeatmapLogger, which falls back to it)"
        )
    if not np.isfinite(l0_xy).all():
        raise ValueError("coords contain NaN or inf")
    if not (math.isfinite(patch_size) and patch_size > 0):
        raise ValueError(f"patch_size must be a positive level-0 size, got {patch_size}")
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be > 0, got {downsample}")

    from ..heatmap import accumulate_patches, vis_geometry

    l0_origin = l0_xy.min(axis=0)
    l0_rel = np.rint(l0_xy - l0_origin).astype(np.int64)
    _, vis_xy, vis_ps, _ = vis_geometry(l0_rel, patch_size, (downsample, downsample), None, (1, 1))
    vis_w, vis_h = (max(1, int(v)) for v in (vis_xy + vis_ps).max(axis=0))
    if vis_w * vis_h > max_pixels:
        needed = math.ceil(downsample * math.sqrt(vis_w * vis_h / max_pixels))
        raise ValueError(
            f"canvas would be {vis_w}x{vis_h} px at downsample={downsample} "
            f"(limit {max_pixels} px); use downsample >= {needed}"
        )
    overlay, counter = accumulate_patches(
        vis_xy, vis_ps, normalize_attention(scores, normalize), (vis_h, vis_w)
    )
    values = np.where(counter > 0, overlay, np.nan)
    if smooth:
        values = _bilinear(values, int(np.median(vis_ps)))
    image = _colourise(values, cmap, background)
    if not colorbar:
        return image
    vis_x, vis_y = l0_origin / downsample
    return _render_with_colorbar(
        image,
        cmap=cmap,
        label=f"attention ({normalize})",
        vis_extent=(vis_x, vis_x + vis_w, vis_y + vis_h, vis_y),
        axis_label=f"level-0 px / {downsample:g}",
    )


def _bilinear(values: np.ndarray, cell: int) -> np.ndarray:
    """``values`` (NaN: uncovered) averaged over ``cell``-pixel patch cells, then interpolated
    bilinearly back to full size; the NaN mask is kept.

    >>> _bilinear(np.array([[0.0, 0.0, 1.0, 1.0]]), 2).round(3).tolist()
    [[0.0, 0.25, 0.75, 1.0]]
    """
    import cv2

    covered = np.isfinite(values)
    h, w = values.shape
    small = (max(1, round(w / max(cell, 1))), max(1, round(h / max(cell, 1))))
    total = cv2.resize(np.where(covered, values, 0.0), small, interpolation=cv2.INTER_AREA)
    weight = cv2.resize(covered.astype(np.float64), small, interpolation=cv2.INTER_AREA)
    up_total = cv2.resize(total, (w, h), interpolation=cv2.INTER_LINEAR)
    up_weight = cv2.resize(weight, (w, h), interpolation=cv2.INTER_LINEAR)
    smooth = np.divide(up_total, up_weight, out=np.zeros_like(up_total), where=up_weight > 0)
    return np.where(covered, np.clip(smooth, 0.0, 1.0), np.nan)


def _fallback_message(n_scores: int, coords: Any) -> str | None:
    """Why the grid is drawn instead of the spatial map, or None if coords fit the scores."""
    if coords is None:
        return (
            f"coords missing: {n_scores} attention scores, 0 coordinates; drawing patches in a "
            "square grid in bag order, not at slide positions (pass coords, or slide_id with "
            "features_dir)"
        )
    n_coords = int(np.shape(coords)[0]) if np.ndim(coords) >= 1 else 0
    if n_coords != n_scores:
        return (
            f"coords count mismatch: {n_scores} attention scores, {n_coords} coordinates; drawing "
            "patches in a square grid in bag order, not at slide positions (coords must come "
            "from the same H5 as the bag's features)"
        )
    return None


def _render_grid(
    scores: np.ndarray,
    *,
    cmap: str,
    normalize: Normalisation,
    cell_size: int | None,
    colorbar: bool,
    background: tuple[int, int, int] | None,
) -> np.ndarray:
    """Scores (N,) -> grid image; see :func:`grid_attention_map`."""
    n = scores.size
    side = math.ceil(math.sqrt(n))
    rows = math.ceil(n / side)
    cell = cell_size if cell_size is not None else min(16, max(1, 256 // side))
    if cell < 1:
        raise ValueError(f"cell_size must be >= 1, got {cell_size}")
    grid = np.full(rows * side, np.nan)
    grid[:n] = normalize_attention(scores, normalize)
    grid = np.repeat(np.repeat(grid.reshape(rows, side), cell, axis=0), cell, axis=1)
    image = _colourise(grid, cmap, background)
    if not colorbar:
        return image
    return _render_with_colorbar(
        image,
        cmap=cmap,
        label=f"attention ({normalize})",
        vis_extent=(0.0, float(side), float(rows), 0.0),
        axis_label="grid cell (bag order, row-major)",
    )


def grid_attention_map(
    attention: Any,
    coords: Any = None,
    *,
    class_index: int | None = None,
    cmap: str = "hot",
    normalize: Normalisation = "softmax",
    cell_size: int | None = None,
    colorbar: bool = False,
    background: tuple[int, int, int] | None = DEFAULT_BACKGROUND,
) -> np.ndarray:
    """Fallback map: patches in bag order, row-major, in a ``ceil(sqrt(N))``-wide square grid.

    ``coords`` is only used to say why the grid is drawn: ``None`` (coords missing) or a count
    different from the scores' (mismatch) emits one :class:`GridFallbackWarning` naming the
    case and both counts; coords that match mean the grid was asked for, so no warning.
    Each patch is a ``cell_size`` square (default: 256 // side, clipped to 1..16 px); unused
    cells of the last row get ``background``. Returns (rows * cell, side * cell, 3) uint8 RGB,
    or a rendered figure with ``colorbar=True``.

    >>> grid_attention_map(np.arange(5.0), np.zeros((5, 2)), cell_size=1).shape
    (2, 3, 3)
    """
    scores = attention_scores(attention, class_index=class_index)
    message = _fallback_message(scores.size, coords)
    if message is not None:
        warnings.warn(message, GridFallbackWarning, stacklevel=2)
    return _render_grid(
        scores,
        cmap=cmap,
        normalize=normalize,
        cell_size=cell_size,
        colorbar=colorbar,
        background=background,
    )
