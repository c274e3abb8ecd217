"""``compare_runs`` on real demo runs (identical, negated attention, halved grid with one slide's
features scrambled) and the metric functions on hand-worked arrays."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from clam_heat.compare import (
    CompareError,
    compare_runs,
    match_coords,
    pearson,
    run_outputs,
    spearman,
    topk_jaccard,
)
from clam_heat.config import load_config
from clam_heat.executors import make_executor
from clam_heat.runner import run_pipeline

SCRAMBLED = "demo_002"


# ------------------------------------------------------------------ hand-worked metric values


def test_spearman_hand_worked_with_ties() -> None:
    # ranks of y = [5, 6, 7, 8, 7] are [1, 2, 3.5, 5, 3.5]; x ranks 1..5 (both means 3)
    # sum(dx*dy) = 4 + 1 + 0 + 2 + 1 = 8, sum(dx^2) = 10, sum(dy^2) = 9.5 -> 8 / sqrt(95)
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([5.0, 6.0, 7.0, 8.0, 7.0])
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95))
    assert spearman(x, -y) == pytest.approx(-8 / math.sqrt(95))
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, x**3) < 0.95
    assert math.isnan(spearman(x, np.ones(5)))  # a constant map has no ranking


def test_pearson_hand_worked() -> None:
    # dx = [-1, 0, 1], dy = [-2, 0, 2] -> 1; dy = [1, -2, 1] -> 0
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0])) == pytest.approx(1.0)
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, -1.0, 2.0])) == pytest.approx(0.0)


def test_topk_jaccard_hand_worked() -> None:
    a = np.array([0.9, 0.8, 0.1, 0.2])  # top-2: {0, 1}
    b = np.array([0.9, 0.1, 0.8, 0.2])  # top-2: {0, 2}
    assert topk_jaccard(a, b, 2) == pytest.approx(1 / 3)  # {0} / {0, 1, 2}
    assert topk_jaccard(a, a, 2) == 1.0
    assert topk_jaccard(a, -a, 2) == 0.0  # {0, 1} vs {2, 3}
    assert topk_jaccard(a, b, 4) == 1.0  # k = N: everything


def test_match_coords_hand_worked() -> None:
    a = np.array([[0, 0], [256, 0], [512, 0], [0, 256]])
    b = np.array([[512, 0], [768, 768], [0, 0], [0, 256]])  # shuffled, one new, one missing
    ia, ib = match_coords(a, b)
    assert ia.tolist() == [0, 2, 3] and ib.tolist() == [2, 0, 3]
    # x and y are not interchangeable: (0, 256) must not match (256, 0)
    ia, ib = match_coords(np.array([[0, 256]]), np.array([[256, 0]]))
    assert len(ia) == 0 and len(ib) == 0


# ------------------------------------------------------------------ real demo runs


def _run(config: Path) -> None:
    summary = run_pipeline(load_config(config), stages=("infer",), executor=make_executor("serial"))
    assert summary.ok, summary.failed


def _halve_and_scramble(features: Path, scramble: bool, seed: int) -> None:
    """Keep every other patch (a different grid); with ``scramble`` shuffle the feature rows so
    attention lands on the wrong coordinates (a planted difference on that slide only)."""
    with h5py.File(features, "r+") as h5:
        feats, coords = h5["features"][:], h5["coords"][:]
        f_attrs, c_attrs = dict(h5["features"].attrs), dict(h5["coords"].attrs)
        keep = np.arange(0, len(coords), 2)
        feats, coords = feats[keep], coords[keep]
        if scramble:
            feats = feats[np.random.default_rng(seed).permutation(len(feats))]
        for name, data, attrs in (("features", feats, f_attrs), ("coords", coords, c_attrs)):
            del h5[name]
            h5.create_dataset(name, data=data)
            h5[name].attrs.update(attrs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare_runs")
    shutil.copytree(demo_source, root / "a")
    _run(root / "a" / "config.yaml")
    shutil.copytree(root / "a", root / "same")  # an identical run, outputs and all

    shutil.copytree(demo_source, root / "neg")
    ckpt = root / "neg" / "ckpts" / "s_0_checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    names = [k for k in state if k.endswith(("attention_c.weight", "attention_c.bias"))]
    assert len(names) == 2, list(state)
    for name in names:  # negated attention logits: every ranking reverses
        state[name] = -state[name]
    torch.save(state, ckpt)
    _run(root / "neg" / "config.yaml")

    shutil.copytree(demo_source, root / "half")
    for features in sorted((root / "half" / "features").glob("*.h5")):
        _halve_and_scramble(features, features.stem == SCRAMBLED, seed=3)
    _run(root / "half" / "config.yaml")
    return {name: root / name / "config.yaml" for name in ("a", "same", "neg", "half")}


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"slide_id": str, "pred_a": str, "pred_b": str})


def test_identical_runs_agree_fully(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    summary = compare_runs(runs["a"], runs["same"], out)
    df = _csv(out / "comparison.csv")
    assert list(df.columns[:8]) == [
        "slide_id",
        "n_patches",
        "spearman",
        "pearson",
        "topk_jaccard",
        "pred_a",
        "pred_b",
        "agree",
    ]
    assert len(df) == 5 and sorted(df["slide_id"]) == [f"demo_{i:03d}" for i in range(5)]
    assert np.allclose(df["spearman"], 1.0) and np.allclose(df["pearson"], 1.0)
    assert np.allclose(df["topk_jaccard"], 1.0) and df["agree"].all()
    assert (df["n_only_a"] == 0).all() and (df["n_only_b"] == 0).all()
    blockmaps = sorted((runs["a"].parent / "heatmaps").rglob("*_blockmap.h5"))
    with h5py.File(blockmaps[0]) as h5:
        n0 = len(h5["coords"])
    assert int(df.loc[df["slide_id"] == blockmaps[0].name[:8], "n_patches"].iloc[0]) == n0
    data = json.loads((out / "summary.json").read_text())
    assert data["means"]["spearman"] == pytest.approx(1.0) and data["means"]["agree"] == 1.0
    assert summary.only_in_a == [] and summary.only_in_b == []

    image = cv2.imread(str(out / "demo_000_compare.png"))
    assert image is not None and image.shape[1] > 3 * image.shape[0] / 2  # three panels
    third = (image.shape[1] - 16) // 3
    diff_panel = image[40:, 2 * third + 16 :].astype(int)
    # identical runs: the difference panel is the colormap's neutral centre (near white) over
    # the tissue, nowhere the saturated red or blue the negated run shows (next test)
    assert (np.abs(diff_panel[..., 2] - diff_panel[..., 0]) > 60).sum() == 0


def test_negated_attention_is_found(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    summary = compare_runs(runs["a"], runs["neg"], out, topk=5)
    df = _csv(out / "comparison.csv")
    assert len(df) == 5
    assert (df["spearman"] < -0.99).all(), df[["slide_id", "spearman"]]
    assert (df["topk_jaccard"] == 0.0).all() and (df["topk"] == 5).all()
    assert summary.means["spearman"] < -0.99
    for sid in df["slide_id"]:
        assert (out / f"{sid}_compare.png").is_file()
    image = cv2.cvtColor(cv2.imread(str(out / "demo_000_compare.png")), cv2.COLOR_BGR2RGB)
    third = (image.shape[1] - 16) // 3
    diff_panel = image[40:, 2 * third + 16 :].astype(int)
    red = (diff_panel[..., 0] - diff_panel[..., 2]) > 60
    blue = (diff_panel[..., 2] - diff_panel[..., 0]) > 60
    assert red.sum() > 100 and blue.sum() > 100  # reversed ranks: strong both ways


def test_different_grids_and_one_scrambled_slide(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    summary = compare_runs(runs["a"], runs["half"], out)
    df = _csv(out / "comparison.csv").set_index("slide_id")
    for sid in df.index:
        with h5py.File(runs["a"].parent / "features" / f"{sid}.h5") as h5:
            n_a = len(h5["coords"])
        n_half = len(range(0, n_a, 2))
        assert df.loc[sid, "n_patches"] == n_half
        assert df.loc[sid, "n_only_a"] == n_a - n_half and df.loc[sid, "n_only_b"] == 0
    others = df.drop(index=SCRAMBLED)
    assert np.allclose(others["spearman"], 1.0, atol=1e-6)
    assert df.loc[SCRAMBLED, "spearman"] < 0.6
    assert summary.most_disagreeing[0] == SCRAMBLED
    data = json.loads((out / "summary.json").read_text())
    assert data["most_disagreeing"][0]["slide_id"] == SCRAMBLED
    assert data["n_patches_only_a"] == int(df["n_only_a"].sum()) > 0


def test_rows_are_matched_by_coordinates_not_by_position(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Run B is run A with every score file's rows shuffled (scores and coords together): the
    same patches carry the same scores, so each slide agrees fully; and B with its scores
    negated ranks every patch the other way round."""
    for name, sign in (("shuffled", 1.0), ("shuffled_negated", -1.0)):
        folder = tmp_path / name
        shutil.copytree(runs["same"].parent, folder)
        for i, path in enumerate(sorted(folder.rglob("*_blockmap.h5"))):
            with h5py.File(path, "r+") as h5:
                scores, coords = h5["attention_scores"][:], h5["coords"][:]
                order = np.random.default_rng(i).permutation(len(coords))
                assert (order != np.arange(len(order))).any()
                h5["attention_scores"][:] = sign * scores[order]
                h5["coords"][:] = coords[order]
    summary = compare_runs(runs["a"], tmp_path / "shuffled" / "config.yaml", tmp_path / "same")
    assert len(summary.rows) == 5
    for row in summary.rows:
        assert row.n_patches > 2 and row.n_only_a == row.n_only_b == 0
        assert row.spearman == pytest.approx(1.0) and row.pearson == pytest.approx(1.0)
        assert row.topk_jaccard == 1.0
    negated = tmp_path / "shuffled_negated" / "config.yaml"
    summary = compare_runs(runs["a"], negated, tmp_path / "neg", pictures=False)
    for row in summary.rows:
        assert row.spearman == pytest.approx(-1.0) and row.pearson == pytest.approx(-1.0)


def test_only_finished_slides_are_compared(runs: dict[str, Path], tmp_path: Path) -> None:
    # a copy of run A with one slide's inference never finished
    folder = tmp_path / "partial"
    shutil.copytree(runs["same"].parent, folder)
    for ledger in folder.rglob("demo_004.ledger.json"):
        ledger.unlink()
    assert set(run_outputs(folder / "config.yaml")) == {f"demo_{i:03d}" for i in range(4)}
    summary = compare_runs(runs["a"], folder / "config.yaml", tmp_path / "cmp", pictures=False)
    assert [r.slide_id for r in summary.rows] == [f"demo_{i:03d}" for i in range(4)]
    assert summary.only_in_a == ["demo_004"]
    assert not list((tmp_path / "cmp").glob("*.png"))


def test_no_shared_slides_is_an_error(demo_project: Path, runs: dict[str, Path]) -> None:
    with pytest.raises(CompareError, match="no slide finished in both runs"):
        compare_runs(runs["a"], demo_project, demo_project.parent / "cmp")


def test_predictions_agree_by_class_index_whatever_the_names(
    runs: dict[str, Path], demo_source: Path, tmp_path: Path
) -> None:
    """The same model, one run naming its classes (normal, tumour), the other by index.
    Catches: predictions compared as strings ('tumour' != '1': 0 % agreement), and a naming
    difference that goes unsaid."""
    from typer.testing import CliRunner

    from clam_heat.cli import app

    folder = tmp_path / "by_index"
    shutil.copytree(demo_source, folder)
    config = folder / "config.yaml"
    text = config.read_text()
    assert "    normal: 0\n    tumour: 1\n" in text
    config.write_text(text.replace("    normal: 0\n    tumour: 1\n", "    '0': 0\n    '1': 1\n"))
    _run(config)
    assert {o.pred for o in run_outputs(config).values()} <= {"0", "1"}  # really other names
    assert {o.pred for o in run_outputs(runs["a"]).values()} <= {"normal", "tumour"}

    summary = compare_runs(runs["a"], config, tmp_path / "cmp", pictures=False)
    assert summary.means["agree"] == 1.0
    assert [(r.pred_a, r.pred_b) for r in summary.rows if r.pred_a == "tumour"] == [
        ("tumour", "1") for r in summary.rows if r.pred_a == "tumour"
    ]  # shown by each run's own name
    note = "class names differ (compared by index): 0 is 'normal' in A, '0' in B; 1 is 'tumour' in A, '1' in B"  # noqa: E501
    assert summary.class_note == note
    data = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert data["class_names_differ"] == note and data["means"]["agree"] == 1.0

    shown = CliRunner().invoke(app, ["compare", str(runs["a"]), str(config), "--out",
                                     str(tmp_path / "cmp2"), "--no-pictures"])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "predictions agree on 100%" in shown.output
    assert shown.output.count("class names differ") == 1
