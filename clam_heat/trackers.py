"""Experiment trackers: a run's resolved config, per-slide metrics, heatmap thumbnails and output
files, sent to MLflow or Weights & Biases.

A :class:`Tracker` is a context manager: ``log_config`` once, ``log_slide`` per finished slide,
``log_artifact`` per file, ``log_image`` per training-time map (:mod:`clam_heat.training`),
``close(status)``. Only starting a run can fail (:class:`TrackerError`,
one line, exit 2); after that a failed call is one log warning and the pipeline goes on: a tracking
server's hiccup must not fail a slide. The extras are imported only when such a tracker is built and
kept off the terminal (MLflow logs via ``logging``, W&B runs silent; warnings go to the debug log).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import netrc
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from numbers import Real
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from .atomic import write_bytes_atomic
from .errors import ClamHeatError, typed_message_line

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "TrackerError", "WandbTracker"]
__all__ += ["TrackerKind", "flatten_config", "make_tracker", "thumbnail"]

log = logging.getLogger(__name__)

TrackerKind = Literal["none", "mlflow", "wandb"]
RunStatus = Literal["finished", "failed", "killed"]
THUMBNAIL_MAX_SIDE = 512
_WANDB_EXIT = {"finished": 0, "failed": 1, "killed": 130}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9._/ -]+")  # MLflow image keys may also hold '/' and ' '
StrPath = str | os.PathLike[str]


class TrackerError(ClamHeatError):
    """A tracker cannot start: its extra is missing or the tracking backend refused the run."""

    exit_code = 2


def flatten_config(resolved: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config blocks as ``block.key`` -> text, the form tracker params take.

    >>> flatten_config({"exp_arguments": {"n_classes": 2, "tags": [1, 2]}, "x": None})
    {'exp_arguments.n_classes': '2', 'exp_arguments.tags': '[1, 2]', 'x': 'None'}
    """
    flat: dict[str, str] = {}
    for key, value in resolved.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _safe(name: str) -> str:
    """A file- and metric-safe form of a slide id or name (``a b/c`` -> ``a_b_c``)."""
    return _UNSAFE.sub("_", name).strip("_") or "_"


def _is_metric(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(module: str, setting: str) -> Any:
    """Import an optional extra (named like its module) or raise the one-line install hint."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    hint = f"pip install 'clam-heat[{module}]'"
    if spec is None:
        raise TrackerError(f"{setting}: {module} needs the extra: {hint}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackerError(
            f"{setting}: {module} is installed but does not import "
            f"({typed_message_line(err)}): {hint}"
        ) from None


def thumbnail(image_path: StrPath, max_side: int = THUMBNAIL_MAX_SIDE) -> bytes:
    """A PNG of the image with its long side at most ``max_side`` pixels (never enlarged).

    A JPEG is decoded at 1/8, 1/4 or 1/2 scale when that still covers ``max_side``, so a
    40000-pixel heatmap never lands in memory at full size (a TIFF decodes its first page).
    """
    import cv2
    import numpy as np

    path = Path(image_path)
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    try:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as err:
        raise ClamHeatError(f"{path}: cannot read ({err.strerror or err})") from None
    image = cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_8) if data.size else None
    if image is None:
        raise ClamHeatError(f"{path}: not a readable image, so no thumbnail")
    long_side = 8 * max(image.shape[:2])  # the full image's long side, rounded up to 8
    if long_side // 8 < max_side:  # decode finer: the coarsest scale that covers max_side
        flags = {4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2, 1: cv2.IMREAD_COLOR}
        factor = next(f for f in flags if long_side // f >= max_side or f == 1)
        image = cv2.imdecode(data, flags[factor])
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".png", image)[1].tobytes()


def _check_image(image: Any) -> Any:
    """``image`` as a C-contiguous (H, W, 3|4) uint8 array, or a one-line ValueError."""
    import numpy as np

    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4) or not array.size:
        raise ValueError(
            f"image must be (H, W, 3) or (H, W, 4) uint8, got {array.dtype} {array.shape}"
        )
    return array


def _png(image: Any) -> bytes:
    """A lossless PNG of an RGB(A) uint8 array (OpenCV wants BGR(A), hence the swap)."""
    import cv2

    code = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    return cv2.imencode(".png", cv2.cvtColor(image, code))[1].tobytes()


_png_thumbnail = thumbnail  # for methods whose ``thumbnail`` argument shadows the function


class Tracker:
    """The tracker interface, which the runner and the training logger call, and its shared
    bookkeeping: the slide table, thumbnail staging, never-raising calls, closing. Backends
    override the ``_start``/``_log_*``/``_close`` hooks.

    ``slides`` keeps one row per :meth:`log_slide` (``step``, ``slide_id``, the metrics and the
    staged ``thumbnail``); backends write it as one table when the run closes.
    """

    kind = "none"
    max_side = THUMBNAIL_MAX_SIDE  # thumbnails' long side, pixels

    def __init__(
        self,
        *,
        run_name: str = "clam-heat",
        project: str = "clam-heat",
        directory: StrPath = ".",
        uri: str | None = None,
        setting: str = "runner_arguments.tracker",
    ) -> None:
        self.run_name, self.project, self.directory = run_name, project, Path(directory)
        self.uri, self.setting = uri, setting
        self.slides: list[dict[str, Any]] = []
        self.failures, self.closed = 0, False  # failed backend calls; close() done
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self._start()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, et: Any, e: BaseException | None, tb: Any) -> None:
        self.close("finished" if e is None else "killed" if et is KeyboardInterrupt else "failed")

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Run a backend call: a failure becomes one warning, its warnings go to the debug log."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except Exception as err:  # noqa: BLE001 - tracking must never fail the run
                self.failures += 1
                why = typed_message_line(err)
                log.warning("%s tracker: %s failed (%s); the run goes on", self.kind, what, why)
        for item in caught:
            log.debug("%s tracker: %s: %s", self.kind, item.category.__name__, item.message)

    @contextlib.contextmanager
    def _starting(self, where: str = "") -> Iterator[None]:
        """Start the backend's run: any refusal is one :class:`TrackerError` line for the user."""
        try:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                yield
        except Exception as err:  # noqa: BLE001 - whatever the backend raises
            why = f"{self.kind} could not start a run{where} ({typed_message_line(err)})"
            raise TrackerError(f"{self.setting}: {why}") from None

    def _stage(self, name: str, data: bytes) -> Path:
        """A private file for the backend to copy (thumbnails, renamed artifacts)."""
        if self._staging is None:
            self._staging = tempfile.TemporaryDirectory(prefix="clam-heat-tracker-")
        return write_bytes_atomic(Path(self._staging.name) / name, data, durable=False)

    def log_config(self, resolved: Mapping[str, Any]) -> None:
        """Record the resolved config (nested blocks) as the run's parameters."""
        with self._guard("log_config"):
            self._log_config(resolved)

    def log_slide(
        self, slide_id: str, metrics: Mapping[str, Any], thumbnail: Path | None = None
    ) -> None:
        """Record one slide: numbers as metrics at step = slide index, every value in the slide
        table, and a PNG thumbnail of the image ``thumbnail`` (its heatmap) when given."""
        row: dict[str, Any] = {"step": len(self.slides), "slide_id": str(slide_id), **metrics}
        row["thumbnail"] = None  # last column: the staged PNG
        if thumbnail is not None and self.kind != "none":  # no backend, no thumbnail to draw
            with self._guard(f"thumbnail of {slide_id}"):
                png = _png_thumbnail(thumbnail, self.max_side)
                row["thumbnail"] = self._stage(f"{_safe(str(slide_id))}.png", png)
        self.slides.append(row)
        with self._guard(f"log_slide {slide_id}"):
            self._log_slide(row)

    def log_artifact(self, path: StrPath, name: str | None = None) -> None:
        """Attach a file to the run, under ``name`` when given."""
        with self._guard(f"log_artifact {Path(path).name}"):
            self._log_artifact(Path(path), name or Path(path).name)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """Record one (H, W, 3) RGB (or (H, W, 4) RGBA) uint8 image under ``tag`` at ``step`` (an
        epoch of the training logger), so the backend shows the maps of one tag step by step."""
        with self._guard(f"log_image {tag} step {step}"):
            self._log_image(str(tag), _check_image(image), int(step))

    def close(self, status: RunStatus = "finished") -> None:
        """Write the slide table, end the run with ``status``, drop staged files; idempotent."""
        if self.closed:
            return
        self.closed = True
        with self._guard("close"):
            self._close(status)
        if self._staging is not None:
            self._staging.cleanup()

    def _start(self) -> None: ...
    def _log_config(self, resolved: Mapping[str, Any]) -> None: ...
    def _log_slide(self, row: dict[str, Any]) -> None: ...
    def _log_artifact(self, path: Path, name: str) -> None: ...
    def _log_image(self, tag: str, image: Any, step: int) -> None: ...
    def _close(self, status: RunStatus) -> None: ...


class NullTracker(Tracker):
    """``tracker: none``: no backend (the slide table is kept in memory, no thumbnails drawn)."""


class MlflowTracker(Tracker):
    """One MLflow run in the experiment ``project`` (``exp_arguments.save_exp_code``).

    Uses ``MlflowClient``, not the fluent ``mlflow.start_run``, so a training script's own active
    run is left alone. MLflow 3 opens a ``file:`` store (the only local store mlflow-skinny can
    write) only with ``MLFLOW_ALLOW_FILE_STORE=true``, set here for ``file:`` URIs unless set.
    """

    kind = "mlflow"

    def _start(self) -> None:
        # the URI: given, else MLFLOW_TRACKING_URI, else <directory>/mlruns; a path -> file: URI
        uri = str(self.uri or os.environ.get("MLFLOW_TRACKING_URI") or self.directory / "mlruns")
        self.uri = uri if len(urlparse(uri).scheme) > 1 else Path(uri).resolve().as_uri()
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        _require("mlflow", self.setting)
        with self._starting(f" at {self.uri}"):
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            self.client = client = MlflowClient(self.uri)
            if client.get_experiment_by_name(self.project) is None:
                with contextlib.suppress(MlflowException):  # a parallel shard may be first
                    client.create_experiment(self.project)
            self.experiment_id: str = client.get_experiment_by_name(self.project).experiment_id
            run = client.create_run(self.experiment_id, run_name=self.run_name)
            self.run_id: str = run.info.run_id
        log.info("mlflow: run %s in experiment %r at %s", self.run_id, self.project, self.uri)

    def _log_config(self, resolved: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(_safe(k), v[:6000]) for k, v in flatten_config(resolved).items()]
        for start in range(0, len(params), 100):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_dict(self.run_id, dict(resolved), "config/resolved.json")

    def _log_slide(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), row["step"]
        numbers = {k: v for k, v in row.items() if k != "step" and _is_metric(v)}
        metrics = [Metric(_safe(k), float(v), now, step) for k, v in numbers.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if row["thumbnail"] is not None:
            self.client.log_artifact(self.run_id, str(row["thumbnail"]), "thumbnails")

    def _log_artifact(self, path: Path, name: str) -> None:
        if name != path.name:
            path = self._stage(name, path.read_bytes())
        self.client.log_artifact(self.run_id, str(path))

    def _log_image(self, tag: str, image: Any, step: int) -> None:
        """MLflow's step-keyed images (``log_image(key=, step=)``, MLflow >= 2.12, a slider per
        key in the UI); an older client gets the PNG as ``images/<tag>/step_<n>.png``."""
        key = _UNSAFE_KEY.sub("_", tag).strip() or "_"
        if _has_step_images(self.client):
            self.client.log_image(self.run_id, image, key=key, step=step)
            return
        staged = self._stage(f"step_{step}.png", _png(image))
        self.client.log_artifact(self.run_id, str(staged), f"images/{key.strip('/')}")

    def _close(self, status: RunStatus) -> None:
        if self.slides:
            import pandas as pd

            table = pd.DataFrame(self.slides)
            shots = [p and f"thumbnails/{Path(p).name}" for p in table["thumbnail"]]
            table["thumbnail"] = pd.Series(shots, dtype=object)
            self.client.log_table(self.run_id, data=table, artifact_file="slides.json")
        self.client.set_terminated(self.run_id, status.upper())  # FINISHED, FAILED, KILLED


def _has_step_images(client: Any) -> bool:
    """Whether this MLflow client logs images by key and step (``log_image(..., key=, step=)``)."""
    import inspect

    method = getattr(type(client), "log_image", None)  # the installed version's, not a wrapper
    return method is not None and {"key", "step"} <= set(inspect.signature(method).parameters)


def _wandb_key_known(base_url: str | None) -> bool:
    """Whether W&B can log in without asking: an API key in the environment or in netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        return bool(netrc.netrc(os.environ.get("NETRC")).authenticators(host.hostname or ""))
    return False


class WandbTracker(Tracker):
    """One W&B run in ``project``; offline (``wandb sync`` later) when ``WANDB_MODE`` is unset and
    no API key is known. Run files go to ``<directory>/wandb`` unless ``WANDB_DIR`` is set;
    ``uri`` is a self-hosted W&B server's base URL."""

    kind = "wandb"

    def _start(self) -> None:
        self._wandb = wandb = _require("wandb", self.setting)
        # mode and folder are passed explicitly: W&B reads its environment once per process, so
        # a WANDB_MODE/WANDB_DIR set after an earlier run in this process would be ignored
        mode = os.environ.get("WANDB_MODE") or None
        if mode is None and not _wandb_key_known(self.uri):
            mode = "offline"
        folder = Path(os.environ.get("WANDB_DIR") or self.directory)
        settings = {"silent": True, "console": "off", "save_code": False}
        settings.update({"base_url": self.uri} if self.uri else {})
        with self._starting():
            folder.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.project,
                name=self.run_name,
                dir=str(folder),
                mode=mode,  # type: ignore[arg-type]
                reinit="create_new",
                settings=wandb.Settings(**settings),
            )
            self.run.define_metric("slide/*", step_metric="slide/index")
        self._image_tags: set[str] = set()
        self.run_dir = Path(self.run.dir).parent
        if self.run.offline:
            log.info("wandb: offline run in %s (upload: wandb sync %s)", self.run_dir, self.run_dir)

    def _log_config(self, resolved: Mapping[str, Any]) -> None:
        self.run.config.update(dict(resolved), allow_val_change=True)

    def _log_slide(self, row: dict[str, Any]) -> None:
        data = {f"slide/{_safe(k)}": v for k, v in row.items() if k != "step" and _is_metric(v)}
        data["slide/index"] = row["step"]
        if row["thumbnail"] is not None:
            shot = self._wandb.Image(str(row["thumbnail"]), caption=row["slide_id"])
            data["slide/heatmap"] = shot
        self.run.log(data)

    def _log_image(self, tag: str, image: Any, step: int) -> None:
        """``tag`` as a media panel stepped by ``epoch`` (kept apart from the slide index)."""
        if tag not in self._image_tags:
            self.run.define_metric(tag, step_metric="epoch")
            self._image_tags.add(tag)
        self.run.log({tag: self._wandb.Image(image), "epoch": step})

    def _log_artifact(self, path: Path, name: str) -> None:
        """A versioned W&B artifact, plus a copy in the run's ``files/clam_heat/`` (Files tab)."""
        artifact = self._wandb.Artifact(_UNSAFE.sub("-", name), type="clam-heat")
        artifact.add_file(str(path), name=name)
        copy = Path(self.run.dir) / "clam_heat" / name
        write_bytes_atomic(copy, path.read_bytes(), durable=False)
        self.run.log_artifact(artifact)

    def _close(self, status: RunStatus) -> None:
        if self.slides:
            columns = list(dict.fromkeys(key for row in self.slides for key in row))
            table = self._wandb.Table(columns=columns)
            for row in self.slides:
                shot = row["thumbnail"] and self._wandb.Image(str(row["thumbnail"]))
                table.add_data(*[shot if k == "thumbnail" else row.get(k) for k in columns])
            self.run.log({"slides": table})
        self.run.finish(exit_code=_WANDB_EXIT[status])


def make_tracker(
    kind: TrackerKind,
    *,
    run_name: str,
    project: str,
    directory: StrPath,
    uri: str | None = None,
    setting: str = "runner_arguments.tracker",
) -> Tracker:
    """The tracker for ``runner_arguments.tracker`` (``setting`` names the key in messages).

    >>> with make_tracker("none", run_name="r", project="p", directory=".") as tracker:
    ...     tracker.log_slide("slide_1", {"p_0": 0.9})
    >>> tracker.slides[0]["p_0"], tracker.closed
    (0.9, True)
    """
    classes = {"none": NullTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
    if kind not in classes:
        raise TrackerError(f"{setting}: unknown tracker {kind!r}; choose none, mlflow or wandb")
    return classes[kind](
        run_name=run_name, project=project, directory=directory, uri=uri, setting=setting
    )
