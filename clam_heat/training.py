"""Training-time attention heatmaps for TensorBoard, drawn from coordinates alone (no slide file).

During validation a CLAM-style model returns one attention score per patch. This module paints
those scores at the patches' level-0 positions on a small canvas (:func:`spatial_attention_map`),
or in a square grid when no usable coordinates exist (:func:`grid_attention_map`), and
:class:`AttentionHeatmapLogger` sends one such image per epoch to a TensorBoard
``SummaryWriter``. The logger is built so that it can never stop a training run: any failure
becomes one :class:`HeatmapSkippedWarning` and a skipped image.

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

import functools
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from .errors import FeatureError

__all__ = [
    "AttentionHeatmapLogger",
    "AttentionMapWarning",
    "GridFallbackWarning",
    "HeatmapSkippedWarning",
    "MAX_CANVAS_PIXELS",
    "attention_scores",
    "grid_attention_map",
    "normalize_attention",
    "open_summary_writer",
    "spatial_attention_map",
]

Normalisation = Literal["softmax", "rank", "minmax"]

#: Largest canvas (in pixels) :func:`spatial_attention_map` will allocate (4096 x 4096).
MAX_CANVAS_PIXELS = 4096 * 4096

#: Colour of canvas pixels no patch covers. Mid-grey is not on "hot", "jet" or "viridis".
DEFAULT_BACKGROUND = (128, 128, 128)

_TENSORBOARD_HINT = (
    "tensorboard is not installed, so training heatmaps cannot be written "
    "(pip install 'clam-heat[tensorboard]' or pip install tensorboard)"
)


class AttentionMapWarning(UserWarning):
    """Base class: a training-time attention map was drawn differently than asked, or skipped."""


class GridFallbackWarning(AttentionMapWarning):
    """Coordinates were missing or did not match the scores, so patches were drawn in a grid."""


class HeatmapSkippedWarning(AttentionMapWarning):
    """Drawing or logging one heatmap failed; the image was skipped and training went on."""


class ImageWriter(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` the logger uses."""

    def add_image(
        self, tag: str, img_tensor: Any, global_step: int | None = ..., *args: Any, **kwargs: Any
    ) -> Any: ...


#: ``coords_loader(slide_id)`` returns (N, 2) level-0 coords, ``(coords, patch_size_level0)``
#: or ``None`` (no coords for that slide: the grid fallback is drawn).
CoordsLoader = Callable[[str], Any]


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


def attention_scores(attention: Any, *, class_index: int | None = None) -> np.ndarray:
    """Raw per-patch attention of one bag as a (N,) float64 array, in bag (coords) order.

    Accepts CLAM_SB/CLAM_MB's forward output ``(logits, Y_prob, Y_hat, A_raw, results_dict)``
    (``A_raw`` (K, N) pre-softmax; for K > 1 the row of the predicted class ``Y_hat`` is used,
    as CLAM's heatmaps do), or a tensor/array of shape (N,), (1, N), (K, N) or (1, K, N).
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


# --------------------------------------------------------------------------------------------
# Pure drawing helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _colour_lut(cmap: str) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table of a matplotlib colormap (read-only, cached)."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(
            f"unknown colormap {cmap!r} (use a matplotlib name such as 'hot', 'jet', 'viridis')"
        ) from None
    lut = np.rint(colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _colourise(
    values: np.ndarray, cmap: str, background: tuple[int, int, int] | None
) -> np.ndarray:
    """(H, W) float in [0, 1], NaN = no patch -> (H, W, 3) uint8 RGB, or (H, W, 4) RGBA.

    With ``background=None`` uncovered pixels are transparent (alpha 0) instead of coloured.

    >>> _colourise(np.array([[0.0, np.nan, 1.0]]), "gray", (9, 9, 9))[0].tolist()
    [[0, 0, 0], [9, 9, 9], [255, 255, 255]]
    """
    covered = np.isfinite(values)
    index = np.rint(np.clip(np.where(covered, values, 0.0), 0.0, 1.0) * 255.0).astype(np.intp)
    rgb = _colour_lut(cmap)[index]
    if background is None:
        alpha = np.where(covered, 255, 0).astype(np.uint8)[..., None]
        return np.concatenate([rgb, alpha], axis=-1)
    rgb[~covered] = np.asarray(background, dtype=np.uint8)
    return rgb


def _overlap_average(
    values: np.ndarray,
    vis_x0: np.ndarray,
    vis_y0: np.ndarray,
    vis_x1: np.ndarray,
    vis_y1: np.ndarray,
    vis_shape: tuple[int, int],
) -> np.ndarray:
    """Average of the boxes covering each pixel, NaN where none does: (H, W) float64.

    Boxes are half-open ``[vis_x0, vis_x1) x [vis_y0, vis_y1)`` in canvas pixels, one per value.
    Sums and counts are built with 2-D difference arrays (four corner updates per box, then two
    cumulative sums), so the cost is O(N + H*W) with no per-patch Python loop.

    >>> _overlap_average(np.array([1.0, 3.0]), np.array([0, 1]), np.array([0, 0]),
    ...                  np.array([2, 3]), np.array([1, 1]), (2, 4))
    array([[ 1.,  2.,  3., nan],
           [nan, nan, nan, nan]])
    """
    height, width = vis_shape
    flat_size = (height + 1) * (width + 1)
    rows = np.concatenate([vis_y0, vis_y0, vis_y1, vis_y1])
    cols = np.concatenate([vis_x0, vis_x1, vis_x0, vis_x1])
    flat = rows * (width + 1) + cols
    sign = np.repeat(np.array([1.0, -1.0, -1.0, 1.0]), len(values))
    weights = sign * np.tile(values, 4)

    def integrate(w: np.ndarray) -> np.ndarray:
        diff = np.bincount(flat, weights=w, minlength=flat_size).reshape(height + 1, width + 1)
        return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]

    total = integrate(weights)
    count = np.rint(integrate(sign))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


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


# --------------------------------------------------------------------------------------------
# Public maps
# --------------------------------------------------------------------------------------------


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
) -> np.ndarray:
    """Paint each patch's attention at its level-0 position on a small canvas.

    ``attention``: anything :func:`attention_scores` accepts (N scores after branch choice).
    ``coords``: (N, 2) level-0 top-left (x, y) of each patch, row i belonging to score i.
    ``patch_size``: patch side in level-0 pixels (TRIDENT's ``patch_size_level0``).

    The canvas spans the coordinates' extent, ``[min, max + patch_size)`` per axis, divided by
    ``downsample`` (rounded up). Patch i covers canvas pixels ``floor(l0 / downsample)`` up to
    ``ceil((l0 + patch_size) / downsample)`` (at least one pixel); where patches overlap their
    normalised scores are averaged (sum / count); pixels no patch covers get ``background``
    (``None``: transparent, RGBA output).

    Returns (H, W, 3) uint8 RGB (H, W = canvas size), or with ``colorbar=True`` a larger
    rendered figure (RGB) with a colour bar and axes labelled in downsampled level-0 units
    (level-0 px / ``downsample``, absolute, so they match the slide's own frame).

    >>> img = spatial_attention_map([0.0, 1.0], [[0, 0], [512, 0]], patch_size=256,
    ...                             downsample=128)
    >>> img.shape
    (2, 6, 3)
    >>> img[0, :, 0]  # red channel: low score dark, gap grey, high score white
    array([ 11,  11, 128, 128, 255, 255], dtype=uint8)
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

    l0_origin = l0_xy.min(axis=0)
    l0_extent = l0_xy.max(axis=0) + patch_size - l0_origin
    vis_w, vis_h = (max(1, math.ceil(v / downsample - 1e-9)) for v in l0_extent)
    if vis_w * vis_h > max_pixels:
        needed = math.ceil(downsample * math.sqrt(vis_w * vis_h / max_pixels))
        raise ValueError(
            f"canvas would be {vis_w}x{vis_h} px at downsample={downsample} "
            f"(limit {max_pixels} px); use downsample >= {needed}"
        )
    vis_start = np.floor((l0_xy - l0_origin) / downsample + 1e-9).astype(np.int64)
    vis_end = np.ceil((l0_xy - l0_origin + patch_size) / downsample - 1e-9).astype(np.int64)
    vis_end = np.maximum(vis_end, vis_start + 1)
    vis_end = np.minimum(vis_end, np.array([vis_w, vis_h]))
    values = _overlap_average(
        normalize_attention(scores, normalize),
        vis_start[:, 0],
        vis_start[:, 1],
        vis_end[:, 0],
        vis_end[:, 1],
        (vis_h, vis_w),
    )
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


# --------------------------------------------------------------------------------------------
# I/O edges: coords from H5, TensorBoard writer
# --------------------------------------------------------------------------------------------


def _read_coords_h5(features_dir: Path, slide_id: str) -> tuple[np.ndarray | None, float | None]:
    """Level-0 coords (N, 2) int64 and ``patch_size_level0`` (or None) of one slide's H5.

    Looks for ``<features_dir>/<slide_id>.h5`` (TRIDENT ``features_<enc>/``, CLAM patches) then
    ``<features_dir>/h5_files/<slide_id>.h5`` (CLAM features). A file without a ``coords``
    dataset gives ``(None, None)``, i.e. "coords missing". Minimal on purpose: the features
    module owns full H5 reading.
    """
    import h5py

    candidates = [features_dir / f"{slide_id}.h5", features_dir / "h5_files" / f"{slide_id}.h5"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FeatureError(
            f"{candidates[0]}: no feature H5 for slide {slide_id!r} (nor h5_files/{slide_id}.h5); "
            "point features_dir at the folder holding <slide_id>.h5"
        )
    with h5py.File(path, "r") as handle:
        if "coords" not in handle:
            return None, None
        dataset = handle["coords"]
        l0_xy = np.asarray(dataset[()])
        size = dataset.attrs.get("patch_size_level0")
    if l0_xy.ndim != 2 or l0_xy.shape[1] != 2:
        raise FeatureError(f"{path}: dataset 'coords' must be (N, 2), got {l0_xy.shape}")
    patch_size_l0: float | None = None
    if size is not None:
        try:
            value = float(np.asarray(size).reshape(-1)[0])
        except (TypeError, ValueError):
            value = float("nan")
        patch_size_l0 = value if math.isfinite(value) and value > 0 else None
    return np.rint(l0_xy).astype(np.int64), patch_size_l0


def open_summary_writer(logdir: str | Path, **kwargs: Any) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``logdir``, imported only now.

    Raises ImportError with an install hint when tensorboard is missing (it is the optional
    ``clam-heat[tensorboard]`` extra).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(_TENSORBOARD_HINT) from err
    return SummaryWriter(log_dir=str(logdir), **kwargs)


# --------------------------------------------------------------------------------------------
# Logger
# --------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


class AttentionHeatmapLogger:
    """Log one attention heatmap per validation epoch to TensorBoard, never raising.

    ``writer`` is a ``SummaryWriter`` (or anything with ``add_image``). Call :meth:`log` for
    each validation slide; only the first call of each logged epoch draws an image (tag
    ``<tag_prefix>/spatial_attention_heatmap``, or ``<tag_prefix>/grid_attention_heatmap`` when
    coords are missing or do not match), and only on epochs divisible by ``every_n_epochs``.

    Coords come from :meth:`log`'s ``coords``, else from ``coords_loader(slide_id)``, else from
    ``<features_dir>/<slide_id>.h5`` (or ``h5_files/``; TRIDENT or CLAM layout; patch size from
    ``coords.attrs['patch_size_level0']`` when present, else ``patch_size``).

    Any exception while loading, drawing or writing becomes one :class:`HeatmapSkippedWarning`
    and the image is skipped (KeyboardInterrupt and SystemExit still propagate).
    """

    def __init__(
        self,
        writer: ImageWriter,
        every_n_epochs: int = 1,
        tag_prefix: str = "val",
        *,
        features_dir: str | Path | None = None,
        coords_loader: CoordsLoader | None = None,
        patch_size: float = 256,
        downsample: float = 32,
        cmap: str = "hot",
        normalize: Normalisation = "softmax",
        colorbar: bool = False,
        background: tuple[int, int, int] | None = DEFAULT_BACKGROUND,
    ) -> None:
        if not callable(getattr(writer, "add_image", None)):
            raise TypeError(
                f"writer must have add_image (a torch.utils.tensorboard.SummaryWriter), "
                f"got {type(writer).__name__}"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise TypeError(f"every_n_epochs must be an int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.writer = writer
        self.every_n_epochs = every_n_epochs
        self.tag_prefix = tag_prefix.strip("/")
        self.features_dir = Path(features_dir) if features_dir is not None else None
        self.coords_loader = coords_loader
        self.patch_size = patch_size
        self.downsample = downsample
        self.cmap = cmap
        self.normalize: Normalisation = normalize
        self.colorbar = colorbar
        self.background = background
        self._last_step: int | None = None

    @classmethod
    def from_logdir(cls, logdir: str | Path, **kwargs: Any) -> AttentionHeatmapLogger:
        """Open a ``SummaryWriter`` on ``logdir`` (tensorboard imported lazily) and wrap it."""
        return cls(open_summary_writer(logdir), **kwargs)

    def _tag(self, name: str) -> str:
        return f"{self.tag_prefix}/{name}" if self.tag_prefix else name

    def should_log(self, step: int) -> bool:
        """Whether :meth:`log` would draw for ``step`` (lets a loop skip collecting attention)."""
        return step % self.every_n_epochs == 0 and step != self._last_step

    def _load_coords(self, slide_id: str) -> tuple[Any, float | None]:
        if self.coords_loader is not None:
            loaded = self.coords_loader(slide_id)
            if isinstance(loaded, tuple):
                coords, size = loaded
                return coords, (float(size) if size is not None else None)
            return loaded, None
        if self.features_dir is not None:
            return _read_coords_h5(self.features_dir, slide_id)
        return None, None

    def log(
        self,
        attention: Any,
        coords: Any = None,
        *,
        step: int,
        slide_id: str | None = None,
        class_index: int | None = None,
        patch_size: float | None = None,
    ) -> str | None:
        """Draw and write this epoch's heatmap if due; return the tag written, else None.

        ``attention``: CLAM forward output or scores (see :func:`attention_scores`).
        ``coords``: (N, 2) level-0 (x, y), or None to load them by ``slide_id``.
        ``patch_size``: level-0 patch side for these coords (overrides H5 attrs and default).
        """
        try:
            if not self.should_log(step):
                return None
            self._last_step = step  # one attempt per epoch: a failure is not retried per slide
            return self._log(attention, coords, step, slide_id, class_index, patch_size)
        except Exception as err:  # noqa: BLE001 - the training loop must survive any failure
            where = f" (slide {slide_id!r})" if slide_id is not None else ""
            warnings.warn(
                f"attention heatmap for step {step}{where} skipped: {_first_line(err)}; "
                "training continues",
                HeatmapSkippedWarning,
                stacklevel=2,
            )
            return None

    def _log(
        self,
        attention: Any,
        coords: Any,
        step: int,
        slide_id: str | None,
        class_index: int | None,
        patch_size: float | None,
    ) -> str:
        scores = attention_scores(attention, class_index=class_index)
        loaded_size: float | None = None
        if coords is None and slide_id is not None:
            coords, loaded_size = self._load_coords(str(slide_id))
        message = _fallback_message(scores.size, coords)
        if message is not None:
            where = f"slide {slide_id!r}, " if slide_id is not None else ""
            warnings.warn(f"{where}step {step}: {message}", GridFallbackWarning, stacklevel=3)
            tag = self._tag("grid_attention_heatmap")
            image = _render_grid(
                scores,
                cmap=self.cmap,
                normalize=self.normalize,
                cell_size=None,
                colorbar=self.colorbar,
                background=self.background,
            )
        else:
            tag = self._tag("spatial_attention_heatmap")
            size = patch_size if patch_size is not None else loaded_size or self.patch_size
            image = spatial_attention_map(
                scores,
                coords,
                patch_size=size,
                downsample=self.downsample,
                cmap=self.cmap,
                normalize=self.normalize,
                colorbar=self.colorbar,
                background=self.background,
            )
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        return tag
