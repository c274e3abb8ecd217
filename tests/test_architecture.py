"""The plug-in spine holds: imports only go down the layers, a model registered from outside the
package runs the whole demo pipeline, the overlap pass works for every registered attention
model, and a heatmap export added from outside is written by the heatmap stage
(docs/architecture.md)."""

from __future__ import annotations

import ast
import shutil
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from clam_heat.config import load_config
from clam_heat.errors import ConfigError
from clam_heat.runner import run_pipeline

PACKAGE = Path(__file__).resolve().parents[1] / "clam_heat"

#: The layering rule of docs/architecture.md: a room may import only rooms on a
#: lower layer (and itself). ``config`` may import the torch-free ``models.registry`` (the one
#: list of model names it validates against), nothing else of ``models``.
LAYERS: dict[str, int] = {
    "errors": 0,
    "lazy": 0,
    "formats": 0,
    "colormaps": 0,
    "__version__": 0,
    "atomic": 1,
    "devices": 1,
    "threads": 1,
    "memory": 1,
    "model_process": 1,
    "slide": 2,
    "ledger": 2,
    "h5io": 2,
    "features": 3,
    "trackers": 2,
    "list_status": 2,
    "config": 3,
    "process_list": 3,
    "models": 4,
    "explain": 5,
    "tissue": 4,
    "heatmap": 5,
    "rows": 5,
    "encoders": 6,
    "sampling": 6,
    "cohort": 6,
    "training": 6,
    "demo": 6,
    "stages": 7,
    "executors": 8,
    "phases": 8,
    "tracking_hook": 8,
    "preflight": 8,
    "runner": 9,
    "quick": 10,
    "compare": 10,
    "video": 11,
    "viewer": 11,
    "doctor": 11,
    "cli": 13,
    "__main__": 14,
}
ALLOWED_UPWARD = {
    ("config", "clam_heat.models.registry"),
    ("config", "clam_heat.explain.registry"),  # the torch-free list of method names
}


def _imports() -> dict[str, set[str]]:
    """Every ``clam_heat`` module each package module imports (lazy imports included)."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                if node.module:
                    found[module].add(".".join([*base, node.module]))
                else:
                    found[module].update(".".join([*base, a.name]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clam_heat"):
                found[module].add(str(node.module))
            elif isinstance(node, ast.Import):
                found[module].update(a.name for a in node.names if a.name.startswith("clam_heat"))
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "clam_heat"


def test_imports_only_go_down_the_layers() -> None:
    """Catches an import circle or a lower layer reaching up (e.g. executors importing runner,
    the viewer importing the runner for paths, config importing torch-heavy models)."""
    wrong = []
    for module, targets in _imports().items():
        room = _room(module)
        if room == "clam_heat":
            continue
        assert room in LAYERS, f"{module}: new room {room!r}: give it a layer in this test"
        for target in targets:
            other = _room(target)
            if other in (room, "clam_heat"):
                continue
            assert other in LAYERS, f"{target}: unknown room"
            if LAYERS[other] >= LAYERS[room] and (room, target) not in ALLOWED_UPWARD:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_layer_rule_is_not_vacuous() -> None:
    """The import scan sees real edges (a broken scan would pass the layering test)."""
    edges = _imports()
    assert "clam_heat.stages.row" in edges["clam_heat.executors.base"] or any(
        t.startswith("clam_heat.stages") for t in edges["clam_heat.executors.base"]
    )
    assert any(t.startswith("clam_heat.executors") for t in edges["clam_heat.runner"])


# ---------------------------------------------------------------------------- plug-in models

ENCODER = [
    "heatmap_arguments.calc_heatmap=true",
    "patching_arguments.overlap=0.5",
    "encoder_arguments.model_name=tiny_cnn",
    "encoder_arguments.target_img_size=64",
    "exp_arguments.batch_size=64",
    "sample_arguments.samples=[]",
]


class ToyMIL(nn.Module):
    """A user's model: per-patch score, attention-pooled linear head."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self.score = nn.Linear(in_dim, 1)
        self.head = nn.Linear(in_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(h)[:, 0]
        pooled = torch.softmax(scores, 0) @ h
        return self.head(pooled)[None], scores


@pytest.fixture
def toy_model() -> object:
    from clam_heat.models import register_model, unregister_model

    register_model(
        "toy", lambda *, in_dim, n_classes: ToyMIL(in_dim, n_classes), key_prefix="", per_patch=True
    )
    yield "toy"
    unregister_model("toy")


def _one_slide(config: Path) -> None:
    import pandas as pd

    cfg = load_config(config)
    pd.read_csv(cfg.process_list_path).head(1).to_csv(cfg.process_list_path, index=False)


def test_a_model_registered_in_a_test_runs_the_demo_pipeline(
    demo_project: Path, toy_model: str
) -> None:
    """Catches a model name list kept outside the registry (config would refuse ``toy``) or a
    stage special-casing CLAM (the overlap pass would refuse a non-CLAM model)."""
    from clam_heat.models import build_model, unregister_model

    _one_slide(demo_project)
    embed_dim = load_config(demo_project).model_arguments.embed_dim
    torch.manual_seed(0)
    ckpt = demo_project.parent / "ckpts" / "toy.pt"
    torch.save(build_model("toy", n_classes=2, embed_dim=embed_dim).state_dict(), ckpt)
    overrides = [
        *ENCODER,
        "model_arguments.model_type=toy",
        f"model_arguments.ckpt_path={ckpt}",
        "exp_arguments.save_exp_code=toy",
    ]
    cfg = load_config(demo_project, overrides=overrides)
    summary = run_pipeline(cfg)
    assert summary.ok and summary.counts == {"done": 1}, summary.failed
    assert {"segment", "infer", "overlap", "heatmap"} <= set(summary.stage_seconds)
    again = run_pipeline(cfg)
    assert again.stage_seconds == {}  # resumable like any built-in model
    unregister_model("toy")
    with pytest.raises(ConfigError, match="model_type"):
        load_config(demo_project, overrides=overrides)


@pytest.mark.slow
def test_the_overlap_pass_works_for_every_registered_model(demo_project: Path) -> None:
    """Catches a model whose per-patch attention cannot be drawn by CLAM's overlapping pass
    (today's regression would be 'overlap heatmaps need a CLAM model')."""
    from clam_heat.models import build_model, get_model_spec, registered_models

    _one_slide(demo_project)
    embed_dim = load_config(demo_project).model_arguments.embed_dim
    checked = []
    for model_type in registered_models():
        if not get_model_spec(model_type).has_attention:
            continue  # mil_fc, mil_fc_mc, wikg, dftd: no attention map (tests/test_explain)
        torch.manual_seed(0)
        model = build_model(model_type, n_classes=2, embed_dim=embed_dim)
        ckpt = demo_project.parent / "ckpts" / f"{model_type}.pt"
        torch.save(model.state_dict(), ckpt)
        exp = f"overlap_{model_type}"
        cfg = load_config(
            demo_project,
            overrides=[
                *ENCODER,
                f"model_arguments.model_type={model_type}",
                f"model_arguments.ckpt_path={ckpt}",
                f"exp_arguments.save_exp_code={exp}",
                # the bag from the same encoder as the overlap pass, so that use_ref_scores
                # compares like with like
                "runner_arguments.features_dir=null",
                "runner_arguments.extract_features=true",
            ],
        )
        summary = run_pipeline(cfg)
        assert summary.ok, (model_type, summary.failed)
        raw = Path(cfg.exp_arguments.raw_save_dir) / exp
        (overlap,) = raw.rglob("*_0.5_roi_False.h5")
        with h5py.File(overlap) as h5:
            scores = h5["attention_scores"][:].reshape(-1)
            n_coords = h5["coords"].shape[0]
        assert scores.shape == (n_coords,) and n_coords > 0, model_type
        assert np.isfinite(scores).all(), model_type
        # use_ref_scores (the template's default): percentiles of the blockmap's scores
        assert scores.min() >= 0 and scores.max() <= 100, model_type
        assert np.unique(scores).size > 1, model_type  # a flat map would mean no attention
        shutil.rmtree(raw)
        checked.append(model_type)
    assert {"clam_sb", "clam_mb", "abmil", "transmil", "dsmil", "ilra", "rrt"} <= set(checked)


def test_an_export_added_from_outside_is_written_beside_the_heatmap(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heatmap stage's exports are a table: a new one (the drawn patches as ``.npy``, on
    the GeoJSON's switch) is one writer plus one row, and the stage writes it, reports it as
    an output and reruns when its switch flips."""
    from demo_state import done_stages, row_contexts

    from clam_heat.executors import make_executor
    from clam_heat.h5io import read_scores
    from clam_heat.heatmap import writers
    from clam_heat.ledger import Ledger
    from clam_heat.rows import attention_geojson_path, blockmap_h5_path
    from clam_heat.stages import exports

    def write_npy(coords: np.ndarray, scores: np.ndarray, size: int, path: Path) -> Path:
        np.save(path, np.column_stack([coords, scores, np.full(len(scores), size)]))
        return path

    def npy_path(ctx) -> Path:
        return ctx.raw_dir / f"{ctx.slide_id}_patches.npy"

    monkeypatch.setitem(writers.EXPORTS, "patches_npy", writers.Export(write=write_npy))
    row = exports.HeatmapExport("patches_npy", "write_geojson", npy_path)
    monkeypatch.setattr(exports, "HEATMAP_EXPORTS", (*exports.HEATMAP_EXPORTS, row))
    stages = ("segment", "infer", "heatmap")
    serial = make_executor("serial")
    assert run_pipeline(load_config(demo_project), stages=stages, executor=serial).ok
    cfg = load_config(demo_project, overrides=["runner_arguments.write_geojson=true"])
    before = done_stages(cfg)
    assert run_pipeline(cfg, stages=stages, executor=serial).ok
    changed = {stage for (_, stage), rec in done_stages(cfg).items() if before[_, stage] != rec}
    assert changed == {"heatmap"}
    for ctx in row_contexts(cfg):
        scores, coords, size = read_scores(blockmap_h5_path(ctx))  # the bag's scores, drawn
        table = np.load(npy_path(ctx))
        np.testing.assert_array_equal(table[:, :2], coords)
        np.testing.assert_array_equal(table[:, 2], scores)
        assert set(table[:, 3]) == {size}
        outputs = Ledger.load(ctx.ledger_path).record("heatmap")["outputs"]
        assert outputs[-2:] == [str(attention_geojson_path(ctx)), str(npy_path(ctx))]
