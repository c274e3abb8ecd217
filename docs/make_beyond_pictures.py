"""The pictures of docs/beyond-clam.md from the demo: ``python docs/make_beyond_pictures.py``.

Writes docs/img/cohort_scale.png, threshold_export.png, all_class_maps.png and
tracker_thumbnails.png (each a small PNG, < 200 KB), from a fresh 5-slide demo in a temp folder.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from picture_tools import labelled, read_at_height

from clam_heat.config import load_config
from clam_heat.demo import make_demo_project
from clam_heat.models import build_model
from clam_heat.process_list import build_process_list
from clam_heat.rows import build_contexts, class_heatmap_path, production_heatmap_path
from clam_heat.runner import run_pipeline

OUT = Path(__file__).resolve().parent / "img"


def _row(images: list[np.ndarray], gap: int = 6) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    padded = [
        np.pad(i, ((0, h - i.shape[0]), (0, gap), (0, 0)), constant_values=255) for i in images
    ]
    return np.hstack(padded)


def _save(name: str, image: np.ndarray) -> None:
    path = OUT / name
    cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{path}: {path.stat().st_size // 1024} KB")


def _contexts(cfg):
    df, _ = build_process_list(cfg, write=False)
    return build_contexts(cfg, df)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp())
    os.environ.setdefault("WANDB_MODE", "offline")
    make_demo_project(work / "demo", n_slides=5, size="tiny")
    config = work / "demo" / "config.yaml"

    # cohort scale: two slides, slide scale (top) vs cohort scale (bottom)
    slide = load_config(config)
    run_pipeline(slide)
    pick = _contexts(slide)[:2]
    top = [
        labelled(read_at_height(production_heatmap_path(c), 210), f"{c.slide_id} slide scale")
        for c in pick
    ]
    cohort = load_config(config, overrides=["heatmap_arguments.score_scale=cohort"])
    run_pipeline(cohort)
    pick = _contexts(cohort)[:2]
    low = [
        labelled(read_at_height(production_heatmap_path(c), 210), f"{c.slide_id} cohort scale")
        for c in pick
    ]
    _save("cohort_scale.png", np.vstack([_row(top), _row(low)]))

    # threshold export: the exported patches of one slide (top 10 %), from its manifest
    thr = load_config(
        config,
        overrides=["sample_arguments.samples=[{name: top10, mode: threshold, threshold: 0.9}]"],
    )
    run_pipeline(thr)
    manifest = next((Path(thr.exp_arguments.production_save_dir) / "demo").rglob("manifest.csv"))
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))[:12]
    tiles = [
        labelled(read_at_height(manifest.parent / r["path"], 120), f"{float(r['percentile']):.3f}")
        for r in rows
    ]
    _save("threshold_export.png", _row(tiles, 4))

    # all-class maps: a CLAM_MB checkpoint (seeded) on the demo bags, one map per class
    torch.manual_seed(0)
    ckpt = work / "clam_mb.pt"
    torch.save(build_model("clam_mb", n_classes=2, embed_dim=64).state_dict(), ckpt)
    mb = load_config(config, overrides=[
        f"model_arguments.ckpt_path={ckpt}", "model_arguments.model_type=clam_mb",
        "heatmap_arguments.classes=all", "exp_arguments.save_exp_code=demo_mb",
    ])  # fmt: skip
    run_pipeline(mb)
    ctx = _contexts(mb)[0]
    maps = [
        labelled(read_at_height(class_heatmap_path(ctx, n)), f"class {n}")
        for n in ("normal", "tumour")
    ]
    _save("all_class_maps.png", _row(maps))

    # trackers: the thumbnails MLflow holds for a demo run, downloaded with MLflow's client
    from mlflow.tracking import MlflowClient

    uri = (work / "mlruns").as_uri()
    tracked = load_config(config, overrides=[
        "runner_arguments.tracker=mlflow", f"runner_arguments.tracker_uri={uri}",
    ])  # fmt: skip
    run_pipeline(tracked)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("demo")
    (run,) = client.search_runs([exp.experiment_id])
    local = Path(client.download_artifacts(run.info.run_id, "thumbnails", str(work / "back")))
    shots = [labelled(read_at_height(p, 150), p.stem) for p in sorted(local.glob("*.png"))]
    _save("tracker_thumbnails.png", _row(shots))


if __name__ == "__main__":
    sys.exit(main())
