"""Features reader: real HDF5 files in TRIDENT and CLAM layouts, every patch-size rule, every
error. Slides are real OpenSlide files from tests/data (and an in-memory ArraySlide)."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from clam_heat.errors import FeatureError
from clam_heat.features import (
    Bag,
    PatchSizeGuessWarning,
    find_features_file,
    load_bag,
    patch_size_from_attrs,
)
from clam_heat.slide import ArraySlide, open_slide

DATA = Path(__file__).resolve().parent / "data"  # shipped with the repository
REAL_SLIDE = DATA / "real" / "cmu_small_region.svs"  # MPP 0.499 -> 20x, one level
BOXES = DATA / "openslide-fixtures" / "boxes.tiff"  # 4 levels, downsample 8.108 at 3


def grid(n: int = 12, step: int = 256, cols: int = 4) -> np.ndarray:
    """(n, 2) int64 level-0 top-left corners on a regular grid."""
    i = np.arange(n)
    return np.stack([(i % cols) * step, (i // cols) * step], axis=1).astype(np.int64)


def write_h5(
    path: Path,
    *,
    features: np.ndarray | None = None,
    coords: np.ndarray | None = None,
    coords_attrs: dict | None = None,
    features_attrs: dict | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if features is not None:
            ds = f.create_dataset("features", data=features)
            for key, value in (features_attrs or {}).items():
                ds.attrs[key] = value
        if coords is not None:
            ds = f.create_dataset("coords", data=coords)
            for key, value in (coords_attrs or {}).items():
                ds.attrs[key] = value
    return path


def feats(n: int = 12, d: int = 8, dtype: type = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


# --------------------------------------------------------------------------------------------
# finding the file


def test_find_features_file_order_and_clam_layout(tmp_path: Path) -> None:
    feat_dir, raw = tmp_path / "feat", tmp_path / "raw"
    clam = write_h5(feat_dir / "h5_files" / "s1.h5", features=feats())
    assert find_features_file("s1", features_dir=feat_dir, raw_dir=raw) == clam
    trident = write_h5(feat_dir / "s1.h5", features=feats())
    assert find_features_file("s1", features_dir=feat_dir, raw_dir=raw) == trident
    cached = write_h5(raw / "s2.h5", features=feats())
    assert find_features_file("s2", features_dir=feat_dir, raw_dir=raw) == cached
    assert find_features_file("s2", features_dir=None, raw_dir=raw) == cached


def test_find_features_file_not_found_names_every_place(tmp_path: Path) -> None:
    feat_dir, raw = tmp_path / "feat", tmp_path / "raw"
    with pytest.raises(FeatureError) as err:
        find_features_file("s9", features_dir=feat_dir, raw_dir=raw)
    assert str(err.value) == (
        f"features for slide 's9' not found (looked at {feat_dir / 's9.h5'}, "
        f"{feat_dir / 'h5_files' / 's9.h5'}, {raw / 's9.h5'}); set "
        "runner_arguments.features_dir to the folder holding <slide_id>.h5 (TRIDENT "
        "features_<encoder>/ or CLAM's feat_dir)"
    )


# --------------------------------------------------------------------------------------------
# rules a-f


def test_rule_a_trident_float_attr_fp16_features_bytes_encoder(tmp_path: Path) -> None:
    coords = grid()
    path = write_h5(
        tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v2" / "s1.h5",
        features=feats(dtype=np.float16),
        coords=coords,
        coords_attrs={
            "patch_size_level0": 512.0,  # float64 from run_batch_of_slides v0.3.0+
            "patch_size": 256,
            "level0_magnification": 40,
            "target_magnification": 20.0,
            "overlap": 0,
            "name": b"s1",
        },
        features_attrs={"encoder": np.bytes_(b"uni_v2"), "name": "s1"},
    )
    bag = load_bag(path)
    assert isinstance(bag, Bag)
    assert bag.features.dtype == np.float32 and bag.features.shape == (12, 8)
    np.testing.assert_array_equal(bag.features, feats(dtype=np.float16).astype(np.float32))
    assert bag.coords_l0.dtype == np.int64
    np.testing.assert_array_equal(bag.coords_l0, coords)
    assert (bag.patch_size_l0, bag.patch_size_rule) == (512, "a")
    assert bag.encoder == "uni_v2"
    assert bag.overlap_l0 == 0
    assert bag.path == path and bag.coords_path == path
    assert (bag.n_patches, bag.dim) == (12, 8)


def test_rule_b_when_size_level0_is_the_string_none(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "features_conch_v15" / "s1.h5",
        features=feats(),
        coords=grid(step=384),
        coords_attrs={
            "patch_size_level0": "None",
            "patch_size": 256,
            "level0_magnification": 60,
            "target_magnification": 40,
            "overlap": 32,
        },
        features_attrs={"encoder": "None"},
    )
    bag = load_bag(path)
    assert (bag.patch_size_l0, bag.patch_size_rule) == (384, "b")
    assert bag.overlap_l0 == 48
    assert bag.encoder == "conch_v15"  # 'None' attr is missing -> folder name


def test_bytes_and_numeric_string_attrs_are_decoded(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "s1.h5",
        features=feats(),
        coords=grid(),
        coords_attrs={
            "patch_size_level0": np.bytes_(b"None"),
            "patch_size": np.bytes_(b"224"),
            "level0_magnification": "40",
            "target_magnification": b"20",
        },
        features_attrs={"encoder": b"None"},
    )
    bag = load_bag(path)
    assert (bag.patch_size_l0, bag.patch_size_rule, bag.encoder) == (448, "b", None)


def test_rule_c_clam_downsample_attr_and_custom_downsample(tmp_path: Path) -> None:
    attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])}
    path = write_h5(tmp_path / "a.h5", features=feats(), coords=grid(), coords_attrs=attrs)
    bag = load_bag(path)
    assert (bag.patch_size_l0, bag.patch_size_rule, bag.encoder) == (1024, "c", None)
    attrs["custom_downsample"] = 2
    path = write_h5(tmp_path / "b.h5", features=feats(), coords=grid(), coords_attrs=attrs)
    assert load_bag(path).patch_size_l0 == 2048


def test_rule_c_downsample_from_a_real_openslide_pyramid(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "s.h5",
        features=feats(),
        coords=grid(),
        coords_attrs={"patch_size": 32, "patch_level": 3},
    )
    with open_slide(BOXES) as slide:
        bag = load_bag(path, slide=slide)
        expected = int(round(32 * slide.level_downsamples[3][0]))
    assert (bag.patch_size_l0, bag.patch_size_rule) == (expected, "c")
    assert expected == 259  # 300 / 37 = 8.108 per axis, measured as CLAM does
    array_slide = ArraySlide(np.zeros((64, 64, 3), np.uint8), n_levels=2, level_factor=4)
    with pytest.warns(PatchSizeGuessWarning):  # level 3 does not exist there: falls to f
        assert load_bag(path, slide=array_slide).patch_size_rule == "f"


def test_rule_d_clam_features_with_patches_dir(tmp_path: Path) -> None:
    coords = grid(step=512)
    features_path = write_h5(
        tmp_path / "feat" / "h5_files" / "s1.h5",
        features=feats(),
        coords=coords.astype(np.int32),  # CLAM: int32 coords, no attrs
    )
    write_h5(
        tmp_path / "patches_run" / "patches" / "s1.h5",
        coords=coords,
        coords_attrs={
            "patch_size": 256,
            "patch_level": 0,
            "downsample": [1.0, 1.0],
            "custom_downsample": 2,
        },
    )
    bag = load_bag(features_path, patches_dir=tmp_path / "patches_run")
    assert (bag.patch_size_l0, bag.patch_size_rule) == (512, "d")
    assert bag.coords_l0.dtype == np.int64
    assert bag.coords_path == features_path
    assert "patches_run" in bag.patch_size_detail


def test_rule_d_trident_companion_supplies_coords_and_size(tmp_path: Path) -> None:
    cfg = tmp_path / "job" / "20x_256px_0px_overlap"
    coords = grid(step=512)
    features_path = write_h5(cfg / "features_uni_v1" / "s1.h5", features=feats())
    companion = write_h5(
        cfg / "patches" / "s1_patches.h5",
        coords=coords,
        coords_attrs={
            "patch_size_level0": 512,
            "overlap": 64,
            "level0_magnification": 40,
            "target_magnification": 20,
            "patch_size": 256,
        },
    )
    bag = load_bag(features_path)
    assert (bag.patch_size_l0, bag.patch_size_rule) == (512, "d")
    assert bag.coords_path == companion
    assert bag.overlap_l0 == 128
    np.testing.assert_array_equal(bag.coords_l0, coords)


def test_rule_e_folder_name_and_real_slide_mpp(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "10x_224px_0px_overlap" / "features_resnet50" / "s1.h5",
        features=feats(),
        coords=grid(step=448),
    )
    with open_slide(REAL_SLIDE) as slide:  # MPP 0.499 -> TRIDENT bucket 20x
        bag = load_bag(path, slide=slide)
    assert (bag.patch_size_l0, bag.patch_size_rule) == (448, "e")
    assert bag.overlap_l0 == 0
    # boxes.tiff: MPP 352 and no objective power, so rule e cannot apply
    with open_slide(BOXES) as slide, pytest.warns(PatchSizeGuessWarning):
        assert load_bag(path, slide=slide).patch_size_rule == "f"


def test_rule_f_coordinate_step_warns_loudly(tmp_path: Path) -> None:
    coords = grid(step=224)[[0, 2, 5, 7, 11]]  # gaps: some patches missing
    path = write_h5(tmp_path / "s1.h5", features=feats(5), coords=coords)
    with pytest.warns(PatchSizeGuessWarning, match="guessed as 224 px from coordinate spacing"):
        bag = load_bag(path)
    assert (bag.patch_size_l0, bag.patch_size_rule) == (224, "f")


def test_rule_f_impossible_with_one_patch(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1.h5", features=feats(1), coords=np.array([[5, 7]]))
    with pytest.raises(FeatureError, match="cannot determine the level-0 patch size"):
        load_bag(path)
    assert load_bag(path, patch_size_level0_override=256).patch_size_l0 == 256


def test_override_beats_every_attr(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "s1.h5",
        features=feats(),
        coords=grid(),
        coords_attrs={"patch_size_level0": 512},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bag = load_bag(path, patch_size_level0_override=300)
    assert (bag.patch_size_l0, bag.patch_size_rule) == (300, "override")


def test_patch_size_from_attrs_prefers_a_then_b_then_c() -> None:
    attrs = {
        "patch_size_level0": 1000,
        "patch_size": 256,
        "level0_magnification": 40,
        "target_magnification": 20,
        "patch_level": 1,
        "downsample": [4.0, 4.0],
    }
    assert patch_size_from_attrs(attrs)[:2] == (1000, "a")
    del attrs["patch_size_level0"]
    assert patch_size_from_attrs(attrs)[:2] == (512, "b")
    del attrs["level0_magnification"]
    assert patch_size_from_attrs(attrs)[:2] == (1024, "c")
    assert patch_size_from_attrs({}) is None


# --------------------------------------------------------------------------------------------
# shapes and casts


def test_three_d_bag_is_squeezed(tmp_path: Path) -> None:
    data = feats()[None]
    path = write_h5(
        tmp_path / "s1.h5", features=data, coords=grid(), coords_attrs={"patch_size_level0": 256}
    )
    bag = load_bag(path)
    assert bag.features.shape == (12, 8)
    np.testing.assert_array_equal(bag.features, data[0])


@pytest.mark.parametrize("shape", [(2, 12, 8), (96,), (1, 1, 12, 8)])
def test_other_feature_ranks_are_rejected(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write_h5(tmp_path / "s1.h5", features=np.zeros(shape, np.float32), coords=grid())
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    assert str(err.value) == (
        f"{path}: 'features' has shape {shape}, expected (N, D) or (1, N, D) "
        "(re-extract the features with TRIDENT or CLAM)"
    )


def test_three_d_coords_are_squeezed_like_three_d_features(tmp_path: Path) -> None:
    """Legacy CLAM/MIL-Lab files store coords as (1, N, 2) next to (1, N, D) features."""
    path = write_h5(
        tmp_path / "s1.h5",
        features=feats()[None],
        coords=grid()[None].astype(np.int32),
        coords_attrs={"patch_size_level0": 256},
    )
    bag = load_bag(path)
    assert bag.coords_l0.shape == (12, 2) and bag.coords_l0.dtype == np.int64
    np.testing.assert_array_equal(bag.coords_l0, grid())
    # a 3-D companion (TRIDENT-style patches file) is squeezed too, and its row count is N
    cfg = tmp_path / "job"
    features_path = write_h5(cfg / "features_uni_v1" / "s2.h5", features=feats())
    write_h5(
        cfg / "patches" / "s2_patches.h5",
        coords=grid(step=512)[None],
        coords_attrs={"patch_size_level0": 512},
    )
    companion_bag = load_bag(features_path)
    np.testing.assert_array_equal(companion_bag.coords_l0, grid(step=512))
    assert companion_bag.patch_size_l0 == 512
    # more than one leading bag is not a legacy layout
    bad = write_h5(tmp_path / "s3.h5", features=feats(), coords=np.zeros((2, 12, 2), np.int64))
    with pytest.raises(FeatureError, match=r"'coords' has shape \(2, 12, 2\), expected"):
        load_bag(bad)


def test_float_coords_are_rounded_to_int64(tmp_path: Path) -> None:
    coords = grid().astype(np.float64) + 0.4
    path = write_h5(
        tmp_path / "s1.h5", features=feats(), coords=coords, coords_attrs={"patch_size_level0": 256}
    )
    bag = load_bag(path)
    assert bag.coords_l0.dtype == np.int64
    np.testing.assert_array_equal(bag.coords_l0, grid())


# --------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="features file not found"):
        load_bag(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "s1.h5"
    path.write_text("slide_id,label\n")
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a readable HDF5 file (")
    assert message.endswith("re-extract the features or remove the slide from the process list")
    assert "\n" not in message


def test_truncated_hdf5(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1.h5", features=feats(4000, 64), coords=grid(4000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureError, match=r"s1\.h5: (not a readable HDF5 file|dataset)"):
        load_bag(path)


def test_coords_only_file_has_no_features(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1_patches.h5", coords=grid())
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    assert str(err.value) == (
        f"{path}: no 'features' dataset (datasets: coords); this looks like a coords-only "
        "patches file, point runner_arguments.features_dir at the features folder (TRIDENT "
        "features_<encoder>/, CLAM feat_dir)"
    )


def test_empty_bag(tmp_path: Path) -> None:
    path = write_h5(
        tmp_path / "s1.h5", features=np.zeros((0, 8), np.float32), coords=np.zeros((0, 2), np.int64)
    )
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    assert str(err.value) == (
        f"{path}: empty bag (0 patches); the slide had no tissue patches, remove it from the "
        "process list or re-run patching"
    )


def test_nan_and_inf_rows_are_counted(tmp_path: Path) -> None:
    data = feats()
    data[1, 0] = np.nan
    data[4, :] = np.nan
    data[7, 3] = np.inf
    path = write_h5(tmp_path / "s1.h5", features=data, coords=grid())
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    assert str(err.value) == (
        f"{path}: 3 of 12 feature rows contain NaN or Inf (re-extract the features, e.g. "
        "without fp16 overflow)"
    )


def test_fp16_overflow_in_float64_file_is_caught(tmp_path: Path) -> None:
    data = feats().astype(np.float64)
    data[2, 2] = 1e300  # finite in float64, Inf once cast to float32
    path = write_h5(tmp_path / "s1.h5", features=data, coords=grid())
    with pytest.raises(FeatureError, match="1 of 12 feature rows contain NaN or Inf"):
        load_bag(path)


def test_coords_missing_everywhere(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "feat" / "s1.h5", features=feats())
    patches = tmp_path / "patches"
    with pytest.raises(FeatureError) as err:
        load_bag(path, patches_dir=patches)
    message = str(err.value)
    assert message.startswith(f"{path}: coords missing (no 'coords' dataset in the file, ")
    for place in (
        tmp_path / "patches" / "s1_patches.h5",
        patches / "s1.h5",
        patches / "patches" / "s1.h5",
    ):
        assert str(place) in message
    assert message.endswith(
        "set runner_arguments.patches_dir to the folder of <slide_id>.h5 coords files"
    )


def test_coords_wrong_shape(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1.h5", features=feats(), coords=np.zeros((12, 3), np.int64))
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    assert str(err.value) == (
        f"{path}: 'coords' has shape (12, 3), expected (N, 2) or (1, N, 2) level-0 (x, y) "
        "(re-run patching)"
    )


def test_count_mismatch_names_both_numbers(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1.h5", features=feats(12), coords=grid(10))
    with pytest.raises(FeatureError) as err:
        load_bag(path)
    assert str(err.value) == (
        f"{path}: features has 12 rows but coords has 10 (features and coords come from "
        "different patching runs; re-extract, or point runner_arguments.patches_dir at the "
        "matching coords)"
    )


def test_count_mismatch_with_companion_coords_names_the_companion(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "feat" / "h5_files" / "s1.h5", features=feats(12))
    companion = write_h5(tmp_path / "pp" / "s1.h5", coords=grid(9))
    with pytest.raises(FeatureError, match=rf"coords \(from {companion}\) has 9"):
        load_bag(path, patches_dir=tmp_path / "pp")


def test_non_numeric_features_rejected(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1.h5", features=np.array([[b"a", b"b"]]), coords=grid(1))
    with pytest.raises(FeatureError, match="non-numeric dtype"):
        load_bag(path)


def test_bad_override(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "s1.h5", features=feats(), coords=grid())
    with pytest.raises(FeatureError, match="patch_size_level0 = 0 must be a positive"):
        load_bag(path, patch_size_level0_override=0)
