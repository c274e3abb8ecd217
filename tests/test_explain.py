"""Attribution maps beyond attention (docs/explanations.md), checked against oracles that do not use
:mod:`clam_heat.explain`: plain forward passes, brute-force reruns, hand-built weights."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from clam_heat.config import load_config
from clam_heat.errors import ConfigError
from clam_heat.explain import ExplainOptions, explain_bag
from clam_heat.explain.faithfulness import faithfulness_curves
from clam_heat.explain.registry import methods_for
from clam_heat.models import build_model, get_model_spec, registered_models
from clam_heat.preflight import GlobalInputError
from clam_heat.runner import run_pipeline

D = 16
SMALL = {
    "abmil": {"hidden_dim": 24, "attn_dim": 12},
    "transmil": {"hidden_dim": 32, "num_heads": 4},
    "dsmil": {"hidden_dim": 24, "attn_dim": 8},
    "ilra": {"hidden_dim": 32, "topk": 6},
    "rrt": {
        "hidden_dim": 32,
        "dim_head": 8,
        "pool_dim": 12,
        "num_heads": 1,
    },  # 1 head: the pinv of 256 landmarks is its cost
    "transformer": {"hidden_dim": 32},
    "wikg": {"hidden_dim": 32},
    "dftd": {"hidden_dim": 32, "attention_dim": 8},
}


def _model(name: str, n_classes: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, n_classes=n_classes, embed_dim=D, **SMALL.get(name, {})).eval()


def _classes(name: str) -> int:
    return 3 if name in ("mil_fc_mc", "clam_mb") else 2


def _bag(n: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _plain_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The oracle: the model's own forward pass, float64 where the model is float64."""
    param = next(model.parameters())
    h = torch.from_numpy(x).to(param.dtype)
    with torch.no_grad():
        out = model(h)
    logits = out[0]
    return logits.reshape(-1).double().numpy()


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb", "abmil"])
def test_contributions_sum_to_the_logit_minus_the_bias(name: str) -> None:
    """Catches a contribution that drops a head, a branch or the softmax (float64, 1e-6)."""
    model = _model(name, _classes(name)).double()
    x = _bag()
    logits = _plain_logits(model, x.astype(np.float64))
    head = model.classifiers if name.startswith("clam") else model.model.classifier
    for target in range(_classes(name)):
        bias = (
            float(head[target].bias[0].detach())
            if isinstance(head, torch.nn.ModuleList)
            else float(head.bias[target].detach())
        )
        maps = explain_bag(model, x, ["contribution"], targets=[target])
        total = float(np.sum(maps[("contribution", target)].scores, dtype=np.float64))
        expected = logits[target] - bias
        # scores are stored as float32: compare the float64 sum of the float64 computation
        from clam_heat.explain.bag import Bag
        from clam_heat.explain.contribution import contributions

        exact, _, _ = contributions(Bag(model, torch.from_numpy(x).double()), target)
        assert abs(float(exact.sum()) - expected) <= 1e-6 * abs(expected)
        assert abs(total - expected) <= 1e-5 * abs(expected)  # the stored float32 map


#: Models whose logits jump along the path (a hard choice of patches: DSMIL's critical
#: instance, ILRA's top-k, MIL_fc's top instance, WiKG's top-k neighbours): no quadrature makes
#: IG complete there.
DISCONTINUOUS = {"dsmil", "ilra", "mil_fc", "mil_fc_mc", "wikg"}
#: RRT's ReLU attention and the transformer's class token bend the path often (1.25 % and
#: 1.05 % at 64 steps on this bag), so 128 steps.
STEPS = {"rrt": 128, "transformer": 128}


@pytest.mark.parametrize("name", [n for n in registered_models() if n not in DISCONTINUOUS])
def test_integrated_gradients_are_complete_for_every_registered_model(name: str) -> None:
    """Sum of IG attributions = logit(bag) - logit(baseline) within 1 % at 64 steps, the logits
    from the model's own forward (catches a wrong path, step weights or feature sum). Models
    with a hard patch selection (DISCONTINUOUS) cannot be complete and are not listed."""
    n_classes = _classes(name)
    model = _model(name, n_classes)
    x = _bag(24, seed=1)
    target = int(np.argmax(_plain_logits(model, x)))
    for baseline, base in (
        ("zeros", np.zeros_like(x)),
        ("mean", np.repeat(x.mean(0, keepdims=True), len(x), 0)),
    ):
        opts = ExplainOptions(ig_steps=STEPS.get(name, 64), ig_baseline=baseline)
        got = explain_bag(model, x, ["integrated_gradients"], targets=[target], options=opts)
        total = float(np.sum(got[("integrated_gradients", target)].scores, dtype=np.float64))
        diff = _plain_logits(model, x)[target] - _plain_logits(model, base)[target]
        assert abs(total - diff) <= 0.01 * abs(diff), (name, baseline, total, diff)


def _feature_gradient(model: torch.nn.Module, h: np.ndarray, target: int) -> np.ndarray:
    """d logit_target / d features (N, D) by plain autograd on the features (float64)."""
    x = torch.from_numpy(h).requires_grad_()
    logits = model(x)[0].reshape(-1)
    (grad,) = torch.autograd.grad(logits[target], x)
    return grad.numpy()


@pytest.mark.parametrize("name", ["clam_sb", "abmil", "transmil"])
@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_gradient_maps_equal_autograd_on_the_features(name: str, baseline: str) -> None:
    """Each patch's gradient x input and integrated gradients equal the textbook definitions
    computed by autograd on the (N, D) features and summed over features (float64 model, 8
    midpoints by hand): catches a gate on the wrong patch, a baseline added twice or left out,
    a wrong step weight, or a sum over the wrong axis; completeness alone would not."""
    model = _model(name).double()
    x = _bag(20, seed=4).astype(np.float64)
    target = 1
    gxi = (_feature_gradient(model, x, target) * x).sum(axis=1)
    base = np.zeros_like(x) if baseline == "zeros" else np.repeat(x.mean(0, keepdims=True), 20, 0)
    steps = 8
    alphas = (np.arange(steps) + 0.5) / steps
    mean_grad = sum(_feature_gradient(model, base + a * (x - base), target) for a in alphas) / steps
    ig = (mean_grad * (x - base)).sum(axis=1)
    opts = ExplainOptions(ig_steps=steps, ig_baseline=baseline)
    got = explain_bag(
        model, x, ["gradient_x_input", "integrated_gradients"], targets=[1], options=opts
    )
    np.testing.assert_allclose(got[("gradient_x_input", 1)].scores, gxi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[("integrated_gradients", 1)].scores, ig, rtol=1e-5, atol=1e-6)


def test_wikg_integrated_gradients_are_complete_when_every_patch_is_a_neighbour() -> None:
    """With no more patches than WiKG's top-k (4) the neighbour choice never changes along the
    path, so its forward is smooth and IG must be complete (catches a gradient cut inside the
    graph layer, e.g. a detached neighbour gather). Model and bag are chosen so the logit moves
    by about 0.9: on bags where it moves by 0.02 the quadrature error at ReLU kinks alone is a
    few percent of it."""
    model = _model("wikg", seed=3)
    x = _bag(4, seed=1)
    target = int(np.argmax(_plain_logits(model, x)))
    opts = ExplainOptions(ig_steps=64)
    got = explain_bag(model, x, ["integrated_gradients"], targets=[target], options=opts)
    total = float(np.sum(got[("integrated_gradients", target)].scores, dtype=np.float64))
    diff = _plain_logits(model, x)[target] - _plain_logits(model, np.zeros_like(x))[target]
    assert abs(total - diff) <= 0.01 * abs(diff), (total, diff)


@pytest.mark.parametrize(
    "name", ["clam_sb", "clam_mb", "abmil", "transmil", "dsmil", "mil_fc", "wikg", "dftd"]
)
def test_occlusion_equals_brute_force_reruns(name: str) -> None:
    """Each patch's score = logit(bag) - logit(bag without it), by rerunning the model (catches
    a wrong closed form for linear heads or a mask applied to the wrong patch)."""
    model = _model(name, _classes(name))
    x = _bag(30, seed=2)
    full = _plain_logits(model, x)
    target = int(np.argmax(full))
    got = explain_bag(model, x, ["occlusion"], targets=[target])[("occlusion", target)].scores
    expected = [
        full[target] - _plain_logits(model, np.delete(x, i, axis=0))[target] for i in range(30)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_occlusion_groups_large_bags_spatially() -> None:
    """Above the exact limit, patches of one grid block share one rerun without the block."""
    model = _model("clam_sb")
    x = _bag(16, seed=3)
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 256
    opts = ExplainOptions(occlusion_group=2, occlusion_exact_limit=8)
    got = explain_bag(
        model, x, ["occlusion"], targets=[1], options=opts, coords=coords, patch_size=256
    )
    scores = got[("occlusion", 1)].scores
    block = (coords[:, 0] // 512) * 2 + coords[:, 1] // 512
    full = _plain_logits(model, x)[1]
    for b in range(4):
        inside = block == b
        np.testing.assert_allclose(
            scores[inside], full - _plain_logits(model, x[~inside])[1], rtol=1e-4, atol=1e-5
        )


def test_instance_maps_of_mil_fc_are_its_per_patch_logits() -> None:
    """Oracle: relu(x W1^T + b1) W2^T + b2 in numpy from the state dict (CLAM's MIL_fc keys)."""
    model = _model("mil_fc")
    state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert set(state) == {"fc.0.weight", "fc.0.bias", "classifier.weight", "classifier.bias"}
    x = _bag(20, seed=4)
    hidden = np.maximum(x @ state["fc.0.weight"].T + state["fc.0.bias"], 0)
    expected = hidden @ state["classifier.weight"].T + state["classifier.bias"]
    for target in (0, 1):
        got = explain_bag(model, x, ["instance"], targets=[target])[("instance", target)].scores
        np.testing.assert_allclose(got, expected[:, target], rtol=1e-5, atol=1e-6)


def _planted(n: int = 40, planted: int = 33) -> tuple[torch.nn.Module, np.ndarray]:
    """CLAM_SB whose attention is uniform (zero attention head) and whose class-1 logit reads
    feature 0, which only the planted patch carries."""
    model = _model("clam_sb")
    with torch.no_grad():
        for p in model.attention_net[3].parameters():
            p.zero_()
        first = model.attention_net[0]
        first.bias.zero_()
        first.weight[0].zero_()
        first.weight[0, 0] = 1.0
        first.weight[1:, 0] = 0.0  # feature 0 reaches unit 0 only
        model.classifiers.weight.zero_()
        model.classifiers.weight[1, 0] = 5.0 * n  # logit 5 - 2 with the planted patch
        model.classifiers.bias.copy_(torch.tensor([0.0, -2.0]))
    x = _bag(n, seed=5)
    x[:, 0] = 0.0
    x[planted, 0] = 1.0
    return model, x


def test_planted_patch_ranks_first_and_deletion_beats_random_except_for_attention() -> None:
    model, x = _planted()
    full = _plain_logits(model, x)
    assert int(np.argmax(full)) == 1 and full[1] > 2  # the planted patch makes the prediction
    methods = ["attention", "contribution", "gradient_x_input", "integrated_gradients", "occlusion"]
    maps = explain_bag(model, x, methods, targets=[1])
    attention = maps[("attention", 1)].scores
    assert np.ptp(attention) == 0  # uniform attention: it cannot point at the patch
    for method in methods[1:]:
        assert int(np.argmax(maps[(method, 1)].scores)) == 33, method
    from clam_heat.explain.bag import Bag

    bag = Bag(model, torch.from_numpy(x))
    curves = faithfulness_curves(
        bag, {m: maps[(m, 1)].scores for m in methods}, 1, steps=20, n_random=3, seed=7
    )
    random_area = curves["random"].deletion_auc
    for method in methods[1:]:
        assert curves[method].deletion_auc < 0.5 * random_area, method
        assert curves[method].insertion_auc > curves["random"].insertion_auc, method
    assert curves["attention"].deletion_auc > 0.8 * random_area


def test_methods_a_model_cannot_give_are_refused_in_one_line() -> None:
    assert "contribution" not in methods_for(get_model_spec("transmil"))
    assert methods_for(get_model_spec("mil_fc")) == (
        "gradient_x_input",
        "integrated_gradients",
        "occlusion",
        "instance",
    )
    with pytest.raises(
        ConfigError, match="transmil has no classifier that is linear.*use one of attention"
    ):
        explain_bag(_model("transmil"), _bag(), ["contribution"])
    with pytest.raises(
        ConfigError, match="mil_fc has no per-patch attention map; use one of gradient_x_input"
    ):
        explain_bag(_model("mil_fc"), _bag(), ["attention"])
    for name in ("wikg", "dftd"):  # issue #22: drawable by gradients and occlusion only
        assert methods_for(get_model_spec(name)) == (
            "gradient_x_input",
            "integrated_gradients",
            "occlusion",
        )
        with pytest.raises(ConfigError) as err:
            explain_bag(_model(name), _bag(), ["attention"])
        assert str(err.value) == (
            f"heatmap_arguments.method attention: model {name} has no per-patch attention map; "
            "use one of gradient_x_input, integrated_gradients, occlusion"
        )


def test_every_registered_model_has_a_map_under_some_method() -> None:
    for name in registered_models():
        model = _model(name, _classes(name))
        methods = methods_for(get_model_spec(name))
        maps = explain_bag(model, _bag(12), methods, options=ExplainOptions(ig_steps=4))
        assert {m for m, _ in maps} == set(methods), name
        assert all(np.isfinite(a.scores).all() and a.scores.shape == (12,) for a in maps.values())


def test_config_rejects_unknown_methods_with_a_hint(demo_project: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'integrated_gradients'"):
        load_config(
            demo_project, overrides=["heatmap_arguments.method=[attention, integrated_gradient]"]
        )
    cfg = load_config(demo_project)
    assert cfg.heatmap_arguments.methods() == ["attention"]
    assert "method" not in cfg.block("heatmap_arguments")  # defaults resolve as before


def _one_row(config: Path, n: int = 2) -> None:
    plist = config.parent / "process_lists" / "demo.csv"
    plist.write_text("\n".join(plist.read_text().splitlines()[: n + 1]) + "\n")


@pytest.mark.slow
def test_a_run_with_three_methods_draws_three_maps_and_the_faithfulness_report(
    demo_project: Path, tmp_path: Path
) -> None:
    _one_row(demo_project)
    cfg = load_config(
        demo_project,
        overrides=["heatmap_arguments.method=[attention, contribution, integrated_gradients]"],
    )
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed
    raw = Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code
    prod = Path(cfg.exp_arguments.production_save_dir) / cfg.exp_arguments.save_exp_code
    for method in ("contribution", "integrated_gradients"):
        h5s = sorted(raw.rglob(f"*_{method}_blockmap.h5"))
        assert len(h5s) == 2
        with h5py.File(h5s[0]) as h5:
            assert h5["attention_scores"].shape[1] == 1 and h5.attrs["signed"]
            if method == "integrated_gradients":
                assert h5.attrs["completeness_error"] < 0.05
        assert len(sorted(prod.rglob(f"*_{method}_heatmap.jpg"))) == 2
    assert len(sorted(prod.rglob("*_0.0_roi_0_*.jpg"))) == 2  # CLAM's attention map, as before
    results = pd.read_csv(cfg.results_csv_path)
    for col in (
        "faith_attention_deletion",
        "faith_contribution_insertion",
        "faith_integrated_gradients_deletion",
        "faith_random_deletion",
        "faith_random_insertion",
    ):
        assert results[col].between(0, 1).all(), col
    stem = cfg.results_csv_path.stem
    report = json.loads((cfg.results_csv_path.parent / f"{stem}_faithfulness.json").read_text())
    assert report["slides"] == 2
    assert set(report["methods"]) == {"attention", "contribution", "integrated_gradients", "random"}
    assert (cfg.results_csv_path.parent / f"{stem}_faithfulness.png").stat().st_size > 1000

    # clam-heat compare: two methods of one run, rank agreement per slide
    from clam_heat.compare import compare_runs
    from clam_heat.rows import resolved_config_path

    config = resolved_config_path(cfg)
    summary_ = compare_runs(
        config, config, tmp_path / "cmp", pictures=False, methods=("attention", "contribution")
    )
    assert len(summary_.rows) == 2
    for row in summary_.rows:
        (a_path,) = raw.rglob(f"{row.slide_id}_blockmap.h5")
        (b_path,) = raw.rglob(f"{row.slide_id}_contribution_blockmap.h5")
        with h5py.File(a_path) as ha, h5py.File(b_path) as hb:
            a = pd.Series(ha["attention_scores"][:].reshape(-1))
            b = pd.Series(hb["attention_scores"][:].reshape(-1))
        assert row.spearman == pytest.approx(a.corr(b, method="spearman"), abs=1e-9)


@pytest.mark.slow
def test_default_config_writes_no_explanation_files(demo_project: Path) -> None:
    _one_row(demo_project, 1)
    cfg = load_config(demo_project)
    assert run_pipeline(cfg).ok
    names = [p.name for p in Path(cfg.exp_arguments.raw_save_dir).rglob("*")]
    names += [p.name for p in Path(cfg.exp_arguments.production_save_dir).rglob("*")]
    names += [p.name for p in cfg.results_csv_path.parent.iterdir()]
    assert not [n for n in names if "faithfulness" in n or "_contribution" in n]
    assert not [c for c in pd.read_csv(cfg.results_csv_path).columns if c.startswith("faith_")]


def _one_row_of(demo_project: Path, name: str) -> list[str]:
    """The demo cut to one row, a seeded ``name`` checkpoint saved for its features, and the
    overrides that run it."""
    _one_row(demo_project, 1)
    torch.manual_seed(0)
    width = load_config(demo_project).model_arguments.embed_dim
    ckpt = demo_project.parent / "ckpts" / f"{name}.pt"
    torch.save(build_model(name, n_classes=2, embed_dim=width).state_dict(), ckpt)
    return [f"model_arguments.model_type={name}", f"model_arguments.ckpt_path={ckpt}"]


@pytest.mark.slow
def test_mil_fc_is_drawable_with_instance_and_refused_for_attention(demo_project: Path) -> None:
    common = _one_row_of(demo_project, "mil_fc")
    with pytest.raises(GlobalInputError, match="mil_fc has no per-patch attention map"):
        run_pipeline(load_config(demo_project, overrides=common))  # once, before any row
    cfg = load_config(
        demo_project,
        overrides=[
            *common,
            "heatmap_arguments.method=[instance, occlusion]",
            "exp_arguments.save_exp_code=fc",
        ],
    )
    assert run_pipeline(cfg).ok
    prod = Path(cfg.exp_arguments.production_save_dir) / "fc"
    assert len(list(prod.rglob("*_instance_heatmap.jpg"))) == 1
    assert len(list(prod.rglob("*_occlusion_heatmap.jpg"))) == 1


@pytest.mark.slow
def test_wikg_is_drawable_with_gradients_and_occlusion_and_refused_for_attention(
    demo_project: Path,
) -> None:
    """Issue #22: a MIL-Lab WiKG checkpoint is refused in one line, before any row, under the
    default method; it draws integrated-gradients and occlusion maps once they are asked for;
    asking for attention afterwards, with the scores already computed, is refused again rather
    than drawn from WiKG's placeholder per-patch scores (catches a check made only when the
    infer stage reruns)."""
    common = _one_row_of(demo_project, "wikg")
    refusal = "wikg has no per-patch attention map; use one of gradient_x_input"
    with pytest.raises(GlobalInputError, match=refusal):
        run_pipeline(load_config(demo_project, overrides=common))
    cfg = load_config(
        demo_project,
        overrides=[
            *common,
            "heatmap_arguments.method=[integrated_gradients, occlusion]",
            "exp_arguments.save_exp_code=graph",
        ],
    )
    assert run_pipeline(cfg).ok
    prod = Path(cfg.exp_arguments.production_save_dir) / "graph"
    raw = Path(cfg.exp_arguments.raw_save_dir) / "graph"
    for method in ("integrated_gradients", "occlusion"):
        assert len(list(prod.rglob(f"*_{method}_heatmap.jpg"))) == 1
        (h5,) = raw.rglob(f"*_{method}_blockmap.h5")
        with h5py.File(h5) as f:
            scores = f["attention_scores"][:].reshape(-1)
        assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    attention = load_config(
        demo_project,
        overrides=[
            *common,
            "heatmap_arguments.method=attention",
            "exp_arguments.save_exp_code=graph",
        ],
    )
    with pytest.raises(GlobalInputError, match=refusal):
        run_pipeline(attention)
    assert not list(prod.rglob("*_bi_0_-1.0.jpg"))  # no attention map drawn


@pytest.mark.slow
def test_quick_with_methods_writes_method_pngs_and_faithfulness_columns(
    demo_source: Path, tmp_path: Path
) -> None:
    import shutil

    from typer.testing import CliRunner

    from clam_heat.cli import app

    feats, slides = tmp_path / "features", tmp_path / "slides"
    feats.mkdir()
    slides.mkdir()
    for sid in ("demo_000", "demo_001"):
        shutil.copy(demo_source / "features" / f"{sid}.h5", feats)
        shutil.copy(demo_source / "slides" / f"{sid}.tiff", slides)
    out = tmp_path / "out"
    args = ["quick", "--ckpt", str(demo_source / "ckpts" / "s_0_checkpoint.pt")]
    args += ["--h5-dir", str(feats), "--slide-dir", str(slides), "--out", str(out), "-q"]
    args += ["--method", "attention,integrated_gradients", "--method", "occlusion"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for sid in ("demo_000", "demo_001"):
        assert (out / f"{sid}_heatmap.png").is_file()  # MIL-Lab's attention image, as before
        for method in ("integrated_gradients", "occlusion"):
            assert (out / f"{sid}_{method}_heatmap.png").is_file()
    table = pd.read_csv(out / "heatmap_results.csv")
    assert list(table.columns[:7]) == [
        "slide_id", "num_patches", "prediction", "probabilities",
        "attention_mean", "attention_std", "heatmap_path",
    ]  # fmt: skip
    for col in ("faith_occlusion_deletion", "faith_integrated_gradients_insertion"):
        assert table[col].between(0, 1).all()


def test_the_training_logger_draws_any_method() -> None:
    """``model_attention(method=)`` (behind ``log_model`` and ``log_validation_attention``):
    CLAM_SB's contribution map, by hand from its layers (a_i (W_c . h_i))."""
    from clam_heat.training.maps import model_attention

    model = _model("clam_sb")
    x = _bag(10, seed=6)
    model.train()
    got = model_attention(model, x, class_index=1, method="contribution")
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        h = torch.from_numpy(x)
        emb = model.attention_net[:3](h)
        a = torch.softmax(model.attention_net[3](emb)[:, 0], dim=0)
        expected = (a * (emb @ model.classifiers.weight[1])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_serial_and_local_runs_write_the_same_explanation_bytes(demo_project: Path) -> None:
    """Maps, curves and the summary are the same bytes whatever process runs the row (fixed
    torch threads, random orders seeded from the slide id)."""
    import hashlib
    import shutil

    from clam_heat.executors import LocalExecutor

    _one_row(demo_project)
    pristine = demo_project.parent / "process_lists" / "demo.csv"
    saved = pristine.read_bytes()
    cfg = load_config(
        demo_project,
        overrides=["heatmap_arguments.method=[contribution, integrated_gradients, occlusion]"],
    )
    out = Path(cfg.exp_arguments.raw_save_dir).parent

    def digests() -> dict[str, str]:
        return {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))
            if p.is_file()
            and ("_faithfulness" in p.name or "_blockmap.h5" in p.name)
            or p.name.endswith("_heatmap.jpg")
        }

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_pipeline(cfg).ok
    finally:
        torch.set_num_threads(before)
    serial = digests()
    assert sum("_faithfulness.json" in k for k in serial) == 3  # 2 slides + the cohort summary
    shutil.rmtree(out)
    pristine.write_bytes(saved)
    with LocalExecutor(2) as pool:
        assert run_pipeline(cfg, executor=pool).ok
    assert digests() == serial
