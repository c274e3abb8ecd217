"""Experiment trackers, for real: MLflow against a local ``file:`` store read back with MLflow's
own client, W&B in offline mode with its run files checked on disk; mocks only inject faults."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from tracker_env import wandb_settled

from clam_heat.trackers import NullTracker, Tracker, TrackerError, make_tracker, thumbnail

# the extras run in CI (they are in the `test` extra); without them these tests say what to install
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="pip install 'clam-heat[mlflow]'"
)
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="pip install 'clam-heat[wandb]'"
)

CONFIG = {
    "exp_arguments": {"save_exp_code": "EXP_TRACK", "n_classes": 2},
    "heatmap_arguments": {"alpha": 0.4, "cmap": "jet"},
    "data_arguments": {"label_dict": {"normal": 0, "tumor": 1}},
}
SLIDES = {
    "slide_1": {"bag_size": 59, "Pred_0": "tumor", "p_0": 0.91, "attention_mean": 0.017},
    "slide_2": {"bag_size": 40, "Pred_0": "normal", "p_0": 0.77, "attention_mean": 0.025},
    "slide 3": {"bag_size": 12, "Pred_0": "tumor", "p_0": 0.55, "attention_mean": 0.083},
}


@pytest.fixture()
def outputs(tmp_path: Path) -> dict[str, Path]:
    """Two heatmap images (PNG 600x900, JPEG 3000x4000), a results CSV and a config file."""
    rows = np.linspace(0, 255, 600, dtype=np.uint8)[:, None, None]
    png = np.broadcast_to(rows, (600, 900, 3)).copy()
    png[:, :300] = (0, 0, 255)  # a red left third (BGR)
    jpg = np.full((3000, 4000, 3), (255, 0, 0), np.uint8)  # blue
    paths = {"png": tmp_path / "slide_1_heatmap.png", "jpg": tmp_path / "slide_2_heatmap.jpg"}
    assert cv2.imwrite(str(paths["png"]), png) and cv2.imwrite(str(paths["jpg"]), jpg)
    paths["csv"] = tmp_path / "EXP_TRACK.csv"
    paths["csv"].write_text("slide_id,bag_size,Pred_0,p_0\nslide_1,59,tumor,0.91\n")
    paths["config"] = tmp_path / "config.yaml"
    paths["config"].write_text("exp_arguments:\n  save_exp_code: EXP_TRACK\n")
    return paths


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def _log_run(tracker: Tracker, outputs: dict[str, Path]) -> None:
    tracker.log_config(CONFIG)
    shots = [outputs["png"], outputs["jpg"], None]
    for (slide_id, metrics), shot in zip(SLIDES.items(), shots, strict=True):
        tracker.log_slide(slide_id, metrics, shot)
    tracker.log_artifact(outputs["csv"])
    tracker.log_artifact(outputs["config"], "resolved_config.yaml")


# --------------------------------------------------------------------------- thumbnails


def test_thumbnail_is_a_png_that_keeps_aspect_and_colour(outputs: dict[str, Path]) -> None:
    image = _decode(thumbnail(outputs["png"], max_side=512))
    assert image.shape == (341, 512, 3)
    assert tuple(image[170, 50]) == (0, 0, 255)
    small = _decode(thumbnail(outputs["png"], max_side=2000))  # never enlarged
    assert small.shape == (600, 900, 3)


def test_thumbnail_of_a_large_jpeg_is_decoded_reduced(outputs: dict[str, Path]) -> None:
    image = _decode(thumbnail(outputs["jpg"]))  # its time is in bench/limits.py
    assert image.shape == (384, 512, 3)
    assert np.abs(image.astype(int) - (255, 0, 0)).max() <= 2


def test_thumbnail_of_a_broken_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="broken.png: not a readable image") as err:
        thumbnail(bad)
    with pytest.raises(Exception, match="missing.png: cannot read"):
        thumbnail(tmp_path / "missing.png")
    assert "\n" not in str(err.value)


def test_importing_trackers_loads_no_backend_or_opencv() -> None:
    code = (
        "import sys, clam_heat.trackers as t; print([m for m in "
        + repr(("mlflow", "wandb", "cv2", "torch", "pandas"))
        + " if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_missing_extra_is_the_one_line_install_hint(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, kind, None)
    with pytest.raises(TrackerError) as err:
        make_tracker(kind, run_name="r", project="p", directory=tmp_path)  # type: ignore[arg-type]
    assert str(err.value) == (
        f"runner_arguments.tracker: {kind} needs the extra: pip install 'clam-heat[{kind}]'"
    )
    assert err.value.exit_code == 2


def test_unknown_kind_and_null_tracker(tmp_path: Path, outputs: dict[str, Path]) -> None:
    with pytest.raises(TrackerError, match="unknown tracker 'neptune'; choose none, mlflow or"):
        make_tracker("neptune", run_name="r", project="p", directory=tmp_path)  # type: ignore[arg-type]
    with make_tracker("none", run_name="r", project="p", directory=tmp_path) as tracker:
        _log_run(tracker, outputs)
    assert isinstance(tracker, NullTracker) and tracker.closed and tracker.failures == 0
    assert [row["slide_id"] for row in tracker.slides] == list(SLIDES)
    assert all(row["thumbnail"] is None for row in tracker.slides)  # nothing drawn for nobody


# --------------------------------------------------------------------------- MLflow


def _mlflow_client(uri: str):  # noqa: ANN202 - mlflow is an optional extra
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@needs_mlflow
def test_mlflow_file_store_reads_back(
    tmp_path: Path, outputs: dict[str, Path], quiet_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with make_tracker("mlflow", run_name="run-a", project="EXP_TRACK", directory=tmp_path,
                          uri=uri) as tracker:  # fmt: skip
            _log_run(tracker, outputs)
    assert not seen, [str(w.message) for w in seen]
    assert capfd.readouterr() == ("", "")  # nothing from MLflow on the terminal
    assert tracker.failures == 0

    client = _mlflow_client(uri)
    experiment = client.get_experiment_by_name("EXP_TRACK")
    run = client.get_run(tracker.run_id)  # type: ignore[attr-defined]
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["exp_arguments.n_classes"] == "2"
    assert run.data.params["heatmap_arguments.cmap"] == "jet"
    assert run.data.params["data_arguments.label_dict.tumor"] == "1"
    for key in ("p_0", "bag_size", "attention_mean"):
        history = client.get_metric_history(run.info.run_id, key)
        got = sorted((m.step, m.value) for m in history)
        assert got == [(i, pytest.approx(float(m[key]))) for i, m in enumerate(SLIDES.values())]
    assert "Pred_0" not in run.data.metrics  # text goes to the table only

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"EXP_TRACK.csv", "resolved_config.yaml", "slides.json", "thumbnails"} <= top
    shots = {a.path for a in client.list_artifacts(run.info.run_id, "thumbnails")}
    assert shots == {"thumbnails/slide_1.png", "thumbnails/slide_2.png"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "back")))
    assert (local / "EXP_TRACK.csv").read_bytes() == outputs["csv"].read_bytes()
    assert (local / "resolved_config.yaml").read_bytes() == outputs["config"].read_bytes()
    assert json.loads((local / "config" / "resolved.json").read_text()) == CONFIG
    assert cv2.imread(str(local / "thumbnails" / "slide_1.png")).shape == (341, 512, 3)
    table = json.loads((local / "slides.json").read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["slide_id"], r["Pred_0"], r["step"]) for r in rows] == [
        ("slide_1", "tumor", 0), ("slide_2", "normal", 1), ("slide 3", "tumor", 2),
    ]  # fmt: skip
    assert [r["thumbnail"] for r in rows] == [
        "thumbnails/slide_1.png",
        "thumbnails/slide_2.png",
        None,
    ]


@needs_mlflow
def test_mlflow_defaults_to_a_store_under_the_output_folder(
    tmp_path: Path, quiet_env: None
) -> None:
    folder = tmp_path / "heatmaps" / "EXP_TRACK"
    with make_tracker("mlflow", run_name="r", project="EXP_TRACK", directory=folder) as tracker:
        pass
    assert tracker.uri == (folder / "mlruns").as_uri()  # type: ignore[attr-defined]
    run = _mlflow_client(tracker.uri).get_run(tracker.run_id)  # type: ignore[attr-defined]
    assert run.info.status == "FINISHED"


@needs_mlflow
def test_mlflow_run_status_follows_the_with_block(tmp_path: Path, quiet_env: None) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    opts = {"run_name": "r", "project": "P", "directory": tmp_path, "uri": uri}
    with pytest.raises(ValueError), make_tracker("mlflow", **opts) as failed:  # type: ignore[arg-type]
        raise ValueError("slide exploded")
    with pytest.raises(KeyboardInterrupt), make_tracker("mlflow", **opts) as killed:  # type: ignore[arg-type]
        raise KeyboardInterrupt
    client = _mlflow_client(uri)
    assert client.get_run(failed.run_id).info.status == "FAILED"  # type: ignore[attr-defined]
    assert client.get_run(killed.run_id).info.status == "KILLED"  # type: ignore[attr-defined]


@needs_mlflow
def test_mlflow_failed_call_is_one_warning_and_the_run_goes_on(
    tmp_path: Path,
    outputs: dict[str, Path],
    quiet_env: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    tracker = make_tracker("mlflow", run_name="r", project="P", directory=tmp_path, uri=uri)

    def server_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("tracking server unreachable\nretry later")

    with caplog.at_level(logging.WARNING, logger="clam_heat.trackers"):
        monkeypatch.setattr(tracker.client, "log_batch", server_down)  # type: ignore[attr-defined]
        tracker.log_slide("slide_1", SLIDES["slide_1"], outputs["png"])
        monkeypatch.undo()
        tracker.log_slide("slide_2", SLIDES["slide_2"], None)
        tracker.close()
    assert tracker.failures == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "mlflow tracker: log_slide slide_1 failed "
        "(ConnectionError: tracking server unreachable); the run goes on"
    ]
    client = _mlflow_client(uri)
    run = client.get_run(tracker.run_id)  # type: ignore[attr-defined]
    assert run.info.status == "FINISHED" and run.data.metrics["p_0"] == pytest.approx(0.77)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "p_0")] == [1]


@needs_mlflow
def test_mlflow_refusing_the_store_is_one_line(tmp_path: Path, quiet_env: None) -> None:
    not_a_folder = tmp_path / "mlruns"
    not_a_folder.write_text("a file where the store should be")
    with pytest.raises(TrackerError) as err:
        make_tracker("mlflow", run_name="r", project="P", directory=tmp_path,
                     uri=not_a_folder.as_uri())  # fmt: skip
    message = str(err.value)
    assert message.startswith(
        f"runner_arguments.tracker: mlflow could not start a run at {not_a_folder.as_uri()} ("
    )
    assert "\n" not in message and err.value.exit_code == 2


# --------------------------------------------------------------------------- W&B


def _check_wandb_run(run_dir: Path, outputs: dict[str, Path]) -> None:
    wandb_settled()  # the journal, media and table are complete on disk
    assert run_dir.name.startswith("offline-run-")
    logs = list(run_dir.glob("run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    journal = logs[0].read_bytes()
    assert b"EXP_TRACK" in journal and b"slide/p_0" in journal
    files = run_dir / "files"
    assert (files / "clam_heat" / "EXP_TRACK.csv").read_bytes() == outputs["csv"].read_bytes()
    config = files / "clam_heat" / "resolved_config.yaml"
    assert config.read_bytes() == outputs["config"].read_bytes()
    images = list((files / "media" / "images").rglob("*.png"))
    assert len(images) >= 2
    assert {cv2.imread(str(p)).shape for p in images} >= {(341, 512, 3), (384, 512, 3)}
    (table_file,) = (files / "media" / "table").glob("slides_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["slide_id"], r["Pred_0"], r["bag_size"]) for r in rows] == [
        ("slide_1", "tumor", 59), ("slide_2", "normal", 40), ("slide 3", "tumor", 12),
    ]  # fmt: skip
    assert rows[0]["thumbnail"] and rows[1]["thumbnail"] and rows[2]["thumbnail"] is None


@needs_wandb
def test_wandb_offline_run_files(
    tmp_path: Path,
    outputs: dict[str, Path],
    quiet_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    with warnings.catch_warnings(record=True) as seen:  # start-up time: bench/limits.py
        warnings.simplefilter("always")
        tracker = make_tracker("wandb", run_name="run-w", project="EXP_TRACK", directory=tmp_path)
        with tracker:
            _log_run(tracker, outputs)
    assert not seen, [str(w.message) for w in seen]
    assert capfd.readouterr() == ("", "")  # nothing from W&B on the terminal
    assert tracker.failures == 0
    run_dir = tracker.run_dir  # type: ignore[attr-defined]
    assert run_dir.parent == tmp_path / "wandb_dir" / "wandb"
    _check_wandb_run(run_dir, outputs)


@needs_wandb
def test_wandb_is_offline_without_a_key_and_writes_under_the_output_folder(
    tmp_path: Path, outputs: dict[str, Path], quiet_env: None
) -> None:
    folder = tmp_path / "heatmaps" / "EXP_TRACK"
    with make_tracker("wandb", run_name="r", project="EXP_TRACK", directory=folder) as tracker:
        assert tracker.run.offline  # type: ignore[attr-defined]
        _log_run(tracker, outputs)
    assert tracker.run_dir.parent == folder / "wandb"  # type: ignore[attr-defined]
    _check_wandb_run(tracker.run_dir, outputs)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- log_image


def test_log_image_with_a_bad_image_is_one_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches: log_image validating outside ``_guard`` (a float map raising into training)."""
    tracker = make_tracker("none", run_name="r", project="p", directory=tmp_path)
    with caplog.at_level(logging.WARNING, logger="clam_heat.trackers"), tracker:
        tracker.log_image("val/map", np.zeros((4, 4, 3), np.float32), 0)
        tracker.log_image("val/map", np.zeros((4, 4), np.uint8), 1)
        tracker.log_image("val/map", np.zeros((4, 4, 3), np.uint8), 2)  # fine, and a no-op
    assert tracker.failures == 2
    assert [r.getMessage() for r in caplog.records] == [
        "none tracker: log_image val/map step 0 failed (ValueError: image must be (H, W, 3) or "
        "(H, W, 4) uint8, got float32 (4, 4, 3)); the run goes on",
        "none tracker: log_image val/map step 1 failed (ValueError: image must be (H, W, 3) or "
        "(H, W, 4) uint8, got uint8 (4, 4)); the run goes on",
    ]


@needs_mlflow
def test_mlflow_log_image_keeps_rgba_and_makes_the_key_legal(
    tmp_path: Path, quiet_env: None
) -> None:
    """Catches: a tag with characters MLflow refuses (':') losing the image, and the alpha
    channel or the colour order changed on the way (pixels read back with MLflow's client)."""
    from PIL import Image

    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0] = (1, 2, 3, 0)  # a transparent, non-grey pixel
    uri = (tmp_path / "mlruns").as_uri()
    with make_tracker("mlflow", run_name="r", project="P", directory=tmp_path, uri=uri) as tracker:
        tracker.log_image("fold:1/attention map", rgba, 7)
    assert tracker.failures == 0
    client = _mlflow_client(uri)
    run_id = tracker.run_id  # type: ignore[attr-defined]
    (png,) = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert png.startswith("images/fold_1~attention map+step+7+timestamp+")
    local = client.download_artifacts(run_id, png, str(tmp_path / "back"))
    np.testing.assert_array_equal(np.asarray(Image.open(local)), rgba)
