"""The training logger's ``tracker=`` option (docs/training.md#trackers), for real: a CLAM-layout
model on small bags, maps sent to MLflow (a ``file:`` store read back with ``MlflowClient``) and to
W&B offline (its run's media files read back); mocks only inject faults."""

from __future__ import annotations

import importlib.util
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tracker_env import wandb_settled

from clam_heat.models import ClamSB
from clam_heat.trackers import Tracker, TrackerError, make_tracker
from clam_heat.training import (
    AttentionHeatmapLogger,
    HeatmapSkippedWarning,
    log_validation_attention,
    model_attention,
    spatial_attention_map,
)

needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="pip install 'clam-heat[mlflow]'"
)
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="pip install 'clam-heat[wandb]'"
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_clam_tensorboard.py"
EMBED = 16
SPATIAL = "val/spatial_attention_heatmap"
#: MLflow's step-keyed image files: images/<key, '/' as '~'>+step+<n>+timestamp+<ms>+<uuid>.png
MLFLOW_IMAGE = re.compile(
    r"images/(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png"
)


@pytest.fixture(scope="module")
def model() -> ClamSB:
    torch.manual_seed(0)
    return ClamSB(gate=True, size_arg="small", dropout=0.0, n_classes=2, embed_dim=EMBED).eval()


def grid_coords(cols: int = 4, rows: int = 3, step: int = 512) -> np.ndarray:
    """(cols * rows, 2) level-0 top-left coords of a full patch grid, row-major."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * step


def epoch_bags(n_epochs: int) -> list[torch.Tensor]:
    """One 12-patch validation bag per epoch, different each epoch so each map differs."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(12, EMBED, generator=generator) for _ in range(n_epochs)]


def expected_map(model: ClamSB, bag: torch.Tensor) -> np.ndarray:
    """The map drawn independently of the logger: the model's scores painted at the coords."""
    return spatial_attention_map(
        model_attention(model, bag), grid_coords(), patch_size=512, downsample=32
    )


class ListWriter:
    """A SummaryWriter stand-in that keeps what it was given (the map the logger drew)."""

    def __init__(self) -> None:
        self.images: list[tuple[str, np.ndarray, int]] = []

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str) -> None:
        self.images.append((tag, img.copy(), global_step))


def mlflow_images(uri: str, run_id: str, tmp_path: Path) -> dict[tuple[str, int], np.ndarray]:
    """(key, step) -> decoded RGB pixels of every step-keyed image of the run, read back with
    MLflow's own client from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out: dict[tuple[str, int], np.ndarray] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        match = MLFLOW_IMAGE.fullmatch(artifact.path)
        if match is None:
            assert artifact.path.endswith("+compressed.webp"), artifact.path  # UI previews
            continue
        local = client.download_artifacts(run_id, artifact.path, str(tmp_path / "back"))
        key = (match["key"].replace("~", "/"), int(match["step"]))
        assert key not in out, f"two images for {key}"
        out[key] = np.asarray(Image.open(local).convert("RGB"))
    return out


def run_epochs(logger: AttentionHeatmapLogger, model: ClamSB, bags: list[torch.Tensor]) -> None:
    """A validation loop: per epoch two slides, only the first one drawn."""
    for epoch, bag in enumerate(bags):
        assert logger.log_model(model, bag, grid_coords(), step=epoch, patch_size=512) == SPATIAL
        assert logger.log_model(model, bag[:5], step=epoch, slide_id="second") is None


# ------------------------------------------------------------------------------- MLflow


@needs_mlflow
def test_mlflow_gets_one_image_per_epoch_with_the_drawn_pixels(
    tmp_path: Path, model: ClamSB, quiet_env: None
) -> None:
    """Catches: maps not sent to the tracker, sent at the wrong step (every image on step 0),
    channels swapped or rescaled on the way, or TensorBoard and MLflow getting different maps."""
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    bags = epoch_bags(3)
    writer = ListWriter()
    with make_tracker("mlflow", run_name="t", project="train", directory=tmp_path, uri=uri) as run:
        run_epochs(AttentionHeatmapLogger(writer, tracker=run), model, bags)
    assert run.failures == 0

    images = mlflow_images(uri, run.run_id, tmp_path)  # type: ignore[attr-defined]
    assert sorted(images) == [(SPATIAL, 0), (SPATIAL, 1), (SPATIAL, 2)]
    assert [(tag, step) for tag, _, step in writer.images] == [
        (SPATIAL, 0),
        (SPATIAL, 1),
        (SPATIAL, 2),
    ]
    for (tag, drawn, step), bag in zip(writer.images, bags, strict=True):
        np.testing.assert_array_equal(images[tag, step], drawn)  # what TensorBoard got
        np.testing.assert_array_equal(images[tag, step], expected_map(model, bag))
    assert not np.array_equal(images[SPATIAL, 0], images[SPATIAL, 1])  # the steps really differ
    finished = MlflowClient(uri).get_run(run.run_id)  # type: ignore[attr-defined]
    assert finished.info.status == "FINISHED"


@needs_mlflow
def test_mlflow_without_step_images_logs_a_png_per_step(
    tmp_path: Path, model: ClamSB, quiet_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLflow client older than step-keyed images (< 2.12). Catches: the fallback not taken,
    files named by anything but tag and step, or OpenCV's BGR order leaking into the PNG."""
    import clam_heat.trackers as trackers

    monkeypatch.setattr(trackers, "_has_step_images", lambda client: False)
    uri = (tmp_path / "mlruns").as_uri()
    bags = epoch_bags(2)
    with make_tracker("mlflow", run_name="t", project="train", directory=tmp_path, uri=uri) as run:
        run_epochs(AttentionHeatmapLogger(tracker=run), model, bags)
    assert run.failures == 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = run.run_id  # type: ignore[attr-defined]
    folder = f"images/{SPATIAL}"
    assert [a.path for a in client.list_artifacts(run_id, folder)] == [
        f"{folder}/step_0.png",
        f"{folder}/step_1.png",
    ]
    for step, bag in enumerate(bags):
        local = client.download_artifacts(run_id, f"{folder}/step_{step}.png", str(tmp_path / "b"))
        got = np.asarray(Image.open(local).convert("RGB"))
        np.testing.assert_array_equal(got, expected_map(model, bag))


@needs_mlflow
def test_log_validation_attention_passes_the_tracker_through(
    tmp_path: Path, model: ClamSB, quiet_env: None
) -> None:
    """CLAM's one-call hook with TensorBoard off (writer=None) and a tracker on. Catches: the
    hook returning early on writer=None although a tracker was given, or dropping the tracker."""
    import pandas as pd

    class Split(torch.utils.data.Dataset):  # CLAM's Generic_Split as validate_clam sees it
        data_dir = str(tmp_path / "no_h5")  # no coords: the grid map is drawn
        slide_data = pd.DataFrame({"slide_id": ["s0"], "label": [0]})

        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return epoch_bags(1)[0], 0

    loader = torch.utils.data.DataLoader(Split(), batch_size=None)
    uri = (tmp_path / "mlruns").as_uri()
    with make_tracker("mlflow", run_name="t", project="train", directory=tmp_path, uri=uri) as run:
        for epoch in range(2):
            with pytest.warns(Warning, match="slide 's0'"):  # the grid fallback says why
                tag = log_validation_attention(None, model, loader, epoch, tracker=run)
            assert tag == "val/grid_attention_heatmap"
    assert log_validation_attention(None, model, loader, 0) is None  # both off: nothing, no error
    images = mlflow_images(uri, run.run_id, tmp_path)  # type: ignore[attr-defined]
    assert sorted(images) == [("val/grid_attention_heatmap", 0), ("val/grid_attention_heatmap", 1)]


@needs_mlflow
def test_from_tracker_starts_a_run_that_close_finishes(
    tmp_path: Path, model: ClamSB, quiet_env: None
) -> None:
    """Catches: from_tracker not naming its setting in errors, or close() leaving the run open
    (an MLflow run stuck RUNNING forever)."""
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    with AttentionHeatmapLogger.from_tracker(
        "mlflow", run_name="fold0", project="train", directory=tmp_path, uri=uri, tag_prefix="fold0"
    ) as logger:
        assert logger.writer is None
        logger.log_model(model, epoch_bags(1)[0], grid_coords(), step=4, patch_size=512)
    run_id = logger.tracker.run_id  # type: ignore[union-attr]
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert list(mlflow_images(uri, run_id, tmp_path)) == [("fold0/spatial_attention_heatmap", 4)]
    with pytest.raises(TrackerError, match=r"^tracker: unknown tracker 'neptune'; choose"):
        AttentionHeatmapLogger.from_tracker("neptune", directory=tmp_path)  # type: ignore[arg-type]


@needs_mlflow
def test_failures_on_either_side_never_stop_training_nor_starve_the_other(
    tmp_path: Path, model: ClamSB, quiet_env: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Catches: a full TensorBoard disk also losing the MLflow image (tracker called after the
    writer without ``finally``), and a tracking-server error raising into the training loop."""
    uri = (tmp_path / "mlruns").as_uri()
    bags = epoch_bags(2)

    class FullDisk:
        def add_image(self, *args: object, **kwargs: object) -> None:
            raise OSError("No space left on device")

    def server_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("tracking server unreachable")

    run = make_tracker("mlflow", run_name="t", project="train", directory=tmp_path, uri=uri)
    with pytest.warns(HeatmapSkippedWarning, match="No space left on device"):
        AttentionHeatmapLogger(FullDisk(), tracker=run).log_model(
            model, bags[0], grid_coords(), step=0, patch_size=512
        )
    writer = ListWriter()
    monkeypatch.setattr(run.client, "log_image", server_down)  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="clam_heat.trackers"):
        logger = AttentionHeatmapLogger(writer, tracker=run)
        tag = logger.log_model(model, bags[1], grid_coords(), step=1, patch_size=512)
    monkeypatch.undo()
    run.close()
    assert tag == SPATIAL and [step for *_, step in writer.images] == [1]  # TensorBoard has it
    assert run.failures == 1
    assert "log_image val/spatial_attention_heatmap step 1 failed (ConnectionError" in caplog.text
    images = mlflow_images(uri, run.run_id, tmp_path)  # type: ignore[attr-defined]
    assert list(images) == [(SPATIAL, 0)]  # the map the full disk lost is in MLflow
    np.testing.assert_array_equal(images[SPATIAL, 0], expected_map(model, bags[0]))


# ------------------------------------------------------------------------------- W&B


@needs_wandb
def test_wandb_offline_run_has_one_media_file_per_epoch(
    tmp_path: Path, model: ClamSB, quiet_env: None
) -> None:
    """Tracker only, no TensorBoard. Catches: W&B's log_image missing or logging the wrong
    pixels, and the logger needing a writer."""
    bags = epoch_bags(2)
    with make_tracker("wandb", run_name="t", project="train", directory=tmp_path) as run:
        run_epochs(AttentionHeatmapLogger(tracker=run), model, bags)
    wandb_settled()  # the journal and media are complete on disk
    assert run.failures == 0
    run_dir: Path = run.run_dir  # type: ignore[attr-defined]
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    media = sorted((run_dir / "files" / "media" / "images" / "val").glob("*.png"))
    # W&B names media <key>_<history step>_<hash>.png; each log_image call is one history row
    names = [re.sub(r"_[0-9a-f]{20}\.png$", "", p.name) for p in media]
    assert names == ["spatial_attention_heatmap_0", "spatial_attention_heatmap_1"]
    for path, bag in zip(media, bags, strict=True):
        np.testing.assert_array_equal(
            np.asarray(Image.open(path).convert("RGB")), expected_map(model, bag)
        )
    journal = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert SPATIAL.encode() in journal and b"epoch" in journal  # the panel's x axis


# ------------------------------------------------------------------------------- errors


def test_logger_without_writer_or_tracker_is_a_clear_error() -> None:
    """Catches: a logger built with nowhere to send maps, which would then skip every epoch
    silently (one warning each) instead of failing at construction."""
    with pytest.raises(ValueError, match=r"pass writer= .* and/or tracker= \(see make_tracker\)"):
        AttentionHeatmapLogger()
    with pytest.raises(ValueError, match="needs somewhere to send maps"):
        AttentionHeatmapLogger(None, tracker=None, every_n_epochs=2)
    with pytest.raises(TypeError, match="tracker must have log_image .* got str"):
        AttentionHeatmapLogger(tracker="mlflow")  # type: ignore[arg-type]


def test_null_tracker_alone_is_accepted_and_draws_nothing_anywhere(tmp_path: Path) -> None:
    """Catches: ``--tracker none`` without TensorBoard crashing instead of being a no-op."""
    with make_tracker("none", run_name="r", project="p", directory=tmp_path) as run:
        logger = AttentionHeatmapLogger(tracker=run)
        assert logger.log(np.arange(4.0), grid_coords(2, 2), step=0) == SPATIAL
    assert isinstance(run, Tracker) and run.failures == 0 and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- example


@needs_mlflow
def test_example_with_mlflow_tracker_reads_back_every_epoch(
    tmp_path: Path, quiet_env: None
) -> None:
    """Catches: ``--tracker``/``--tracker-uri`` not reaching the logger, the truth map missing,
    or the run left RUNNING."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = importlib.util.spec_from_file_location("train_clam_tensorboard", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    uri = (tmp_path / "mlruns").as_uri()
    module.main(["--logdir", str(tmp_path / "tb"), "--epochs", "2", "--tracker", "mlflow",
                 "--tracker-uri", uri])  # fmt: skip

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clam-heat-training").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    images = mlflow_images(uri, run.info.run_id, tmp_path)
    assert sorted(images) == [(SPATIAL, 0), (SPATIAL, 1), ("val/tumour_truth", 0)]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    for event in events.Images(SPATIAL):  # MLflow and TensorBoard hold the same maps
        tb = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(images[SPATIAL, event.step], tb)


def test_example_without_the_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches: a traceback instead of the install hint when the tracker's extra is missing."""
    spec = importlib.util.spec_from_file_location("train_clam_tensorboard", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(SystemExit) as done:
        module.main(["--logdir", str(tmp_path / "tb"), "--epochs", "1", "--tracker", "wandb"])
    assert done.value.code == 2
    assert capsys.readouterr().err == (
        "error: --tracker: wandb needs the extra: pip install 'clam-heat[wandb]'\n"
    )
