"""End-to-end runner behaviour on generated demo slides: resume, reruns, failures, kill -9."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from demo_state import TINY_ENCODER, done_stages
from PIL import Image

from clam_heat.atomic import is_temp_name, write_text_atomic
from clam_heat.config import load_config
from clam_heat.errors import ConfigError
from clam_heat.ledger import file_identity
from clam_heat.preflight import GlobalInputError
from clam_heat.runner import run_pipeline
from clam_heat.stages import Stage, StageRun, base_fingerprint, registry


def _list(cfg) -> pd.DataFrame:
    return pd.read_csv(cfg.process_list_path, dtype={"slide_id": str}, keep_default_na=False)


def test_full_run_then_nothing_to_redo(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed
    assert summary.counts == {"done": 5}
    df = _list(cfg)
    assert set(df["status"]) == {"done"} and set(df["stage"]) == {"sample"}
    for col in ("bag_size", "Pred_0", "p_0", "Pred_1", "p_1", "attention_mean", "attention_std"):
        assert col in df.columns
    assert (pd.to_numeric(df["p_0"]) >= pd.to_numeric(df["p_1"])).all()  # CLAM's rank order
    results = pd.read_csv(cfg.results_csv_path)
    assert len(results) == 5 and "Pred_0" in results.columns
    raw = Path(cfg.exp_arguments.raw_save_dir) / "demo"
    blockmaps = sorted(raw.rglob("*_blockmap.h5"))
    assert len(blockmaps) == 5
    with h5py.File(blockmaps[0]) as h5:
        assert h5["attention_scores"].dtype == np.float32 and h5["attention_scores"].shape[1] == 1
        assert h5["coords"].dtype == np.int64 and h5["coords"].shape[1] == 2
    assert (raw / "config.yaml").exists()
    assert len(list(raw.rglob("*_segmentation.geojson"))) == 5
    before = done_stages(cfg)
    again = run_pipeline(cfg)
    assert again.ok and again.stage_seconds == {}
    assert done_stages(cfg) == before


def test_a_done_row_is_checked_without_opening_its_slide(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo draws at ``vis_level: -1`` with ``save_orig``, so the ``_orig_<level>`` image is
    named by the level -1 resolved to. A rerun with every row done takes that level from the
    ledger instead of opening each slide again (catches a no-op rerun that opens 10,000 slides
    on a network filesystem just to name files); an opened slide here fails its row."""
    cfg = load_config(demo_project)
    assert run_pipeline(cfg).ok
    production = Path(cfg.exp_arguments.production_save_dir) / "demo"
    assert len(list(production.rglob("*_orig_3.jpg"))) == 5  # 3: the level nearest 32x

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr("clam_heat.slide.open_slide", refuse)
    again = run_pipeline(cfg)
    assert again.ok, again.failed
    assert again.stage_seconds == {}


def test_a_rerun_in_a_new_process_reads_no_input_to_identify_it(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs are identified by content, but a done row's ledger keeps each digest with the
    file's signature, so a rerun in a fresh process (the memo emptied) hashes only the
    checkpoint, once, for the start-up check: not the 5 slides and 5 feature files again
    (catches a 10,000-row rerun that re-reads every feature file from shared storage)."""
    from clam_heat import ledger as ledger_mod

    cfg = load_config(demo_project)
    assert run_pipeline(cfg).ok
    hashed: list[int] = []
    real_sha256 = ledger_mod.hashlib.sha256

    def counting_sha256() -> object:
        hashed.append(1)
        return real_sha256()

    monkeypatch.setattr(ledger_mod, "_DIGESTS", {})
    monkeypatch.setattr(ledger_mod.hashlib, "sha256", counting_sha256)
    again = run_pipeline(cfg)
    assert again.ok and again.stage_seconds == {}
    assert len(hashed) <= 1


def test_planning_a_new_list_opens_no_slide(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run of a list no row of which has run yet names no outputs, so it opens no slide
    (the demo's ``vis_level: -1`` names the plain image by a level read from the slide); catches
    output names computed before the ledger knows it needs them (10,000 slide opens on a network
    filesystem to plan a new cohort)."""

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr("clam_heat.slide.open_slide", refuse)
    cfg = load_config(demo_project)
    plan = run_pipeline(cfg, dry_run=True)
    assert plan.ok, plan.failed
    assert not Path(cfg.exp_arguments.production_save_dir).exists()  # a dry run writes nothing


def test_the_remembered_level_is_only_that_of_an_auto_level_drawing(demo_project: Path) -> None:
    """Drawn at a fixed level 2, then asked for -1: the plain image is named by the level -1
    resolves to (3), not by the level the ledger remembers (catches a remembered level reused
    when the configured level changed), and the rerun replaces the old image."""
    write_text_atomic(
        demo_project, demo_project.read_text().replace("vis_level: -1", "vis_level: 2")
    )
    assert run_pipeline(load_config(demo_project)).ok
    cfg = load_config(demo_project, overrides=["heatmap_arguments.vis_level=-1"])
    production = Path(cfg.exp_arguments.production_save_dir) / "demo"
    assert len(list(production.rglob("*_orig_2.jpg"))) == 5
    from clam_heat.process_list import read_process_list
    from clam_heat.rows import build_contexts
    from clam_heat.stages.heatmap import HeatmapStage

    ctx = build_contexts(cfg, read_process_list(cfg.process_list_path))[0]
    assert HeatmapStage().outputs(ctx)["orig"].name == f"{ctx.slide_id}_orig_3.jpg"
    ctx.close()
    assert run_pipeline(cfg).ok
    assert len(list(production.rglob("*_orig_3.jpg"))) == 5
    assert not list(production.rglob("*_orig_2.jpg"))  # the stale ones are cleaned


def test_alpha_reruns_only_heatmap_and_k_only_sampling(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    assert run_pipeline(cfg).ok
    before = done_stages(cfg)
    alpha = load_config(demo_project, overrides=["heatmap_arguments.alpha=0.7"])
    plan = run_pipeline(alpha, dry_run=True).plans
    first = next(iter(plan.values()))
    assert first["segment"] is None and first["infer"] is None and first["sample"] is None
    assert "heatmap_arguments.alpha 0.4 -> 0.7" in first["heatmap"]
    summary = run_pipeline(alpha)
    assert set(summary.stage_seconds) == {"heatmap"}
    after = done_stages(cfg)
    for key, stamp in before.items():
        assert (stamp == after[key]) == (key[1] != "heatmap"), key

    k_cfg = load_config(
        demo_project,
        overrides=[
            "heatmap_arguments.alpha=0.7",
            "sample_arguments.samples=[{name: topk_high_attention, sample: true, seed: 1, k: 3,"
            " mode: topk}]",
        ],
    )
    summary = run_pipeline(k_cfg)
    assert set(summary.stage_seconds) == {"sample"}
    folder = Path(k_cfg.exp_arguments.production_save_dir) / "demo" / "sampled_patches"
    pngs = list(folder.rglob("*.png"))
    assert len(pngs) == 5 * 3  # old k=15 files of each slide were removed


def test_editing_a_rows_roi_redraws_its_heatmap(demo_project: Path) -> None:
    """``use_roi``: the heatmap covers the row's level-0 box (x1, y1, x2, y2), so an edited x2
    redraws that row's heatmap (and only its heatmap) at the new width. Vis level -1 is level 3
    of the demo slides (downsample 32): a box 2048 x 1024 px wide at level 0 is 64 x 32 px."""
    cfg = load_config(demo_project, overrides=["heatmap_arguments.use_roi=true"])
    rows = pd.read_csv(demo_project.parent / "process_lists" / "demo.csv", dtype=str)
    rows[["x1", "y1", "x2", "y2"]] = ["0", "0", "2048", "1024"]
    rows.to_csv(demo_project.parent / "process_lists" / "demo.csv", index=False)
    assert run_pipeline(cfg).ok

    def heatmap(slide_id: str) -> Path:
        prod = Path(cfg.exp_arguments.production_save_dir) / "demo"
        (path,) = prod.rglob(f"{slide_id}_0.0_roi_1_*.jpg")
        return path

    with Image.open(heatmap("demo_001")) as image:
        assert image.size == (64, 32)
    before = done_stages(cfg)
    listed = _list(cfg)
    listed.loc[listed["slide_id"] == "demo_001", "x2"] = 3072
    listed.to_csv(cfg.process_list_path, index=False)
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed
    after = done_stages(cfg)
    changed = {key for key in before if before[key] != after[key]}
    assert ("demo_001", "heatmap") in changed and {s for s, _ in changed} == {"demo_001"}
    assert "segment" not in summary.stage_seconds and "infer" not in summary.stage_seconds
    with Image.open(heatmap("demo_001")) as image:
        assert image.size == (96, 32)  # (3072 - 0) / 32
    with Image.open(heatmap("demo_000")) as image:
        assert image.size == (64, 32)


def test_new_checkpoint_reruns_inference_and_downstream(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    assert run_pipeline(cfg).ok
    ckpt = Path(cfg.model_arguments.ckpt_path)
    state = torch.load(ckpt, weights_only=True)
    state["classifiers.bias"] = state["classifiers.bias"] + 0.5
    torch.save(state, ckpt)
    plan = run_pipeline(cfg, dry_run=True).plans
    first = next(iter(plan.values()))
    assert first["segment"] is None
    assert first["infer"] == "changed: checkpoint changed"
    summary = run_pipeline(cfg)
    assert "segment" not in summary.stage_seconds and "infer" in summary.stage_seconds


def test_bad_rows_fail_with_reasons_and_do_not_stop_the_run(
    demo_project: Path, openslide_fixtures: Path
) -> None:
    cfg = load_config(demo_project)
    folder = demo_project.parent
    slides = folder / "slides"
    features = folder / "features"
    # unopenable slide (OpenSlide's own broken fixture) with features present
    shutil.copy(openslide_fixtures / "unopenable.tiff", slides / "bad_open.tiff")
    shutil.copy(features / "demo_000.h5", features / "bad_open.h5")
    # slide present but its H5 missing
    shutil.copy(slides / "demo_001.tiff", slides / "no_h5.tiff")
    # wrong feature width
    shutil.copy(slides / "demo_002.tiff", slides / "wide.tiff")
    with h5py.File(features / "demo_002.h5") as src, h5py.File(features / "wide.h5", "w") as dst:
        n = src["features"].shape[0]
        dst["features"] = np.zeros((n, 7), np.float32)
        dst["coords"] = src["coords"][:]
        for k, v in src["coords"].attrs.items():
            dst["coords"].attrs[k] = v
    pd.DataFrame(
        {"slide_id": ["demo_003", "bad_open", "no_h5", "wide"], "label": ["tumour"] * 4}
    ).to_csv(cfg.process_list_path, index=False)
    summary = run_pipeline(cfg)
    assert summary.counts == {"done": 1, "failed": 3}
    errors = dict(summary.failed)
    assert "bad_open.tiff" in errors["bad_open"] and "OpenSlide cannot open" in errors["bad_open"]
    assert "no_h5" in errors["no_h5"] and "features_dir" in errors["no_h5"]
    assert "7" in errors["wide"] and str(cfg.model_arguments.embed_dim) in errors["wide"]
    df = _list(cfg).set_index("slide_id")
    assert df.loc["demo_003", "status"] == "done"
    for bad in ("bad_open", "no_h5", "wide"):
        assert df.loc[bad, "status"] == "failed" and df.loc[bad, "error"] == errors[bad]
    # the missing H5 appears: without --retry-failed only the row whose inputs changed runs
    # (the fixed one); the two unchanged failed rows wait; with it every failed row is attempted
    shutil.copy(features / "demo_001.h5", features / "no_h5.h5")
    attempts: dict[str, dict[str, float]] = {}

    def seen(outcome) -> None:
        attempts[outcome.slide_id] = dict(outcome.ran)

    again = run_pipeline(cfg, on_row=seen)
    assert set(attempts) == {"demo_003", "no_h5"}, attempts  # never bad_open nor wide
    assert attempts["demo_003"] == {}  # a done row is not redone
    assert {"infer", "heatmap", "sample"} <= set(attempts["no_h5"])  # segment was kept
    assert again.counts == {"done": 2, "failed": 2} and again.waiting == 2
    assert ("no_h5", "infer") in done_stages(cfg) and ("no_h5", "sample") in done_stages(cfg)
    attempts.clear()
    retried = run_pipeline(cfg, retry_failed=True, on_row=seen)
    assert {"bad_open", "wide"} <= set(attempts)
    assert attempts.get("demo_003", {}) == {} and attempts.get("no_h5", {}) == {}
    assert retried.counts == {"done": 2, "failed": 2} and retried.waiting == 0


def test_unwritable_output_dir_is_one_clear_error(demo_project: Path) -> None:
    from clam_heat.errors import OutputError

    blocker = demo_project.parent / "blocker"
    blocker.write_text("a file, not a folder")
    cfg = load_config(demo_project, overrides=[f"exp_arguments.raw_save_dir={blocker / 'raw'}"])
    with pytest.raises(OutputError, match=r"raw_save_dir .*blocker is a file, not a folder") as err:
        run_pipeline(cfg)
    assert err.value.exit_code == 2  # bad input found before any work
    assert not cfg.process_list_path.with_suffix(".csv").read_text().count("running")


def _why_unreadable(path: Path) -> str | None:
    """None when ``path`` reads back whole as its kind, else what failed. Checked: HDF5 (every
    dataset read in full), JPEG/PNG/TIFF (every pixel decoded), JSON/GeoJSON (parsed), CSV
    (parsed by pandas), YAML (parsed). The run log is append-only text and not checked; any
    other kind is reported, so a new output gets a check here."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".h5":
            with h5py.File(path, "r") as h5:
                names: list[str] = []
                h5.visit(names.append)
                for name in names:
                    if isinstance(h5[name], h5py.Dataset):
                        h5[name][()]
        elif suffix in {".jpg", ".png", ".tiff"}:
            with Image.open(path) as image:
                image.load()
        elif suffix in {".json", ".geojson"}:
            json.loads(path.read_text())
        elif suffix == ".csv":
            pd.read_csv(path)
        elif suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif suffix != ".log":
            return f"no read-back check for {suffix!r} files (add one to _why_unreadable)"
    except (OSError, ValueError, SyntaxError, yaml.YAMLError) as err:  # truncated or corrupt
        return f"{type(err).__name__}: {err}"
    return None


@pytest.mark.slow
def test_kill_minus_nine_at_several_points_then_resume(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    cmd = [
        sys.executable,
        "-c",
        "from clam_heat.cli import main; main()",
        "run",
        str(demo_project),
        "--quiet",
    ]
    completed_before: dict[tuple[str, str], str] = {}
    for target in (1, 4, 9, 14):  # kill once this many stages have been recorded done
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reached, deadline = False, time.monotonic() + 120
        while not reached and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(json.JSONDecodeError, OSError):  # a ledger being replaced
                reached = len(done_stages(cfg)) >= target
            time.sleep(0.01)
        assert reached and proc.poll() is None, f"the run ended before {target} stages were done"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL  # the kill landed mid-run
        done_now = done_stages(cfg)
        assert len(done_now) < 20  # 5 slides x 4 stages: work was left
        # nothing recorded done before this kill was redone by this run
        for key, stamp in completed_before.items():
            assert done_now.get(key) == stamp, key
        completed_before = done_now
        out_root = demo_project.parent / "heatmaps"
        for path in out_root.rglob("*"):
            if path.is_file() and not is_temp_name(path.name):
                assert _why_unreadable(path) is None, f"{path}: {_why_unreadable(path)}"
    final = run_pipeline(cfg)
    assert final.ok and final.counts == {"done": 5}
    for key, stamp in completed_before.items():
        assert done_stages(cfg)[key] == stamp, key
    leftovers = [p for p in (demo_project.parent / "heatmaps").rglob(".*") if ".tmp" in p.name]
    assert leftovers == []
    assert set(_list(cfg)["status"]) == {"done"}


def test_temp_csvs_of_a_killed_run_are_swept_and_others_kept(demo_project: Path) -> None:
    """kill -9 during a CSV write leaves ``.<name>.<random>.tmp`` beside the list or results
    (the names :func:`clam_heat.atomic.temp_path_for` makes)."""
    cfg = load_config(demo_project)
    lists, results = cfg.process_list_path.parent, cfg.results_csv_path.parent
    results.mkdir(parents=True, exist_ok=True)
    stale = [lists / f".{cfg.process_list_path.name}.k1ll3d.tmp", results / ".demo.csv.x9q2.tmp"]
    others = [lists / ".other.csv.live.tmp", lists / "notes.tmp"]
    for path in stale + others:
        path.write_text("half a csv")
    assert run_pipeline(cfg).ok
    assert [p.exists() for p in stale + others] == [False, False, True, True]


ENCODER_PATH = [
    "heatmap_arguments.calc_heatmap=true",
    "patching_arguments.overlap=0.5",
    *TINY_ENCODER,
]


def test_calc_heatmap_overlap_pass_is_cached_and_width_checked(demo_project: Path) -> None:
    cfg = load_config(demo_project, overrides=ENCODER_PATH)
    first = run_pipeline(cfg)
    assert first.ok, first.failed
    assert "overlap" in first.stage_seconds
    raw = Path(cfg.exp_arguments.raw_save_dir) / "demo"
    overlap_files = sorted(raw.rglob("*_0.5_roi_False.h5"))
    assert len(overlap_files) == 5
    with h5py.File(overlap_files[0]) as h5:
        scores = h5["attention_scores"][:]
        coords = h5["coords"][:]
    assert scores.shape == (len(coords), 1) and scores.min() >= 0 and scores.max() <= 100
    steps = np.diff(np.unique(coords[:, 0]))
    assert steps.min() == 128  # step = int(256 * (1 - 0.5))
    prod = Path(cfg.exp_arguments.production_save_dir) / "demo"
    assert list(prod.rglob("demo_000_0.5_roi_0_blur_0_rs_1_bc_0_a_0.4_l_-1_bi_0_-1.0.jpg"))
    again = run_pipeline(cfg)
    assert again.ok and again.stage_seconds == {}  # nothing is re-encoded

    wide = load_config(
        demo_project, overrides=[*ENCODER_PATH[:-3], "encoder_arguments.model_name=resnet50_trunc"]
    )
    with pytest.raises(GlobalInputError) as err:  # every row would fail: stop once, exit 2
        run_pipeline(wide)
    assert err.value.exit_code == 2
    assert "1024" in str(err.value) and str(wide.model_arguments.embed_dim) in str(err.value)


def test_overlap_grid_steps_scale_with_custom_downsample(demo_project: Path) -> None:
    """CLAM's overlap grid at custom_downsample 2: a patch covers 256 px x 2 = 512 level-0 px and
    the grid steps by half of that (overlap 0.5), both scaled by custom_downsample."""
    cfg = load_config(
        demo_project, overrides=[*ENCODER_PATH, "patching_arguments.custom_downsample=2"]
    )
    summary = run_pipeline(cfg, stages=("segment", "infer", "overlap"))
    assert summary.ok, summary.failed
    raw = Path(cfg.exp_arguments.raw_save_dir) / "demo"
    overlap_files = sorted(raw.rglob("*_0.5_roi_False.h5"))
    assert len(overlap_files) == 5
    for path in overlap_files:
        with h5py.File(path) as h5:
            coords = h5["coords"][:]
            side = int(h5["coords"].attrs["patch_size_level0"])
        assert side == 512  # 256 px at level 0 (downsample 1) x custom_downsample 2
        # by hand: int(256 * (1 - 0.5)) * 1 * 2 = 256 between neighbours along a row or column
        # (each tissue piece starts its own grid, so only neighbours on one line are compared)
        for along, line in ((0, 1), (1, 0)):
            lines = (np.sort(coords[coords[:, line] == v, along]) for v in set(coords[:, line]))
            gaps = np.concatenate([np.diff(points) for points in lines])
            assert gaps.min() == 256 and (gaps == 256).sum() > len(coords) // 4, path


def test_bag_features_extracted_from_the_slide_when_no_h5(demo_project: Path) -> None:
    cfg = load_config(
        demo_project,
        overrides=[
            *ENCODER_PATH[2:],
            "runner_arguments.features_dir=null",
            "runner_arguments.extract_features=true",
        ],
    )
    summary = run_pipeline(cfg)
    assert summary.ok, summary.failed
    raw = Path(cfg.exp_arguments.raw_save_dir) / "demo"
    cached = sorted(raw.rglob("demo_00?.h5"))
    assert len(cached) == 5
    with h5py.File(cached[0]) as h5:
        assert h5["features"].shape[1] == cfg.model_arguments.embed_dim
        assert h5["coords"].attrs["patch_size_level0"] == 256
    assert run_pipeline(cfg).stage_seconds == {}


def test_demo_heatmaps_are_hot_on_the_generated_tumour(demo_project: Path) -> None:
    """Issue 4: in the production heatmaps, tumour tissue is hotter (jet: red) than other tissue."""
    from clam_heat.demo import make_demo_project

    cfg = load_config(demo_project)
    assert run_pipeline(cfg).ok
    project = make_demo_project(demo_project.parent, n_slides=5, size="tiny")  # reuses the files
    prod = Path(cfg.exp_arguments.production_save_dir) / "demo"
    checked = 0
    for demo in project.slides:
        if not demo.has_tumour:
            continue
        image = next(prod.rglob(f"{demo.name}_0.0_roi_0_*_a_0.4_l_-1_*.jpg"))
        rgb = np.asarray(Image.open(image).convert("RGB")).astype(np.float32)
        downsample = (demo.width / rgb.shape[1], demo.height / rgb.shape[0])
        tumour = demo.tumour_mask(downsample)
        tissue = demo.tissue_mask(downsample) & ~tumour
        heat = rgb[..., 0] - rgb[..., 2]  # jet: red = high attention, blue = low
        assert heat[tumour].mean() > heat[tissue].mean() + 20, demo.name
        checked += 1
    assert checked >= 2


def test_every_attention_model_runs_in_the_demo_pipeline(demo_project: Path) -> None:
    """Issue 6: each model type runs end to end from a checkpoint saved in its documented layout."""
    from clam_heat.models import build_model, get_model_spec, registered_models

    base = load_config(demo_project)
    embed_dim = base.model_arguments.embed_dim
    keep = pd.read_csv(base.process_list_path).head(2)  # two slides keep this test quick
    keep.to_csv(base.process_list_path, index=False)
    # the models with attention (mil_fc, mil_fc_mc, wikg, dftd: tests/test_explain.py)
    model_types = ["clam_mb", *(n for n in registered_models() if get_model_spec(n).has_attention)]
    assert {"abmil", "transmil", "dsmil", "ilra", "rrt", "transformer"} <= set(model_types)
    for model_type in model_types:
        torch.manual_seed(0)
        model = build_model(model_type, n_classes=2, embed_dim=embed_dim)
        ckpt = demo_project.parent / "ckpts" / f"{model_type}.pt"
        torch.save(model.state_dict(), ckpt)
        cfg = load_config(
            demo_project,
            overrides=[
                f"model_arguments.model_type={model_type}",
                f"model_arguments.ckpt_path={ckpt}",
                f"exp_arguments.save_exp_code=demo_{model_type}",
                "sample_arguments.samples=[]",
            ],
        )
        summary = run_pipeline(cfg)
        assert summary.ok and summary.counts == {"done": 2}, (model_type, summary.failed)
        raw = Path(cfg.exp_arguments.raw_save_dir) / f"demo_{model_type}"
        for blockmap in raw.rglob("*_blockmap.h5"):
            with h5py.File(blockmap) as h5:
                scores = h5["attention_scores"][:]
                assert scores.shape == (h5["coords"].shape[0], 1)
                assert np.isfinite(scores).all(), model_type


def test_vanished_slide_is_skipped_with_a_reason_then_resumes(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    slide = demo_project.parent / "slides" / "demo_004.tiff"
    hidden = slide.with_suffix(".bak")
    slide.rename(hidden)
    summary = run_pipeline(cfg)
    assert summary.ok and summary.counts == {"done": 4, "skipped": 1}
    row = _list(cfg).set_index("slide_id").loc["demo_004"]
    assert row["status"] == "skipped" and bool(row["missing"])
    assert row["error"].startswith(f"slide file not found: {slide}")
    before = done_stages(cfg)
    hidden.rename(slide)
    again = run_pipeline(cfg)
    assert again.counts == {"done": 5} and set(_list(cfg)["status"]) == {"done"}
    after = done_stages(cfg)
    assert {key for key in after if before.get(key) != after[key]} == {
        ("demo_004", stage) for stage in ("segment", "infer", "heatmap", "sample")
    }


def test_real_aperio_slide_from_pixels_to_samples(demo_project: Path, real_slide: Path) -> None:
    """A real scanner file (Aperio SVS, one level, MPP 0.499) with no feature H5: real tissue is
    segmented, the bag is encoded from its pixels, and every stage writes its outputs."""
    slides = demo_project.parent / "aperio"
    slides.mkdir()
    shutil.copy(real_slide, slides / "cmu_small_region.svs")
    cfg = load_config(
        demo_project,
        overrides=[
            f"data_arguments.data_dir={slides}",
            "data_arguments.data_dir_key=null",
            "data_arguments.slide_ext=.svs",
            f"data_arguments.process_list={demo_project.parent / 'process_lists' / 'aperio.csv'}",
            "data_arguments.preset=presets/bwh_biopsy.csv",  # CLAM's, shipped in the package
            "runner_arguments.features_dir=null",
            "runner_arguments.extract_features=true",
            *ENCODER_PATH[2:],
        ],
    )
    summary = run_pipeline(cfg)
    assert summary.ok and summary.counts == {"done": 1}, summary.failed
    raw = Path(cfg.exp_arguments.raw_save_dir) / "demo" / "Unspecified" / "cmu_small_region"
    tissue = json.loads((raw / "cmu_small_region_segmentation.geojson").read_text())
    assert tissue["features"], "no tissue found on a real H&E section"
    with h5py.File(raw / "cmu_small_region.h5") as h5:
        features, coords = h5["features"][:], h5["coords"][:]
    assert features.shape == (len(coords), 64) and len(coords) >= 20
    assert np.isfinite(features).all()
    with h5py.File(raw / "cmu_small_region_blockmap.h5") as h5:
        assert h5["attention_scores"].shape == (len(coords), 1)
    prod = Path(cfg.exp_arguments.production_save_dir) / "demo" / "Unspecified"
    (heatmap,) = prod.glob("cmu_small_region_0.0_roi_0_*.jpg")
    assert Image.open(heatmap).size == (2220, 2967)  # one level: drawn at level 0
    patches = list(Path(cfg.exp_arguments.production_save_dir).rglob("*_cmu_small_region_x_*.png"))
    assert patches and all(Image.open(p).size == (256, 256) for p in patches)
    assert run_pipeline(cfg).stage_seconds == {}  # resumes to nothing


# --------------------------------------------------------------------------------------------
# a stage defined here, registered through the public registry (no other module edited)
# --------------------------------------------------------------------------------------------


class _CountWords(Stage):
    """Toy stage: counts the words of a text file beside the config into a raw-folder file."""

    name = "count_words"
    depends_on = ("segment",)

    def fingerprint(self, ctx) -> dict:
        source = ctx.cfg.config_dir / "words.txt"
        return base_fingerprint(
            words=source.read_text(), tissue=ctx.raw("_segmentation.geojson").name
        )

    def outputs(self, ctx) -> dict[str, Path]:
        return {"count": ctx.raw("_words.txt")}

    def run(self, ctx) -> StageRun:
        text = (ctx.cfg.config_dir / "words.txt").read_text()
        out = self.outputs(ctx)["count"]
        write_text_atomic(out, str(len(text.split())))
        return StageRun([out], {"words": len(text.split())})


class _DoubleCount(Stage):
    """Toy dependant: reads the count (its fingerprint holds the count file's identity)."""

    name = "double_count"
    depends_on = ("count_words",)

    def fingerprint(self, ctx) -> dict:
        return base_fingerprint(count=file_identity(ctx.raw("_words.txt")))

    def outputs(self, ctx) -> dict[str, Path]:
        return {"double": ctx.raw("_double.txt")}

    def run(self, ctx) -> StageRun:
        count = int(ctx.raw("_words.txt").read_text())
        out = self.outputs(ctx)["double"]
        write_text_atomic(out, str(2 * count))
        return StageRun([out])


def test_a_stage_registered_from_a_test_runs_in_order_and_resumes(demo_project: Path) -> None:
    words = demo_project.parent / "words.txt"
    words.write_text("one two three")
    cfg = load_config(demo_project)
    keep = pd.read_csv(cfg.process_list_path).head(2)  # two slides keep this test quick
    keep.to_csv(cfg.process_list_path, index=False)
    before = registry.names()
    with registry.registered(_CountWords(), _DoubleCount(), after="segment"):
        assert registry.names() == (
            "segment", "count_words", "double_count", "infer", "overlap", "heatmap", "sample",
            "class_maps", "explain", "faithfulness",
        )  # fmt: skip
        first = run_pipeline(cfg)
        assert first.ok and first.counts == {"done": 2}, first.failed
        assert {"count_words", "double_count", "segment", "heatmap"} <= set(first.stage_seconds)
        ledger = json.loads(
            next(Path(cfg.exp_arguments.raw_save_dir).rglob("*.ledger.json")).read_text()
        )
        # in order: each toy stage started after the stage before it finished
        order = ["segment", "count_words", "double_count", "infer", "heatmap", "sample"]
        starts = [ledger["stages"][name]["started_at"] for name in order]
        assert starts == sorted(starts)
        slide_dir = next(Path(cfg.exp_arguments.raw_save_dir).rglob("demo_000.ledger.json")).parent
        assert (slide_dir / "demo_000_double.txt").read_text() == "6"

        second = run_pipeline(cfg)  # resume: nothing to redo, the toy stages included
        assert second.ok and second.stage_seconds == {}
        done = done_stages(cfg)

        words.write_text("one two three four")  # the toy stage's fingerprint input changes
        plan = next(iter(run_pipeline(cfg, dry_run=True).plans.values()))
        assert plan["count_words"].startswith("changed: words")
        assert plan["double_count"] == "upstream stage reruns: count_words"
        third = run_pipeline(cfg)
        assert set(third.stage_seconds) == {"count_words", "double_count"}
        assert (slide_dir / "demo_000_double.txt").read_text() == "8"
        after = done_stages(cfg)
        assert {key for key in after if done.get(key) != after[key]} == {
            (slide, stage) for slide in ("demo_000", "demo_001")
            for stage in ("count_words", "double_count")
        }  # fmt: skip
    assert registry.names() == before  # the registry is restored after the block


def test_registering_removing_and_overriding_stages_is_undone(demo_project: Path) -> None:
    before = registry.stages()
    heatmap = registry.get("heatmap")

    class _NoHeatmap(Stage):
        name = "heatmap"

        def fingerprint(self, ctx) -> dict:
            return base_fingerprint()

        def run(self, ctx) -> StageRun:
            return StageRun([])

    with registry.registered(_NoHeatmap()):  # same name: overridden in place
        assert registry.names() == before_names(before)
        assert isinstance(registry.get("heatmap"), _NoHeatmap)
        registry.unregister("sample")
        assert "sample" not in registry.names()
        with pytest.raises(ValueError, match="depends on"):
            registry.register(_DoubleCount())  # its input stage is not registered
    assert registry.stages() == before and registry.get("heatmap") is heatmap
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        registry.get("nope")


def before_names(stages) -> tuple[str, ...]:
    return tuple(s.name for s in stages)
