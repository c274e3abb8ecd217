"""All-class maps (docs/beyond-clam.md#all-class-maps) on the demo: a CLAM_MB (and DSMIL) checkpoint
with ``classes: all`` writes one map per class named with the class; ``[names]`` only those."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from demo_state import row_contexts
from PIL import Image

from clam_heat.config import load_config
from clam_heat.models import build_model
from clam_heat.preflight import GlobalInputError
from clam_heat.rows import class_heatmap_path, class_scores_h5_path
from clam_heat.runner import run_pipeline
from clam_heat.stages import stages_for


def _checkpoint(folder: Path, model_type: str) -> Path:
    """A seeded random checkpoint of ``model_type`` for the demo's 64-d features."""
    torch.manual_seed(0)
    model = build_model(model_type, n_classes=2, embed_dim=64)
    path = folder / f"{model_type}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("model_type", ["clam_mb", "dsmil"])
def test_all_writes_one_map_per_class_with_the_models_branch_scores(
    demo_project: Path, model_type: str
) -> None:
    ckpt = _checkpoint(demo_project.parent, model_type)
    base = [f"model_arguments.ckpt_path={ckpt}", f"model_arguments.model_type={model_type}"]
    cfg = load_config(demo_project, overrides=[*base, "heatmap_arguments.classes=all"])
    summary = run_pipeline(cfg, stages=["segment", "infer", "class_maps"])
    assert summary.ok, summary.failed

    model = build_model(model_type, n_classes=2, embed_dim=64)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    for ctx in row_contexts(cfg):
        maps = sorted(p.name for p in ctx.production_dir.glob(f"{ctx.slide_id}_class_*"))
        assert maps == [f"{ctx.slide_id}_class_normal.jpg", f"{ctx.slide_id}_class_tumour.jpg"]
        with h5py.File(ctx.cfg.runner_arguments.features_dir / f"{ctx.slide_id}.h5", "r") as h5:
            feats = torch.from_numpy(h5["features"][:])
        # oracle: the network's own per-class attention (CLAM_MB: rows of A_raw from forward;
        # DSMIL: columns of its class attention), not clam-heat's reduction or stage
        with torch.no_grad():
            if model_type == "clam_mb":
                per_class = model(feats)[3]
            else:
                per_class = model.model.class_attention(feats)[1].T
        for index, name in enumerate(("normal", "tumour")):
            with h5py.File(class_scores_h5_path(ctx, name), "r") as h5:
                got = h5["attention_scores"][:].reshape(-1)
            np.testing.assert_allclose(got, per_class[index].numpy(), rtol=1e-5, atol=1e-6)
        a, b = (np.asarray(Image.open(class_heatmap_path(ctx, n))) for n in ("normal", "tumour"))
        assert a.shape == b.shape and not np.array_equal(a, b)  # two different maps

    # a list: only those classes; the other class's files are removed as stale
    cfg = load_config(demo_project, overrides=[*base, "heatmap_arguments.classes=[tumour]"])
    assert run_pipeline(cfg, stages=["segment", "infer", "class_maps"]).ok
    ctx = row_contexts(cfg)[0]
    assert [p.name for p in ctx.production_dir.glob(f"{ctx.slide_id}_class_*")] == [
        f"{ctx.slide_id}_class_tumour.jpg"
    ]
    assert not class_scores_h5_path(ctx, "normal").exists()


def test_predicted_is_todays_behaviour_and_single_map_models_are_refused(
    demo_project: Path,
) -> None:
    cfg = load_config(demo_project)
    assert "class_maps" not in [s.name for s in stages_for(cfg)]
    cfg = load_config(demo_project, overrides=["heatmap_arguments.classes=all"])
    # every row would fail the same way: refused once, before any row (exit 2 from the CLI)
    with pytest.raises(GlobalInputError, match="one attention map per class .* set classes"):
        run_pipeline(cfg, stages=["segment", "infer", "class_maps"])
    assert not list(Path(cfg.exp_arguments.raw_save_dir).rglob("*.ledger.json"))  # no row ran


def test_unknown_class_name_is_a_config_error(demo_project: Path) -> None:
    from clam_heat.errors import ConfigError

    with pytest.raises(ConfigError, match="label_dict"):
        load_config(demo_project, overrides=["heatmap_arguments.classes=[tumor]"])
