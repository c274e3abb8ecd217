"""Trackers wired into ``clam-heat run`` (docs/beyond-clam.md#trackers) on the demo: MLflow against
a local ``file:`` store read back with MLflow's own client, W&B offline with its run files
checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tracker_env import wandb_settled

from clam_heat.config import load_config
from clam_heat.rows import resolved_config_path
from clam_heat.runner import run_pipeline


def test_demo_run_with_mlflow_reads_back(demo_project: Path, tmp_path: Path, quiet_env) -> None:
    pytest.importorskip("mlflow", reason="pip install 'clam-heat[mlflow]'")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(
        demo_project,
        overrides=["runner_arguments.tracker=mlflow", f"runner_arguments.tracker_uri={uri}"],
    )
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.exp_arguments.save_exp_code)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model_arguments.model_type"] == "clam_sb"
    history = client.get_metric_history(run.info.run_id, "p_0")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "back")))
    assert (local / summary.results_csv.name).read_bytes() == summary.results_csv.read_bytes()
    assert (local / "config.yaml").read_bytes() == resolved_config_path(cfg).read_bytes()
    shots = sorted(p.name for p in (local / "thumbnails").glob("*.png"))
    assert shots == [f"demo_{i:03d}.png" for i in range(5)]
    table = json.loads((local / "slides.json").read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert sorted(r["slide_id"] for r in rows) == [f"demo_{i:03d}" for i in range(5)]
    assert {r["status"] for r in rows} == {"done"}


def test_demo_run_with_wandb_offline_writes_run_files(
    demo_project: Path, tmp_path: Path, quiet_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="pip install 'clam-heat[wandb]'")
    cfg = load_config(demo_project, overrides=["runner_arguments.tracker=wandb"])
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed
    wandb_settled()  # the run's files are complete on disk
    # offline (no key known), under <raw>/<exp>/wandb/
    root = Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code / "wandb"
    (run_dir,) = [p for p in root.glob("offline-run-*") if p.is_dir()]
    files = run_dir / "files"
    copied = files / "clam_heat"
    assert (copied / summary.results_csv.name).read_bytes() == summary.results_csv.read_bytes()
    assert (copied / "config.yaml").read_bytes() == resolved_config_path(cfg).read_bytes()
    images = list((files / "media" / "images").rglob("*.png"))
    assert len(images) >= 5  # one heatmap thumbnail per slide
    assert list(run_dir.glob("*.wandb"))  # the run's log, which `wandb sync` uploads


def test_missing_tracker_extra_stops_before_any_work(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from clam_heat.trackers import TrackerError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    cfg = load_config(demo_project, overrides=["runner_arguments.tracker=mlflow"])
    with pytest.raises(TrackerError, match=r"pip install 'clam-heat\[mlflow\]'"):
        run_pipeline(cfg)
    raw = Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code
    assert not list(raw.rglob("*_blockmap.h5"))
