"""The example configs under ``configs/``: they validate, say what they claim, and run.

``configs/abmil_panda.yaml`` (MIL-Lab ABMIL on UNI v2 features over PANDA TIFFs, 6 ISUP grades)
is loaded as shipped, then run verbatim over a miniature of the layout it documents: demo slides
as ``train_images/*.tiff``, 1536-wide TRIDENT-style H5s in ``features_uni_v2/``, an ABMIL state
dict saved under MIL-Lab's key names in ``checkpoints/abmil_panda_best.pt``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from clam_heat.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PANDA = CONFIGS / "abmil_panda.yaml"
ISUP = {f"isup_{grade}": grade for grade in range(6)}


def test_abmil_panda_validates_with_documented_values(cwd: Path) -> None:
    """Catches: an example that no longer validates, or whose values drift from its comments
    (classes, MIL-Lab name, UNI v2 width, PANDA extension, no encoder pass)."""
    cfg = load_config(PANDA)
    assert cfg.exp_arguments.n_classes == 6
    assert cfg.data_arguments.label_dict == ISUP
    assert cfg.data_arguments.slide_ext == ".tiff"
    assert cfg.data_arguments.data_dir == cwd / "train_images"
    assert cfg.model_arguments.model_type == "abmil.base.uni_v2.pc108-24k"
    assert cfg.model_arguments.embed_dim == 1536
    assert cfg.model_arguments.ckpt_path == cwd / "checkpoints" / "abmil_panda_best.pt"
    assert cfg.runner_arguments.features_dir == cwd / "features_uni_v2"
    assert cfg.heatmap_arguments.calc_heatmap is False
    assert cfg.runner_arguments.extract_features is False
    assert cfg.heatmap_arguments.vis_level == 2
    text = PANDA.read_text()
    assert text.startswith("#") and "\n---\n" in text  # CLAM's layout: comment, then '---'
    assert "clam-heat doctor configs/abmil_panda.yaml" in text


def test_abmil_panda_model_name_resolves_to_abmil_on_1536_features() -> None:
    """Catches: a model_type that passes the config's pattern but names no model, or whose
    encoder part disagrees with embed_dim."""
    from clam_heat.models import parse_model_type

    choice = parse_model_type("abmil.base.uni_v2.pc108-24k", embed_dim=1536)
    assert (choice.name, choice.in_dim, choice.encoder) == ("abmil", 1536, "uni_v2")


def _panda_miniature(demo_source: Path, folder: Path) -> list[str]:
    """The layout abmil_panda.yaml documents, filled from the demo project; returns slide ids."""
    import h5py
    import numpy as np
    import torch

    from clam_heat.models import build_model

    shutil.copy(PANDA, folder / "abmil_panda.yaml")
    ids = ["demo_000", "demo_001"]
    rng = np.random.default_rng(0)
    for sub in ("train_images", "features_uni_v2", "checkpoints", "process_lists"):
        (folder / sub).mkdir(parents=True)
    for sid in ids:
        shutil.copy(demo_source / "slides" / f"{sid}.tiff", folder / "train_images")
        h5 = folder / "features_uni_v2" / f"{sid}.h5"
        shutil.copy(demo_source / "features" / f"{sid}.h5", h5)
        with h5py.File(h5, "r+") as handle:  # UNI v2 width, fp16 as TRIDENT stores it
            n = handle["features"].shape[0]
            del handle["features"]
            handle["features"] = rng.standard_normal((n, 1536)).astype(np.float16)
    torch.manual_seed(0)
    model = build_model("abmil.base.uni_v2.pc108-24k", n_classes=6, embed_dim=1536)
    assert next(iter(model.state_dict())).startswith("model.")  # MIL-Lab's key names
    torch.save(model.state_dict(), folder / "checkpoints" / "abmil_panda_best.pt")
    rows = "".join(f"{sid},{grade}\n" for sid, grade in zip(ids, (0, 5), strict=True))
    (folder / "process_lists" / "panda_slides.csv").write_text("slide_id,label\n" + rows)
    return ids


def test_abmil_panda_runs_verbatim_on_its_documented_layout(
    demo_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches: an example that validates but cannot run (a path, class count, width or
    encoder name the pipeline rejects): the doctor passes it and ``clam-heat run`` finishes."""
    from typer.testing import CliRunner

    from clam_heat.cli import app
    from clam_heat.doctor import exit_code, format_report, run_doctor

    folder = tmp_path / "panda"
    folder.mkdir()
    ids = _panda_miniature(demo_source, folder)
    monkeypatch.chdir(folder)
    config = folder / "abmil_panda.yaml"
    report = run_doctor(config)
    assert exit_code(report) == 0, "\n".join(format_report(report))
    result = CliRunner().invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    done = pd.read_csv(folder / "process_lists" / "panda_slides.csv", dtype=str)
    assert list(done["slide_id"]) == ids
    assert set(done["status"]) == {"done"}, done[["slide_id", "status", "error"]]
    assert set(done["Pred_0"]) <= set(ISUP)  # predictions named by the ISUP label_dict
    production = folder / "heatmaps" / "panda_results" / "panda_abmil_uni_v2"
    for sid, grade in zip(ids, ("isup_0", "isup_5"), strict=True):
        assert list((production / grade).glob(f"{sid}_*_l_2_*.png")), f"no heatmap for {sid}"
