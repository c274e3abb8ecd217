"""`clam-heat quick`: flags instead of YAML, on the generated demo project (CliRunner)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from clam_heat.cli import app
from clam_heat.config import load_config
from clam_heat.heatmap.meta import read_meta

runner = CliRunner()


@pytest.fixture()
def inputs(demo_source: Path, tmp_path: Path) -> dict[str, Path]:
    """Two slides with features, one H5 without a slide, one slide without an H5."""
    src = demo_source
    ckpt = tmp_path / "ckpts" / "s_0_checkpoint.pt"
    feats, slides = tmp_path / "features", tmp_path / "slides"
    for folder in (ckpt.parent, feats, slides):
        folder.mkdir()
    shutil.copy(src / "ckpts" / "s_0_checkpoint.pt", ckpt)
    for sid in ("demo_000", "demo_001", "demo_002"):
        shutil.copy(src / "features" / f"{sid}.h5", feats)
    for sid in ("demo_000", "demo_001", "demo_004"):
        shutil.copy(src / "slides" / f"{sid}.tiff", slides)
    (slides / "README.txt").write_text("not a slide")
    return {"ckpt": ckpt, "h5": feats, "slides": slides, "out": tmp_path / "out"}


def _quick(paths: dict[str, Path], *extra: str) -> list[str]:
    return [
        "quick",
        "--ckpt",
        str(paths["ckpt"]),
        "--h5-dir",
        str(paths["h5"]),
        "--slide-dir",
        str(paths["slides"]),
        "--out",
        str(paths["out"]),
        "-q",
        *extra,
    ]


def _ledgers(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.ledger.json")}


def test_quick_runs_matched_slides_and_saves_a_config_run_reuses(inputs: dict[str, Path]) -> None:
    out = inputs["out"]
    first = runner.invoke(app, _quick(inputs))
    assert first.exit_code == 0, first.output
    assert "rows: 2 done" in first.output
    assert (
        f"warning: 1 H5 file in {inputs['h5']} has no '*.tiff' slide in {inputs['slides']}, "
        "skipped: demo_002" in first.output
    )
    assert (
        f"warning: 1 slide in {inputs['slides']} has no H5 in {inputs['h5']}, skipped: "
        "demo_004" in first.output
    )
    prod = out / "heatmap_production_results" / "quick" / "Unspecified"
    for sid in ("demo_000", "demo_001"):
        # MIL-Lab's defaults: alpha 0.5, vis_level -1 (the heatmap is named by the level as set, the
        # plain image by the level drawn: 3, the nearest 32x of the demo's 1/4/16/32)
        assert len(list(prod.glob(f"{sid}_0.5_roi_0_blur_0_rs_1_bc_0_a_0.5_l_-1_*.jpg"))) == 1
        assert (prod / f"{sid}_orig_3.jpg").is_file()
        sampled = list((prod.parent / "sampled_patches").glob(f"*/topk_high_attention/*_{sid}_*"))
        assert len(sampled) == 15
    plist = pd.read_csv(out / "process_list.csv", dtype={"slide_id": str})
    assert plist["slide_id"].tolist() == ["demo_000", "demo_001"]
    assert (plist["status"] == "done").all()
    assert (out / "results" / "process_list.csv").is_file()

    # the saved config is a normal config: inferred values, validates, and `run` has nothing to do
    cfg = load_config(out / "config.yaml")
    assert cfg.model_arguments.embed_dim == 64 and cfg.exp_arguments.n_classes == 2
    assert cfg.data_arguments.slide_ext == ".tiff"
    assert cfg.runner_arguments.features_dir == inputs["h5"]
    assert cfg.data_arguments.data_dir == inputs["slides"]
    assert cfg.exp_arguments.raw_save_dir == out / "heatmap_raw_results"
    assert runner.invoke(app, ["validate", str(out / "config.yaml")]).exit_code == 0
    before = _ledgers(out)
    assert len(before) == 2
    again = runner.invoke(app, ["run", str(out / "config.yaml"), "--quiet"])
    assert again.exit_code == 0, again.output
    assert "rows: 2 done" in again.output and "time per stage" not in again.output

    # the same quick command resumes: no stage reruns, config untouched
    text = (out / "config.yaml").read_text()
    rerun = runner.invoke(app, _quick(inputs))
    assert rerun.exit_code == 0, rerun.output
    assert "time per stage" not in rerun.output
    assert _ledgers(out) == before and (out / "config.yaml").read_text() == text

    # a flag that matters reruns only the stage it affects, and lands in config.yaml
    dry = runner.invoke(app, _quick(inputs, "--set", "heatmap_arguments.alpha=0.4", "--dry-run"))
    assert "demo_000: segment: up to date; infer: up to date; heatmap: changed: " in dry.output
    alpha = runner.invoke(app, _quick(inputs, "--set", "heatmap_arguments.alpha=0.4"))
    assert alpha.exit_code == 0, alpha.output
    stage_line = next(t for t in alpha.output.splitlines() if t.startswith("time per stage"))
    assert re.fullmatch(r"time per stage: heatmap \d+\.\ds", stage_line), stage_line
    assert load_config(out / "config.yaml").heatmap_arguments.alpha == 0.4


def test_quick_labels_and_replaced_config(inputs: dict[str, Path], demo_source: Path) -> None:
    labels = inputs["out"].parent / "labels.csv"
    labels.write_text("slide_id,label\ndemo_000.tiff,tumour\ndemo_001,normal\n")
    result = runner.invoke(app, _quick(inputs, "--labels", str(labels)))
    assert result.exit_code == 0, result.output
    assert (
        f"warning: label_dict guessed from {labels} in sorted order {{normal: 0, tumour: 1}}"
        in result.output
    )
    prod = inputs["out"] / "heatmap_production_results" / "quick"
    assert (prod / "tumour" / "demo_000_orig_3.jpg").is_file()
    assert (prod / "normal" / "demo_001_orig_3.jpg").is_file()
    cfg = load_config(inputs["out"] / "config.yaml")
    assert cfg.data_arguments.label_dict == {"normal": 0, "tumour": 1}

    # changed labels win over the ones already in the list (the slides move to new folders)
    labels.write_text("slide_id,label\ndemo_000,normal\ndemo_001,tumour\n")
    swapped = runner.invoke(app, _quick(inputs, "--labels", str(labels), "--dry-run"))
    assert swapped.exit_code == 0, swapped.output
    plist = pd.read_csv(inputs["out"] / "process_list.csv", dtype={"slide_id": str})
    assert plist.set_index("slide_id")["label"].to_dict() == {
        "demo_000": "normal",
        "demo_001": "tumour",
    }
    assert "demo_000: segment: no previous run" in swapped.output

    # other inputs into the same OUT: the config is replaced, with one line saying so
    other = inputs["h5"].parent / "features_copy"
    shutil.copytree(inputs["h5"], other)
    moved = runner.invoke(app, _quick({**inputs, "h5": other}, "--dry-run"))
    assert moved.exit_code == 0, moved.output
    assert (
        f"warning: {inputs['out'] / 'config.yaml'}: replacing a config for other inputs "
        f"(runner_arguments.features_dir {inputs['h5']} -> {other})" in moved.output
    )
    assert load_config(inputs["out"] / "config.yaml").runner_arguments.features_dir == other


def _headless_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "headless.pt"
    torch.save({"attention_net.0.weight": torch.zeros(8, 64)}, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: {**p, "ckpt": p["ckpt"].with_name("nope.pt")},
            "error: --ckpt {ckpt}: no such file; pass your trained model's state dict (CLAM "
            "s_<fold>_checkpoint.pt, model.safetensors or a save_pretrained folder)",
        ),
        (
            lambda p: {**p, "h5": p["slides"]},
            "error: --h5-dir {h5}: no .h5 files (nor in {h5}/h5_files); pass the folder holding "
            "<slide_id>.h5 feature files (TRIDENT features_<encoder>/ or CLAM's feat_dir)",
        ),
        (
            lambda p: {**p, "ckpt": _headless_checkpoint(p["out"].parent)},
            "error: --ckpt {ckpt}: cannot read the number of classes (no classifier head we "
            "know); pass --n-classes",
        ),
    ],
    ids=["missing-ckpt", "no-h5", "headless-ckpt"],
)
def test_quick_bad_inputs_exit_2_naming_the_path(
    inputs: dict[str, Path], change, message: str
) -> None:
    paths = change(inputs)
    result = runner.invoke(app, _quick(paths))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == message.format(**paths)
    assert not (inputs["out"] / "config.yaml").exists()


def test_quick_wrong_embed_dim_names_the_h5_and_its_width(inputs: dict[str, Path]) -> None:
    result = runner.invoke(app, _quick(inputs, "--embed-dim", "128"))
    assert result.exit_code == 2
    h5 = inputs["h5"] / "demo_000.h5"
    assert result.output.strip().splitlines()[-1] == (
        f"error: --embed-dim 128 does not match {h5}: 'features' is 64 wide; drop --embed-dim "
        "or pass --h5-dir with the model's features"
    )
    ok = runner.invoke(app, _quick(inputs, "--embed-dim", "64", "--n-classes", "2", "--dry-run"))
    assert ok.exit_code == 0, ok.output
    wrong = runner.invoke(app, _quick(inputs, "--n-classes", "3", "--dry-run"))
    assert wrong.exit_code == 2
    assert f"--n-classes 3 does not match --ckpt {inputs['ckpt']}: its classifier has 2" in (
        wrong.output
    )


def test_quick_ambiguous_slide_extension_asks_for_slide_ext(inputs: dict[str, Path]) -> None:
    shutil.copy(inputs["slides"] / "demo_001.tiff", inputs["slides"] / "demo_002.svs")
    result = runner.invoke(app, _quick(inputs))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --slide-dir: the slides matching the H5 files have 2 extensions (.svs: demo_002; "
        ".tiff: demo_000, demo_001); pass --slide-ext to pick one"
    )
    picked = runner.invoke(app, _quick(inputs, "--slide-ext", ".svs", "--dry-run"))
    assert picked.exit_code == 0, picked.output
    assert "demo_002: segment: no previous run" in picked.output


# ------------------------------------------------------------------------------ MIL-Lab flags


def _mil_lab_inputs(demo_source: Path, tmp_path: Path) -> dict[str, Path]:
    """MIL-Lab's layout: all five demo slides and features, and a slides.csv naming three
    of them (one with its extension) plus one id that has no slide."""
    (tmp_path / "slides.csv").write_text(
        "slide_id,label\ndemo_004.tiff,tumour\ndemo_001,normal\ndemo_002,tumour\ndemo_999,normal\n"
    )
    return {
        "ckpt": demo_source / "ckpts" / "s_0_checkpoint.pt",
        "h5": demo_source / "features",
        "slides": demo_source / "slides",
        "out": tmp_path / "heatmaps" / "panda_results",
        "csv": tmp_path / "slides.csv",
    }


def test_mil_lab_flags_write_the_scripts_outputs_and_resume(
    demo_source: Path, tmp_path: Path
) -> None:
    """The script's own command line, underscores then dashes; --csv picks and labels slides,
    --limit takes the first N in sorted order, drawing flags reach the config."""
    p = _mil_lab_inputs(demo_source, tmp_path)
    underscores = [
        "quick", "--checkpoint", str(p["ckpt"]), "--h5_dir", str(p["h5"]),
        "--slide_dir", str(p["slides"]), "--output_dir", str(p["out"]), "--slide_ext", ".tiff",
        "--limit", "2", "--csv", str(p["csv"]), "--cmap", "plasma", "--alpha", "0.5",
        "--vis_level", "2", "--num_classes", "2", "--model_name", "clam_sb", "--no_segment", "-q",
    ]  # fmt: skip
    first = runner.invoke(app, underscores)
    assert first.exit_code == 0, first.output
    listed = f"1 slide listed in {p['csv']} has no slide and H5 pair, skipped: demo_999"
    assert listed in first.output
    out = p["out"]
    cfg = load_config(out / "config.yaml")
    heat = cfg.heatmap_arguments
    assert (heat.cmap, heat.alpha, heat.vis_level) == ("plasma", 0.5, 2)
    assert cfg.runner_arguments.segment_heatmap is False
    assert cfg.model_arguments.model_type == "clam_sb" and cfg.exp_arguments.n_classes == 2
    # --csv {004, 001, 002} -> sorted -> --limit 2 -> 001, 002; labels from its label column
    plist = pd.read_csv(out / "process_list.csv", dtype={"slide_id": str})
    assert dict(zip(plist["slide_id"], plist["label"], strict=True)) == {
        "demo_001": "normal", "demo_002": "tumour"
    }  # fmt: skip
    table = pd.read_csv(out / "heatmap_results.csv", dtype={"slide_id": str})
    assert list(table.columns) == [
        "slide_id", "num_patches", "prediction", "probabilities",
        "attention_mean", "attention_std", "heatmap_path",
    ]  # fmt: skip
    assert table["slide_id"].tolist() == ["demo_001", "demo_002"]
    results = pd.read_csv(out / "results" / "process_list.csv", dtype={"slide_id": str})
    names = ["normal", "tumour"]  # label_dict order: class 0, class 1
    for row, res in zip(table.itertuples(), results.itertuples(), strict=True):
        probs = [float(v) for v in row.probabilities.strip("[]").split(",")]
        # class order, not CLAM's rank order: prob_<label> columns, in label_dict index order
        assert probs == pytest.approx([res.prob_normal, res.prob_tumour], abs=1e-6)
        assert row.prediction == names[int(np.argmax(probs))] == res.Pred_0
        assert res.p_0 == pytest.approx(max(probs), abs=1e-6)  # p_0 is the TOP probability
        assert row.num_patches == res.bag_size
        assert row.attention_mean == pytest.approx(res.attention_mean)
        png = out / f"{row.slide_id}_heatmap.png"
        assert row.heatmap_path == str(png)
        prod = list((out / "heatmap_production_results" / "quick").glob(
            f"*/{row.slide_id}_0.5_roi_0_blur_0_rs_1_bc_0_a_0.5_l_2_*.jpg"
        ))  # fmt: skip
        assert len(prod) == 1
        assert np.array_equal(cv2.imread(str(png)), cv2.imread(str(prod[0])))  # same pixels
        assert read_meta(png) == read_meta(prod[0]) and read_meta(png)["cmap"]  # same colour bar
    # one slide is predicted class 1: there p_0 is NOT class 0's probability
    assert (results["Pred_0"] == "tumour").any()
    tumour = results.loc[results["Pred_0"] == "tumour"].iloc[0]
    assert tumour["p_0"] == tumour["prob_tumour"] != tumour["prob_normal"]
    assert (
        not (out / "demo_000_heatmap.png").exists() and not (out / "demo_004_heatmap.png").exists()
    )

    # the dash spellings, --limit 3: the two finished slides are not redone, the third runs
    before = {s: _png_time(out, s) for s in ("demo_001", "demo_002")}
    dashes = [a.replace("_", "-") if a.startswith("--") else a for a in underscores]
    dashes[dashes.index("--limit") + 1] = "3"
    again = runner.invoke(app, dashes)
    assert again.exit_code == 0, again.output
    assert "rows: 1 done, 2 already done" in again.output or "rows: 3 done" in again.output
    assert {s: _png_time(out, s) for s in before} == before  # not re-encoded
    table = pd.read_csv(out / "heatmap_results.csv", dtype={"slide_id": str})
    assert table["slide_id"].tolist() == ["demo_001", "demo_002", "demo_004"]
    # without --csv and --limit every matched slide is selected again
    everything = [a for a in dashes if a not in ("--limit", "3", "--csv", str(p["csv"]))]
    assert runner.invoke(app, everything).exit_code == 0
    plist = pd.read_csv(out / "process_list.csv", dtype={"slide_id": str})
    assert (plist["process"] == 1).all() and len(plist) == 5


def _png_time(out: Path, slide_id: str) -> int:
    return (out / f"{slide_id}_heatmap.png").stat().st_mtime_ns


def test_csv_without_a_known_slide_and_bad_limit_are_clear_errors(
    demo_source: Path, tmp_path: Path
) -> None:
    p = _mil_lab_inputs(demo_source, tmp_path)
    p["csv"].write_text("slide_id\nnope_1\nnope_2\n")
    base = [
        "quick", "--checkpoint", str(p["ckpt"]), "--h5_dir", str(p["h5"]),
        "--slide_dir", str(p["slides"]), "--output_dir", str(p["out"]), "-q",
    ]  # fmt: skip
    result = runner.invoke(app, [*base, "--csv", str(p["csv"])])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"error: --csv {p['csv']}: none of its 2 slide_id(s) (nope_1, nope_2) has both a slide "
        "and an H5; check the ids and --slide-dir / --h5-dir"
    )
    p["csv"].write_text("id,label\na,b\n")
    result = runner.invoke(app, [*base, "--csv", str(p["csv"])])
    assert result.exit_code == 2 and "no 'slide_id' column" in result.output
    assert runner.invoke(app, [*base, "--limit", "0"]).exit_code == 2


def _real_slide_inputs(real_slide: Path, demo_source: Path, tmp_path: Path) -> list[str]:
    """MIL-Lab's four required flags for the real one-level Aperio crop, with 64-wide features
    on a full 256-px grid and the demo's CLAM checkpoint."""
    from clam_heat.h5io import write_features_h5

    slides, feats = tmp_path / "slides", tmp_path / "features"
    slides.mkdir(), feats.mkdir()
    shutil.copy(real_slide, slides / "cmu.svs")
    ys, xs = np.mgrid[0 : 2967 - 256 : 256, 0 : 2220 - 256 : 256]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    features = np.random.default_rng(0).standard_normal((len(coords), 64)).astype(np.float32)
    attrs = {"patch_size_level0": 256}
    write_features_h5(feats / "cmu.h5", features, coords, coords_attrs=attrs)
    return [
        "quick", "--checkpoint", str(demo_source / "ckpts" / "s_0_checkpoint.pt"),
        "--h5_dir", str(feats), "--slide_dir", str(slides), "--output_dir", str(tmp_path / "out"),
        "-q",
    ]  # fmt: skip


def test_quick_defaults_run_on_a_real_single_level_slide(
    real_slide: Path, demo_source: Path, tmp_path: Path
) -> None:
    """MIL-Lab's defaults on a real one-level Aperio crop, only the four required flags.
    Catches: a level default the slide does not have (``--vis_level`` 1 failed here with
    ``level 1 does not exist``), and quick's drawing defaults drifting from generate_heatmaps.py
    (vis_level -1, alpha 0.5, jet, no tissue mask)."""
    out = tmp_path / "out"
    result = runner.invoke(app, _real_slide_inputs(real_slide, demo_source, tmp_path))
    assert result.exit_code == 0, result.output
    assert "rows: 1 done" in result.output, result.output
    heat = load_config(out / "config.yaml").heatmap_arguments
    assert (heat.vis_level, heat.alpha, heat.cmap) == (-1, 0.5, "jet")
    assert load_config(out / "config.yaml").runner_arguments.segment_heatmap is False
    image = cv2.imread(str(out / "cmu_heatmap.png"))
    assert image is not None and image.shape == (2967, 2220, 3)  # level 0: the only level


def test_failed_row_reruns_when_its_parameter_changes_and_waits_when_not(
    real_slide: Path, demo_source: Path, tmp_path: Path
) -> None:
    """The issue's session: a level the slide lacks fails the row (its error printed once); the
    same command again runs nothing and says how to retry; fixing the flag reruns the row.
    Catches: failed rows skipped whatever changed, the error printed twice, and a silent
    ``rows: 1 failed`` that does not say what to do."""
    command = _real_slide_inputs(real_slide, demo_source, tmp_path)
    failed = runner.invoke(app, [*command, "--vis_level", "1"])
    assert failed.exit_code == 1, failed.output
    assert failed.output.count("level 1 does not exist (slide has levels 0..0)") == 1, failed.output
    assert "rows: 1 failed" in failed.output and "--retry-failed" not in failed.output

    same = runner.invoke(app, [*command, "--vis_level", "1"])
    assert same.exit_code == 0, same.output  # nothing ran, nothing newly failed
    assert "rows: 1 failed" in same.output and "does not exist" not in same.output
    assert "1 failed row unchanged since it failed: rerun with --retry-failed" in same.output

    fixed = runner.invoke(app, [*command, "--vis_level", "-1"])
    assert fixed.exit_code == 0, fixed.output
    assert "rows: 1 done" in fixed.output and "unchanged since" not in fixed.output
    plist = pd.read_csv(tmp_path / "out" / "process_list.csv", dtype=str, keep_default_na=False)
    assert plist["status"].tolist() == ["done"] and plist["error"].tolist() == [""]


@pytest.mark.parametrize(
    ("model_name", "message"),
    [
        (
            "abmil.base.uni_v2.pc108-24k",
            "error: --model_name abmil.base.uni_v2.pc108-24k: encoder 'uni_v2' gives 1536-wide "
            "features but --h5_dir's {h5}/demo_000.h5 has 64-wide 'features'",
        ),
        ("abmil", "error: --checkpoint: {ckpt}: does not fit abmil ("),
        ("clam_mb", "pass --model_name clam_sb"),
    ],
)
def test_refused_model_names_the_flags_and_leaves_nothing_behind(
    inputs: dict[str, Path], model_name: str, message: str
) -> None:
    """Catches: errors in config-key words (``model_arguments.embed_dim``, ``set model_type:``)
    for a flag the user typed, and a refused start that leaves config.yaml, a process list or
    empty folders in --output_dir."""
    result = runner.invoke(app, _quick(inputs, "--model_name", model_name))
    assert result.exit_code == 2, result.output
    expected = message.format(h5=inputs["h5"], ckpt=inputs["ckpt"])
    assert expected in result.output, result.output
    assert "model_arguments" not in result.output and "set model_type" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not inputs["out"].exists()


def test_a_method_the_model_cannot_give_is_refused_by_its_flag(inputs: dict[str, Path]) -> None:
    """MIL_fc has no attention map, and quick asks for attention unless ``--method`` says
    otherwise: one line naming ``--method`` (not ``heatmap_arguments.method``) and the methods
    that work, exit 2 before any row, nothing left in --output_dir (catches the check made per
    row, or in config words)."""
    from clam_heat.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("mil_fc", n_classes=2, embed_dim=64).state_dict(), inputs["ckpt"])
    result = runner.invoke(app, _quick(inputs, "--model_name", "mil_fc"))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: --method attention: model mil_fc has no per-patch attention map; use one of "
        "gradient_x_input, integrated_gradients, occlusion, instance"
    )
    assert not inputs["out"].exists()
