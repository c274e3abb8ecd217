"""The training logger: one attention map per validation epoch, to TensorBoard and/or an
experiment tracker (MLflow, W&B), never stopping training.

TensorBoard is an optional extra: nothing here imports it until :func:`open_summary_writer` is
called, and the logger only needs an object with ``add_image``. A tracker is a
:class:`clam_heat.trackers.Tracker` (``log_image`` never raises; its extra is imported only when
one is built).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Required, TypedDict, Unpack

import numpy as np

from ..errors import FeatureError, typed_message_line
from .maps import (
    DEFAULT_BACKGROUND,
    GridFallbackWarning,
    HeatmapSkippedWarning,
    Normalisation,
    _fallback_message,
    _render_grid,
    attention_scores,
    model_attention,
    spatial_attention_map,
)

if TYPE_CHECKING:
    from ..trackers import Tracker, TrackerKind

__all__ = [
    "AttentionHeatmapLogger",
    "CoordsLoader",
    "ImageWriter",
    "log_validation_attention",
    "open_summary_writer",
]

_TENSORBOARD_HINT = (
    "tensorboard is not installed, so training heatmaps cannot be written "
    "(pip install 'clam-heat[tensorboard]' or pip install tensorboard)"
)


class LogKeys(TypedDict, total=False):
    """The keywords of :meth:`AttentionHeatmapLogger.log` and ``log_model``."""

    #: The epoch (or step): drawn every ``every_n_epochs``, once per step.
    step: Required[int]
    #: Names the slide; loads its coords from the features folder when ``coords`` is None.
    slide_id: str | None
    #: The class whose map is drawn (default: the model's reduction, the predicted class).
    class_index: int | None
    #: Level-0 patch side for these coords (overrides H5 attrs and the default).
    patch_size: float | None


class ImageWriter(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` the logger uses."""

    def add_image(
        self, tag: str, img_tensor: Any, global_step: int | None = ..., *args: Any, **kwargs: Any
    ) -> Any: ...


#: ``coords_loader(slide_id)`` returns (N, 2) level-0 coords, ``(coords, patch_size_level0)``
#: or ``None`` (no coords for that slide: the grid fallback is drawn).
CoordsLoader = Callable[[str], Any]


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


class AttentionHeatmapLogger:
    """Log one attention heatmap per validation epoch to TensorBoard and/or a tracker, never
    raising.

    ``writer`` is a ``SummaryWriter`` (or anything with ``add_image``); ``tracker`` a
    :class:`~clam_heat.trackers.Tracker` (MLflow, W&B) that gets the same image through
    ``log_image(tag, image, step)``; give one or both. Call :meth:`log` for
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
        writer: ImageWriter | None = None,
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
        smooth: bool = False,
        tracker: Tracker | None = None,
    ) -> None:
        if writer is None and tracker is None:
            raise ValueError(
                "AttentionHeatmapLogger needs somewhere to send maps: pass writer= (a "
                "SummaryWriter, see open_summary_writer) and/or tracker= (see make_tracker)"
            )
        if writer is not None and not callable(getattr(writer, "add_image", None)):
            raise TypeError(
                f"writer must have add_image (a torch.utils.tensorboard.SummaryWriter), "
                f"got {type(writer).__name__}"
            )
        if tracker is not None and not callable(getattr(tracker, "log_image", None)):
            raise TypeError(
                f"tracker must have log_image (a clam_heat.trackers.Tracker), "
                f"got {type(tracker).__name__}"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise TypeError(f"every_n_epochs must be an int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.writer = writer
        self.tracker = tracker
        self._owned: list[Any] = []  # what from_logdir / from_tracker opened, closed by close()
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
        self.smooth = smooth
        self._last_step: int | None = None

    @classmethod
    def from_logdir(cls, logdir: str | Path, **kwargs: Any) -> AttentionHeatmapLogger:
        """Open a ``SummaryWriter`` on ``logdir`` (tensorboard imported lazily) and wrap it."""
        logger = cls(open_summary_writer(logdir), **kwargs)
        logger._owned.append(logger.writer)
        return logger

    @classmethod
    def from_tracker(
        cls,
        kind: TrackerKind,
        *,
        run_name: str = "clam-heat-training",
        project: str = "clam-heat",
        directory: str | Path = ".",
        uri: str | None = None,
        **kwargs: Any,
    ) -> AttentionHeatmapLogger:
        """Start a ``none | mlflow | wandb`` tracker run (as ``runner_arguments.tracker`` does)
        and log to it (and to ``writer=`` when given); :meth:`close` ends the run. Raises
        :class:`~clam_heat.trackers.TrackerError` (one line) when the run cannot start."""
        from ..trackers import make_tracker

        tracker = make_tracker(
            kind,
            run_name=run_name,
            project=project,
            directory=directory,
            uri=uri,
            setting="tracker",
        )
        try:
            logger = cls(tracker=tracker, **kwargs)
        except BaseException:
            tracker.close("failed")
            raise
        logger._owned.append(tracker)
        return logger

    def close(self) -> None:
        """Close the writer / end the tracker run this logger opened (others stay open)."""
        while self._owned:
            self._owned.pop().close()

    def __enter__(self) -> AttentionHeatmapLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tag(self, name: str) -> str:
        return f"{self.tag_prefix}/{name}" if self.tag_prefix else name

    def should_log(self, step: int) -> bool:
        """Whether :meth:`log` would draw for ``step`` (lets a loop skip collecting attention)."""
        return step % self.every_n_epochs == 0 and step != self._last_step

    def _load_coords(self, slide_id: str) -> tuple[Any, float | None, str]:
        """``(coords, patch size, why none)``; an unreadable or missing H5 gives no coords (the
        grid map is drawn, as CLAM's seed asks) and says why."""
        if self.coords_loader is not None:
            loaded = self.coords_loader(slide_id)
            if isinstance(loaded, tuple):
                coords, size = loaded
                return coords, (float(size) if size is not None else None), ""
            return loaded, None, ""
        if self.features_dir is not None:
            try:
                return (*_read_coords_h5(self.features_dir, slide_id), "")
            except (FeatureError, OSError) as err:
                return None, None, f"{typed_message_line(err)}; "
        return None, None, ""

    def log(self, attention: Any, coords: Any = None, **where: Unpack[LogKeys]) -> str | None:
        """Draw and write this epoch's heatmap if due; return the tag written, else None.

        ``attention``: a registered model's forward output or scores (see
        :func:`~clam_heat.training.attention_scores`).
        ``coords``: (N, 2) level-0 (x, y), or None to load them by ``slide_id``.
        Keywords: :class:`LogKeys` (``step`` required).
        """
        return self._guarded(lambda: attention, coords, **where)

    def log_model(
        self,
        model: Any,
        features: Any,
        coords: Any = None,
        *,
        method: str = "attention",
        **where: Unpack[LogKeys],
    ) -> str | None:
        """Like :meth:`log`, but the scores come from ``model`` on the bag ``features`` (N, D)
        through the model's own reduction (:func:`~clam_heat.training.model_attention`); the
        model only runs on epochs that are drawn. Works for every registered model, and lets
        ``class_index`` pick any class's map, also for models that reduce inside their forward
        (DSMIL). ``method``: an attribution method instead of attention (docs/explanations.md)."""
        class_index = where.get("class_index")
        return self._guarded(
            lambda: model_attention(model, features, class_index=class_index, method=method),
            coords,
            **where,
        )

    def _guarded(
        self, attention: Callable[[], Any], coords: Any, **where: Unpack[LogKeys]
    ) -> str | None:
        step, slide_id = where["step"], where.get("slide_id")
        try:
            if not self.should_log(step):
                return None
            self._last_step = step  # one attempt per epoch: a failure is not retried per slide
            return self._log(
                attention(),
                coords,
                step,
                slide_id,
                where.get("class_index"),
                where.get("patch_size"),
            )
        except Exception as err:  # noqa: BLE001 - the training loop must survive any failure
            where = f" (slide {slide_id!r})" if slide_id is not None else ""
            warnings.warn(
                f"attention heatmap for step {step}{where} skipped: {typed_message_line(err)}; "
                "training continues",
                HeatmapSkippedWarning,
                stacklevel=3,
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
        why = ""
        if coords is None and slide_id is not None:
            coords, loaded_size, why = self._load_coords(str(slide_id))
        message = _fallback_message(scores.size, coords)
        if message is not None:
            where = f"slide {slide_id!r}, " if slide_id is not None else ""
            warnings.warn(f"{where}step {step}: {why}{message}", GridFallbackWarning, stacklevel=4)
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
                smooth=self.smooth,
            )
        try:
            if self.writer is not None:
                self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        finally:  # a failing writer still leaves the map with the tracker, which never raises
            if self.tracker is not None:
                self.tracker.log_image(tag, image, step)
        return tag


def _first_slide_id(dataset: Any) -> str | None:
    """The first slide's id in a CLAM split (``slide_data['slide_id']``), if it has one."""
    table = getattr(dataset, "slide_data", None)
    try:
        return str(table["slide_id"].iloc[0]) if table is not None else None
    except (KeyError, IndexError, AttributeError, TypeError):
        return None


def log_validation_attention(
    writer: ImageWriter | None,
    model: Any,
    loader: Any,
    epoch: int,
    *,
    features_dir: str | Path | None = None,
    tracker: Tracker | None = None,
    method: str = "attention",
    **logger_options: Any,
) -> str | None:
    """One call for CLAM's ``validate_clam`` / ``validate``: draw the first validation slide's
    attention map for ``epoch`` and write it to ``writer`` and/or ``tracker`` (an open
    :class:`~clam_heat.trackers.Tracker`, left open); return the tag, or None (also when both are
    None).

    ``loader`` is CLAM's validation ``DataLoader`` (batch size 1, ``collate_MIL``: each item is
    ``(features (N, D), label)``, in ``loader.dataset.slide_data`` order). Coordinates come from
    ``<features_dir>/h5_files/<slide_id>.h5`` (or ``<features_dir>/<slide_id>.h5``); without
    ``features_dir`` the split's own ``data_dir`` is used, and a slide without an H5 gets the
    grid map. ``logger_options`` are :class:`AttentionHeatmapLogger`'s (``cmap``, ``smooth``,
    ``downsample``, ``tag_prefix``, ...). Never raises: a failure is one
    :class:`HeatmapSkippedWarning`, so the two lines added to CLAM cannot stop training::

        from clam_heat.training import log_validation_attention
        log_validation_attention(writer, model, loader, epoch)
    """
    dataset = getattr(loader, "dataset", None)
    folder = features_dir if features_dir is not None else getattr(dataset, "data_dir", None)
    if writer is None and tracker is None:  # CLAM passes writer=None when TensorBoard is off
        return None
    logger = AttentionHeatmapLogger(writer, features_dir=folder, tracker=tracker, **logger_options)
    slide_id = _first_slide_id(dataset)

    def first_bag() -> Any:
        batch = next(iter(loader))
        data = batch[0] if isinstance(batch, (tuple, list)) else batch
        bag = data.detach().cpu() if hasattr(data, "detach") else data
        return model_attention(model, bag, method=method)

    return logger._guarded(first_bag, None, step=epoch, slide_id=slide_id)
