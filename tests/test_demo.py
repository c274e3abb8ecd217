"""Demo data, read back for real: pyramidal TIFFs via OpenSlide, HDF5 via h5py, torch ckpts."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest
import tifffile
import torch
import yaml

from clam_heat.atomic import is_temp_name
from clam_heat.demo import (
    DemoProject,
    DemoSlide,
    make_demo_features,
    make_demo_project,
    make_demo_slide,
    train_demo_checkpoint,
)
from clam_heat.errors import OutputError
from clam_heat.models import ClamSB, load_model, run_attention
from clam_heat.slide import open_slide

TINY_LEVELS = ((4096, 3072), (1024, 768), (256, 192), (128, 96))

#: CLAM_SB small, gated, n_classes=2: name -> shape, with E = 64
#: (docs/rules/formats.md#checkpoints).
SB_SMALL_KEYS = {
    "attention_net.0.weight": (512, 64),
    "attention_net.0.bias": (512,),
    "attention_net.3.attention_a.0.weight": (256, 512),
    "attention_net.3.attention_a.0.bias": (256,),
    "attention_net.3.attention_b.0.weight": (256, 512),
    "attention_net.3.attention_b.0.bias": (256,),
    "attention_net.3.attention_c.weight": (1, 256),
    "attention_net.3.attention_c.bias": (1,),
    "classifiers.weight": (2, 512),
    "classifiers.bias": (2,),
    "instance_classifiers.0.weight": (2, 512),
    "instance_classifiers.0.bias": (2,),
    "instance_classifiers.1.weight": (2, 512),
    "instance_classifiers.1.bias": (2,),
}


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on CLAM's 0-255 scale, (h, w) uint8."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]


def interior(mask: np.ndarray, px: int = 2) -> np.ndarray:
    """``mask`` eroded by ``px`` pixels, so sampled points are well inside a region."""
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel).astype(bool)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DemoSlide:
    """The default slide (4096x3072, seed 0); its writing time is in bench/."""
    return make_demo_slide(tmp_path_factory.mktemp("tiny") / "tiny.tiff")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> DemoProject:
    """A default 5-slide tiny project, training included."""
    return make_demo_project(tmp_path_factory.mktemp("project") / "demo")


# ------------------------------------------------------------------------------------ slides


def test_tiny_slide_is_a_generic_tiff_pyramid_with_mpp(tiny: DemoSlide) -> None:
    slide = tiny
    assert slide.dimensions == (4096, 3072)
    assert slide.level_dimensions == TINY_LEVELS

    osr = openslide.OpenSlide(str(slide.path))
    try:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_dimensions == TINY_LEVELS
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert [round(d, 3) for d in osr.level_downsamples] == [1, 4, 16, 32]
    finally:
        osr.close()

    with open_slide(slide.path) as reader:
        assert reader.mpp == pytest.approx(0.5)
        assert reader.best_level_for_downsample(32) == 3

    with tifffile.TiffFile(slide.path) as tif:
        pages = list(tif.pages)
        assert [p.subfiletype for p in pages] == [0, 1, 1, 1]
        assert all(p.is_tiled and p.tile == (256, 256) for p in pages)
        assert all(p.compression == tifffile.COMPRESSION.JPEG for p in pages)
        assert not any(p.subifds for p in pages)  # separate pages, not SubIFDs


def test_the_32x_level_is_within_tolerance_for_an_awkward_size(tmp_path: Path) -> None:
    slide = make_demo_slide(tmp_path / "odd.tiff", width=3000, height=2000, seed=3)
    with open_slide(slide.path) as reader:
        assert reader.level_dimensions == slide.level_dimensions
        assert reader.level_dimensions[-1] == (93, 62)
        level = reader.best_level_for_downsample(32)
        assert level == 3
        dx, dy = reader.level_downsamples[level]
        assert dx == pytest.approx(32, rel=0.01) and dy == pytest.approx(32, rel=0.01)


def test_tissue_is_pink_tumour_is_darker_and_glass_is_white(
    tiny: DemoSlide,
) -> None:
    slide = tiny
    tissue, tumour = slide.tissue_mask(32), slide.tumour_mask(32)
    regions = {
        "normal": interior(tissue & ~tumour),
        "tumour": interior(tumour),
        "glass": interior(~tissue),
    }
    rng = np.random.default_rng(0)
    means = {}
    with open_slide(slide.path) as reader:
        for name, mask in regions.items():
            rows, cols = np.nonzero(mask)
            assert len(rows) > 0, name
            pick = rng.choice(len(rows), 6, replace=False)
            l0 = np.stack([cols[pick], rows[pick]], axis=1) * 32 + 16 - 24  # 48 px windows
            patches = [reader.read_region((int(x), int(y)), 0, (48, 48)) for x, y in l0]
            means[name] = np.stack(patches).reshape(-1, 3).astype(float).mean(axis=0)

    r, g, b = means["normal"]
    assert r > g + 40 and b > g + 15  # eosin pink
    assert means["glass"].min() > 230 and np.ptp(means["glass"]) < 8  # white, unsaturated
    assert means["tumour"].sum() < means["normal"].sum() - 60  # denser, darker purple
    assert means["tumour"][2] > means["tumour"][1] + 30


def test_truth_masks_match_the_pixels_on_every_level(tiny: DemoSlide) -> None:
    slide = tiny
    with open_slide(slide.path) as reader:
        for level, downsample in enumerate(reader.level_downsamples):
            if level == 0:  # a 1024 px crop across a tissue edge, via point truth
                l0_x0, l0_y0 = 512, 1024
                pixels = reader.read_region((l0_x0, l0_y0), 0, (1024, 1024))
                ys, xs = np.mgrid[0:1024, 0:1024] + 0.5
                points = np.stack([xs.ravel() + l0_x0, ys.ravel() + l0_y0], axis=1)
                truth = slide.truth_at(points)[0].reshape(1024, 1024)
                assert 0.2 < truth.mean() < 0.8
            else:
                truth = slide.tissue_mask(downsample)
                pixels = reader.read_level(level)
            assert truth.shape == pixels.shape[:2]
            seg = saturation(pixels) > 20  # CLAM's default sthresh
            iou = (seg & truth).sum() / (seg | truth).sum()
            assert iou > 0.95, (level, iou)
    assert slide.tumour_mask(4).sum() > 0
    assert not (slide.tumour_mask(4) & ~slide.tissue_mask(4)).any()
    assert 0.1 < slide.tissue_mask(16).mean() < 0.6


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path: Path) -> None:
    kwargs = {"width": 1024, "height": 768, "seed": 7}
    a = make_demo_slide(tmp_path / "a.tiff", **kwargs)
    b = make_demo_slide(tmp_path / "b.tiff", **kwargs)
    c = make_demo_slide(tmp_path / "c.tiff", **{**kwargs, "seed": 8})
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert np.array_equal(a.tissue_mask(4), b.tissue_mask(4))
    assert not np.array_equal(a.tissue_mask(4), c.tissue_mask(4))
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]


def test_tumour_free_slide_has_no_tumour(tmp_path: Path) -> None:
    slide = make_demo_slide(tmp_path / "n.tiff", width=1024, height=768, tumour=False)
    assert slide.tissue_mask(4).any()
    assert not slide.tumour_mask(4).any()
    assert slide.has_tumour is False


def test_mpp_is_written_for_a_40x_slide(tmp_path: Path) -> None:
    slide = make_demo_slide(tmp_path / "hi.tiff", width=512, height=512, mpp=0.25)
    with open_slide(slide.path) as reader:
        assert reader.mpp == pytest.approx(0.25)
        assert reader.level_dimensions == ((512, 512), (128, 128), (32, 32), (16, 16))
    bag = make_demo_features(slide, tmp_path / "hi.h5", patch_size_level0=64)
    with h5py.File(bag.path) as h5:
        assert h5["coords"].attrs["level0_magnification"] == 40
        assert h5["coords"].attrs["patch_size"] == 32  # 64 level-0 px at 40x = 32 px at 20x


def test_a_tall_slide_is_written_to_its_last_row(tmp_path: Path) -> None:
    """A slide much taller than wide (streamed in strips; its peak memory is measured by
    ``bench/limits.py``) is whole down to the bottom edge."""
    width, height = 1024, 32768
    slide = make_demo_slide(tmp_path / "tall.tiff", width=width, height=height)
    with open_slide(slide.path) as reader:
        assert reader.dimensions == (width, height)
        bottom = reader.read_region((0, height - 64), 0, (64, 64))
        assert bottom.shape == (64, 64, 3)


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        make_demo_slide(tmp_path / "x.tiff", width=256, height=256)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"file/sub: cannot create folder"):
        make_demo_slide(blocker / "sub" / "x.tiff", width=256, height=256)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        make_demo_slide(tmp_path / "x.tiff", tile=100)
    with pytest.raises(ValueError, match="size must be one of"):
        make_demo_project(tmp_path, size="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bag 0: features must be"):
        train_demo_checkpoint([(np.zeros((3, 8), np.float32), 1)], tmp_path / "c.pt")


# ---------------------------------------------------------------------------------- features


def test_features_follow_the_trident_layout(tiny: DemoSlide, tmp_path: Path) -> None:
    slide = tiny
    bag = make_demo_features(slide, tmp_path / "features" / "tiny.h5", feature_dim=32, seed=4)
    with h5py.File(bag.path, "r") as h5:
        feats, coords = h5["features"], h5["coords"]
        assert feats.dtype == np.float32 and feats.shape == (len(bag.coords), 32)
        assert coords.dtype == np.int64 and coords.shape == (len(bag.coords), 2)
        assert dict(coords.attrs) == {
            "patch_size": 256,
            "patch_size_level0": 256,
            "level0_magnification": 20,
            "target_magnification": 20,
            "overlap": 0,
            "name": "tiny",
            "savetodir": str(tmp_path / "features"),
            "level0_width": 4096,
            "level0_height": 3072,
        }
        assert feats.attrs["encoder"] == "demo"
        assert feats.attrs["name"] == "tiny"
        np.testing.assert_array_equal(coords[:], bag.coords)
        values = feats[:]

    xy = bag.coords
    assert (
        (xy % 256 == 0).all() and (xy[:, 0] + 256 <= 4096).all() and (xy[:, 1] + 256 <= 3072).all()
    )
    order = np.lexsort((xy[:, 0], xy[:, 1]))  # row-major: y, then x
    np.testing.assert_array_equal(order, np.arange(len(xy)))
    in_tissue, in_tumour = slide.truth_at(xy + 128)
    assert in_tissue.all()
    np.testing.assert_array_equal(in_tumour, bag.is_tumour)
    assert 0 < bag.is_tumour.sum() < len(xy)

    # Tumour patches are separable: they sit TUMOUR_SHIFT away along one shared direction.
    gap = values[bag.is_tumour].mean(axis=0) - values[~bag.is_tumour].mean(axis=0)
    assert np.linalg.norm(gap) > 2.0
    projected = values @ (gap / np.linalg.norm(gap))
    assert projected[bag.is_tumour].min() > np.median(projected[~bag.is_tumour])


def test_features_are_deterministic_per_seed(tiny: DemoSlide, tmp_path: Path) -> None:
    slide = tiny
    paths = [make_demo_features(slide, tmp_path / f"{s}.h5", seed=s).path for s in (1, 1, 2)]
    read = []
    for path in paths:
        with h5py.File(path) as h5:
            read.append(h5["features"][:])
    np.testing.assert_array_equal(read[0], read[1])
    assert not np.array_equal(read[0], read[2])


def test_a_slide_with_no_patches_gives_empty_trident_datasets(
    tiny: DemoSlide, tmp_path: Path
) -> None:
    slide = tiny
    bag = make_demo_features(slide, tmp_path / "empty.h5", patch_size_level0=4000)
    with h5py.File(bag.path) as h5:
        assert h5["features"].shape == (0, 64) and h5["features"].dtype == np.float32
        assert h5["coords"].shape == (0, 2) and h5["coords"].dtype == np.int64
    assert bag.is_tumour.shape == (0,)


# -------------------------------------------------------------------------------- checkpoint


def _bags(n: int = 2) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((20, 64)).astype(np.float32), i % 2) for i in range(n)]


def test_checkpoint_has_clam_sb_small_keys_and_loads_weights_only(tmp_path: Path) -> None:
    path = train_demo_checkpoint(_bags(), tmp_path / "s_0_checkpoint.pt", seconds=0.05)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == SB_SMALL_KEYS
    assert all(v.dtype == torch.float32 for v in state.values())
    model = ClamSB(embed_dim=64)
    model.load_state_dict(state, strict=True)


def test_legacy_checkpoint_matches_clams_demo_layout(tmp_path: Path) -> None:
    path = train_demo_checkpoint(_bags(), tmp_path / "legacy.pt", seconds=0.05, legacy_keys=True)
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = {
        k.replace("attention_net.", "attention_net.module."): v for k, v in SB_SMALL_KEYS.items()
    }
    expected["instance_loss_fn.labels"] = (2,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert state["instance_loss_fn.labels"].dtype == torch.int64
    model = load_model(path, "clam_sb", n_classes=2, embed_dim=64)  # CLAM's clean-up applies
    assert isinstance(model, ClamSB)


def test_training_is_reproducible_and_leaves_torch_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    a = train_demo_checkpoint(_bags(4), tmp_path / "a.pt", seconds=0.2, seed=5)
    b = train_demo_checkpoint(_bags(4), tmp_path / "b.pt", seconds=0.2, seed=5)
    c = train_demo_checkpoint(_bags(4), tmp_path / "c.pt", seconds=0.2, seed=6)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    sa, sb, sc = (torch.load(p, weights_only=True) for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_bytes_do_not_depend_on_the_file_name_or_run(tmp_path: Path) -> None:
    """torch.save to a path names the zip's inner folder after the (random) temp file; the demo
    saves through a file object, so the same weights give the same bytes every time."""
    a = train_demo_checkpoint(_bags(), tmp_path / "a.pt", seconds=0.05, seed=3)
    b = train_demo_checkpoint(_bags(), tmp_path / "sub" / "s_0_checkpoint.pt", seconds=0.05, seed=3)
    again = a.read_bytes()
    train_demo_checkpoint(_bags(), a, seconds=0.05, seed=3)
    assert a.read_bytes() == b.read_bytes() == again
    assert not [p for p in tmp_path.rglob(".*") if is_temp_name(p.name)]


# ----------------------------------------------------------------------------------- project


def test_tiny_project_is_complete_and_fast(project: DemoProject) -> None:
    made = project
    folder = made.folder
    assert made.slide_ids == ("demo_000", "demo_001", "demo_002", "demo_003", "demo_004")
    assert made.labels == ("tumour", "normal", "tumour", "normal", "tumour")
    assert made.slide_paths == tuple(folder / "slides" / f"{s}.tiff" for s in made.slide_ids)
    assert made.feature_paths == tuple(folder / "features" / f"{s}.h5" for s in made.slide_ids)
    assert made.checkpoint_path == folder / "ckpts" / "s_0_checkpoint.pt"
    assert all(p.is_file() for p in (*made.slide_paths, *made.feature_paths))
    assert (folder / "heatmaps").is_dir()
    assert made.process_list_path.read_text() == (
        "slide_id,label\ndemo_000,tumour\ndemo_001,normal\ndemo_002,tumour\n"
        "demo_003,normal\ndemo_004,tumour\n"
    )
    assert [s.has_tumour for s in made.slides] == [True, False, True, False, True]
    assert [bool(b.is_tumour.any()) for b in made.bags] == [True, False, True, False, True]
    assert not list(folder.rglob(".*.tmp"))


def test_project_config_is_clam_shaped_with_relative_paths(
    project: DemoProject,
) -> None:
    made = project
    text = made.config_path.read_text()
    assert text.startswith("#")
    config = yaml.safe_load(text)
    assert list(config) == [
        "exp_arguments",
        "data_arguments",
        "patching_arguments",
        "encoder_arguments",
        "model_arguments",
        "heatmap_arguments",
        "sample_arguments",
        "runner_arguments",
    ]
    data, model = config["data_arguments"], config["model_arguments"]
    assert data["data_dir"] == "slides" and data["slide_ext"] == ".tiff"
    assert data["process_list"] == "demo.csv" and data["preset"] == "presets/demo.csv"
    assert data["label_dict"] == {"normal": 0, "tumour": 1}
    assert model["ckpt_path"] == "ckpts/s_0_checkpoint.pt"
    assert model["model_type"] == "clam_sb" and model["embed_dim"] == 64
    assert config["patching_arguments"]["patch_size"] == 256
    assert config["patching_arguments"]["overlap"] == 0
    assert config["patching_arguments"]["patch_level"] == 0
    heat = config["heatmap_arguments"]
    assert heat["vis_level"] == -1 and heat["calc_heatmap"] is False and heat["save_ext"] == "jpg"
    exp = config["exp_arguments"]
    assert exp["save_exp_code"] == "demo" and exp["n_classes"] == 2
    assert exp["raw_save_dir"] == "heatmaps/heatmap_raw_results"
    assert exp["production_save_dir"] == "heatmaps/heatmap_production_results"
    assert config["sample_arguments"]["samples"][0]["mode"] == "topk"
    assert config["runner_arguments"] == {
        "features_dir": "features",
        "device": "auto",
        "results_dir": "heatmaps/results",
    }
    folder = made.folder
    assert (folder / data["data_dir"]).is_dir() and (folder / model["ckpt_path"]).is_file()
    assert (folder / "process_lists" / data["process_list"]).is_file()


def test_trained_attention_is_higher_on_tumour_patches(project: DemoProject) -> None:
    made = project
    model = load_model(made.checkpoint_path, "clam_sb", n_classes=2, embed_dim=64)
    for bag, label in zip(made.bags, made.labels, strict=True):
        with h5py.File(bag.path) as h5:
            out = run_attention(model, h5["features"][:])
        assert out.pred == {"normal": 0, "tumour": 1}[label], bag.path.name
        if bag.is_tumour.any():
            scores = out.attention
            assert scores[bag.is_tumour].mean() > scores[~bag.is_tumour].mean() + 1.0
            top = np.argsort(-scores)[: bag.is_tumour.sum()]
            assert bag.is_tumour[top].mean() >= 0.8


def test_attention_generalises_to_an_unseen_demo_slide(
    project: DemoProject, tmp_path: Path
) -> None:
    made = project
    slide = make_demo_slide(tmp_path / "new.tiff", width=2048, height=1536, seed=99)
    bag = make_demo_features(slide, tmp_path / "new.h5", patch_size_level0=128, seed=99)
    model = load_model(made.checkpoint_path, "clam_sb", n_classes=2, embed_dim=64)
    with h5py.File(bag.path) as h5:
        out = run_attention(model, h5["features"][:])
    assert out.pred == 1
    assert out.attention[bag.is_tumour].mean() > out.attention[~bag.is_tumour].mean() + 1.0


def test_project_is_reused_with_same_parameters_and_rebuilt_otherwise(
    project: DemoProject, tmp_path: Path
) -> None:
    made = project
    folder = tmp_path / "copy"
    shutil.copytree(made.folder, folder)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}

    again = make_demo_project(folder)  # its time is in bench/limits.py
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps
    for old, new in zip(made.bags, again.bags, strict=True):
        np.testing.assert_array_equal(old.coords, new.coords)
        np.testing.assert_array_equal(old.is_tumour, new.is_tumour)
    assert [(s.seed, s.has_tumour, s.level_dimensions, s.mpp) for s in again.slides] == [
        (s.seed, s.has_tumour, s.level_dimensions, s.mpp) for s in made.slides
    ]

    smaller = make_demo_project(folder, n_slides=2)
    assert sorted(p.name for p in (folder / "slides").iterdir()) == [
        "demo_000.tiff",
        "demo_001.tiff",
    ]
    assert sorted(p.name for p in (folder / "features").iterdir()) == ["demo_000.h5", "demo_001.h5"]
    assert smaller.process_list_path.read_text().count("\n") == 3
    assert '"n_slides": 2' in (folder / "demo_manifest.json").read_text()


@pytest.mark.slow
def test_demo_of_a_model_without_attention_draws_it_with_integrated_gradients(
    tmp_path: Path,
) -> None:
    """``clam-heat demo --model dftd`` (issue #22: no per-patch attention map) writes a config
    whose method applies to the model, so the demo runs instead of failing every row on the
    attention refusal. Catches a demo config that keeps ``attention`` for such a model."""
    import h5py
    import torch
    import yaml
    from typer.testing import CliRunner

    from clam_heat.cli import app

    folder = tmp_path / "dftd_demo"
    made = CliRunner().invoke(
        app, ["demo", "--model", "dftd", "--folder", str(folder), "--slides", "1", "-q"]
    )
    assert made.exit_code == 0, made.output
    assert "rows: 1 done" in made.output
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_arguments"]["model_type"] == "dftd.base.conch_v1.demo"
    assert config["heatmap_arguments"]["method"] == "integrated_gradients"
    state = torch.load(folder / "ckpts" / "dftd_demo.pt", weights_only=True)
    assert "model.attCls.classifier.fc.weight" in state  # MIL-Lab's DFTD layout
    (blockmap,) = folder.rglob("demo_000_integrated_gradients_blockmap.h5")
    with h5py.File(blockmap) as h5:
        assert h5.attrs["signed"] and h5["attention_scores"].shape[0] > 0
    assert list(folder.rglob("demo_000_integrated_gradients_heatmap.jpg"))


def test_demo_of_a_mil_lab_model_runs_with_mil_lab_flags(tmp_path: Path) -> None:
    """``clam-heat demo --model abmil`` trains ABMIL, saves it as MIL-Lab does, and MIL-Lab's
    command line (``--model_name abmil.base.<encoder>.<task>``) runs on it. Catches: a demo that
    only makes CLAM checkpoints, a checkpoint in another key layout than MIL-Lab's ``model.*``,
    and a demo whose features do not match the encoder its model name says."""
    import pandas as pd
    import torch
    from typer.testing import CliRunner

    from clam_heat.cli import app

    runner = CliRunner()
    folder = tmp_path / "abmil_demo"
    made = runner.invoke(app, ["demo", "--model", "abmil", "--folder", str(folder), "--slides",
                               "2", "-q"])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "rows: 2 done" in made.output
    ckpt = folder / "ckpts" / "abmil_demo.pt"
    state = torch.load(ckpt, weights_only=True)
    assert all(key.startswith("model.") for key in state), list(state)[:3]
    assert state["model.patch_embed.0.weight"].shape[1] == 512  # conch_v1's width

    out = tmp_path / "heatmaps" / "abmil_results"
    quick = runner.invoke(app, [
        "quick", "--checkpoint", str(ckpt), "--h5_dir", str(folder / "features"),
        "--slide_dir", str(folder / "slides"), "--output_dir", str(out),
        "--model_name", "abmil.base.conch_v1.demo", "-q",
    ])  # fmt: skip
    assert quick.exit_code == 0, quick.output
    results = pd.read_csv(out / "heatmap_results.csv", dtype={"slide_id": str})
    assert results["slide_id"].tolist() == ["demo_000", "demo_001"]
    # the demo's truth: even slides hold tumour (class 1), odd ones do not
    assert results["prediction"].astype(int).tolist() == [1, 0]
    assert all((out / f"{sid}_heatmap.png").is_file() for sid in results["slide_id"])

    unknown = runner.invoke(app, ["demo", "--model", "nope", "--folder", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "--model 'nope': must be a registered model" in (
        unknown.output
    )
    assert not (tmp_path / "x").exists()
