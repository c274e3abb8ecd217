"""Training-time attention heatmaps: pure maps, fallbacks, and real TensorBoard event files."""

from __future__ import annotations

import gc
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from clam_heat.models import ClamMB, ClamSB
from clam_heat.training import (
    AttentionHeatmapLogger,
    GridFallbackWarning,
    HeatmapSkippedWarning,
    attention_scores,
    grid_attention_map,
    log_validation_attention,
    normalize_attention,
    open_summary_writer,
    spatial_attention_map,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_clam_tensorboard.py"
EMBED = 16


# ------------------------------------------------------------------------------------ helpers


def grid_coords(cols: int, rows: int, step: int = 256, l0_offset=(0, 0)) -> np.ndarray:
    """(cols * rows, 2) int64 level-0 top-left coords of a full patch grid, row-major."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * step + np.array(l0_offset)


def read_images(logdir: Path) -> dict[str, list[tuple[int, int, int, np.ndarray]]]:
    """Tag -> [(step, width, height, decoded RGB(A) pixels)] from the real event files."""
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    out: dict[str, list[tuple[int, int, int, np.ndarray]]] = {}
    for tag in acc.Tags()["images"]:
        out[tag] = [
            (e.step, e.width, e.height, np.asarray(Image.open(io.BytesIO(e.encoded_image_string))))
            for e in acc.Images(tag)
        ]
    return out


def painted_grid(scores: np.ndarray, cols: int, rows: int, cell: int) -> np.ndarray:
    """Oracle for a full, non-overlapping row-major patch grid: softmax then min-max of the
    scores, each patch a ``cell`` x ``cell`` block of matplotlib's ``hot`` colour for its value
    (``uint8(cmap(v) * 255)``, CLAM's colour rule)."""
    raw = np.asarray(scores, dtype=np.float64).reshape(-1)
    soft = np.exp(raw - raw.max()) / np.exp(raw - raw.max()).sum()
    value = (soft - soft.min()) / (soft.max() - soft.min())
    colours = (matplotlib.colormaps["hot"](value)[:, :3] * 255).astype(np.uint8)
    return colours.reshape(rows, cols, 3).repeat(cell, axis=0).repeat(cell, axis=1)


class ListWriter:
    """Keeps images in memory; for checks that need no event file."""

    def __init__(self) -> None:
        self.images: list[tuple[str, np.ndarray, int]] = []

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str) -> None:
        assert dataformats == "HWC"
        self.images.append((tag, img, global_step))


def live_figures() -> int:
    """Number of matplotlib Figure objects alive in this process (after a full collection)."""
    from matplotlib.figure import Figure

    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Figure))


@pytest.fixture(scope="module")
def sb_model() -> ClamSB:
    torch.manual_seed(0)
    return ClamSB(gate=True, size_arg="small", dropout=0.0, n_classes=2, embed_dim=EMBED).eval()


def write_trident_h5(path: Path, coords: np.ndarray, patch_size_level0: float | None) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=np.zeros((len(coords), EMBED), np.float32))
        dset = handle.create_dataset("coords", data=coords.astype(np.int64))
        if patch_size_level0 is not None:
            dset.attrs["patch_size_level0"] = patch_size_level0
            dset.attrs["patch_size"] = 256


# ------------------------------------------------------------------------ attention_scores


def test_scores_from_clam_sb_forward_output(sb_model: ClamSB) -> None:
    h = torch.randn(7, EMBED)
    out = sb_model(h)
    assert out[3].shape == (1, 7)
    np.testing.assert_allclose(attention_scores(out), out[3][0].detach().numpy(), rtol=1e-6)


def test_scores_from_clam_mb_use_predicted_class_row() -> None:
    torch.manual_seed(1)
    model = ClamMB(gate=True, size_arg="small", n_classes=3, embed_dim=EMBED).eval()
    out = model(torch.randn(9, EMBED))
    y_hat = int(out[2].item())
    np.testing.assert_allclose(attention_scores(out), out[3][y_hat].detach().numpy(), rtol=1e-6)
    other = (y_hat + 1) % 3
    np.testing.assert_allclose(
        attention_scores(out, class_index=other), out[3][other].detach().numpy(), rtol=1e-6
    )


def test_scores_accept_plain_shapes_and_grad_tensors() -> None:
    raw = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    np.testing.assert_array_equal(attention_scores(raw), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(attention_scores(raw[None]), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(
        attention_scores(np.arange(6.0).reshape(1, 2, 3), class_index=1), [3.0, 4.0, 5.0]
    )


def test_scores_multi_branch_without_class_needs_a_choice() -> None:
    with pytest.raises(ValueError, match=r"shape \(3, 4\) has 3 branches .* pass class_index"):
        attention_scores(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="class_index 5 is out of range for attention with 3"):
        attention_scores(np.zeros((3, 4)), class_index=5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([1.0, np.nan, np.inf]), "attention has 2 non-finite score"),
        (np.zeros(0), "attention is empty"),
        (np.zeros((2, 2, 2)), r"must have shape .* got \(2, 2, 2\)"),
    ],
)
def test_scores_reject_bad_input(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attention_scores(bad)


def test_normalise_unknown_method() -> None:
    with pytest.raises(ValueError, match="normalize must be 'softmax', 'rank' or 'minmax'"):
        normalize_attention(np.zeros(3), "zscore")  # type: ignore[arg-type]


def test_softmax_normalisation_is_shift_invariant_and_one_patch_is_mid_scale() -> None:
    scores = np.array([0.3, -2.0, 5.0, 1.0])
    np.testing.assert_allclose(normalize_attention(scores), normalize_attention(scores + 1000.0))
    np.testing.assert_array_equal(normalize_attention(np.array([4.2])), [0.5])


# ------------------------------------------------------------------- spatial_attention_map


def test_spatial_map_overlap_average_hand_worked() -> None:
    # Patches (2x2 level-0 px, downsample 1): A at (0,0)=0, B at (1,0)=1, C at (2,2)=0.5
    # after min-max. Column 1 of rows 0-1 is covered by A and B -> mean 0.5 -> grey 128.
    img = spatial_attention_map(
        [0.0, 2.0, 1.0],
        [[0, 0], [1, 0], [2, 2]],
        patch_size=2,
        downsample=1,
        cmap="gray",
        normalize="minmax",
        background=(7, 7, 7),
    )
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8
    expected = [[0, 128, 255, 7], [0, 128, 255, 7], [7, 7, 128, 128], [7, 7, 128, 128]]
    np.testing.assert_array_equal(img[..., 0], expected)


def test_spatial_map_size_from_coords_extent_and_downsample() -> None:
    coords = grid_coords(5, 3, step=512, l0_offset=(10_240, 4_096))
    img = spatial_attention_map(np.arange(15.0), coords, patch_size=512, downsample=32)
    # extent: 5 * 512 = 2560 wide, 3 * 512 = 1536 high, offset removed -> / 32
    assert img.shape == (48, 80, 3)
    # the top-left patch has the lowest score: its 16x16 block is the darkest colour of "hot"
    assert (img[:16, :16] == img[0, 0]).all()
    assert img[0, 0].tolist() == [10, 0, 0]  # uint8(hot(0) * 255), truncated as CLAM does


def test_spatial_map_missing_patches_are_background_or_transparent() -> None:
    coords = grid_coords(2, 2)[[0, 3]]  # a diagonal pair: two quadrants stay empty
    rgb = spatial_attention_map([1.0, 2.0], coords, downsample=64, background=(1, 2, 3))
    assert rgb[0, 7].tolist() == [1, 2, 3] and rgb[7, 0].tolist() == [1, 2, 3]
    rgba = spatial_attention_map([1.0, 2.0], coords, downsample=64, background=None)
    assert rgba.shape == (8, 8, 4)
    np.testing.assert_array_equal(rgba[..., 3][::4, ::4], [[255, 0], [0, 255]])


def test_spatial_map_refuses_huge_canvas_and_names_the_fix() -> None:
    coords = np.array([[0, 0], [200_000, 200_000]])
    with pytest.raises(ValueError, match=r"canvas would be 50001x50001 px at downsample=4 .* >= "):
        spatial_attention_map([1.0, 2.0], coords, patch_size=4, downsample=4)


def test_spatial_map_rejects_count_mismatch() -> None:
    with pytest.raises(ValueError, match="coords has 4 rows but attention has 3 scores"):
        spatial_attention_map([1.0, 2.0, 3.0], grid_coords(2, 2))


def test_spatial_map_with_colorbar_is_a_larger_rgb_figure() -> None:
    coords = grid_coords(4, 4)
    plain = spatial_attention_map(np.arange(16.0), coords)
    figures_before = live_figures()
    fig = spatial_attention_map(np.arange(16.0), coords, colorbar=True)
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    assert fig.shape[0] > plain.shape[0] and fig.shape[1] > plain.shape[1]
    assert live_figures() == figures_before


# ---------------------------------------------------------------------- grid_attention_map


def test_grid_map_layout_and_unused_cells() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching coords: the grid was asked for, no warning
        img = grid_attention_map(
            [0.0, 1.0, 2.0, 3.0, 4.0],
            np.zeros((5, 2)),
            cell_size=2,
            cmap="gray",
            normalize="minmax",
            background=(7, 7, 7),
        )
    assert img.shape == (4, 6, 3)  # side ceil(sqrt(5)) = 3, rows 2, cells of 2 px
    # heatmap.apply_colormap's rule: index int(v * 256), so 0.75 -> 192 on "gray"
    np.testing.assert_array_equal(img[::2, ::2, 0], [[0, 64, 128], [192, 255, 7]])


def test_grid_map_warns_missing_coords_with_counts() -> None:
    with pytest.warns(GridFallbackWarning) as record:
        grid_attention_map(np.arange(10.0))
    assert len(record) == 1
    assert str(record[0].message).startswith(
        "coords missing: 10 attention scores, 0 coordinates; drawing patches in a square grid"
    )


def test_grid_map_warns_count_mismatch_with_counts() -> None:
    with pytest.warns(GridFallbackWarning, match="coords count mismatch: 10 attention scores, 12"):
        img = grid_attention_map(np.arange(10.0), grid_coords(4, 3))
    assert img.shape[:2] == (3 * 16, 4 * 16)  # side 4, rows 3, default cell 256 // 4 -> 16


# ------------------------------------------------------------------ AttentionHeatmapLogger


def test_logger_writes_spatial_map_for_first_val_slide_each_epoch(
    tmp_path: Path, sb_model: ClamSB
) -> None:
    coords = grid_coords(6, 4, l0_offset=(2048, 1024))
    writer = SummaryWriter(str(tmp_path))
    logger = AttentionHeatmapLogger(writer)
    first_outputs = []
    with torch.no_grad():
        for epoch in range(3):
            for slide in range(3):  # only slide 0 of each epoch is drawn
                out = sb_model(torch.randn(24, EMBED))
                tag = logger.log(out, coords, step=epoch, slide_id=f"s{slide}")
                assert tag == ("val/spatial_attention_heatmap" if slide == 0 else None)
                if slide == 0:
                    first_outputs.append(out)
    writer.close()
    images = read_images(tmp_path)
    assert list(images) == ["val/spatial_attention_heatmap"]
    logged = images["val/spatial_attention_heatmap"]
    assert [(step, w, h) for step, w, h, _ in logged] == [(0, 48, 32), (1, 48, 32), (2, 48, 32)]
    np.testing.assert_array_equal(logged[1][3], spatial_attention_map(first_outputs[1], coords))


def test_logger_every_n_epochs_and_tag_prefix(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    logger = AttentionHeatmapLogger(writer, every_n_epochs=2, tag_prefix="valid")
    for epoch in range(5):
        logger.log(np.arange(4.0), grid_coords(2, 2), step=epoch)
    writer.close()
    logged = read_images(tmp_path)["valid/spatial_attention_heatmap"]
    assert [step for step, *_ in logged] == [0, 2, 4]


def test_logger_clam_mb_draws_the_predicted_class(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = ClamMB(gate=True, size_arg="small", n_classes=3, embed_dim=EMBED).eval()
    coords = grid_coords(3, 3)
    with torch.no_grad():
        out = model(torch.randn(9, EMBED))
    writer = SummaryWriter(str(tmp_path))
    AttentionHeatmapLogger(writer).log(out, coords, step=0)
    writer.close()
    ((_, _, _, pixels),) = read_images(tmp_path)["val/spatial_attention_heatmap"]
    row = out[3][int(out[2].item())].numpy()
    np.testing.assert_array_equal(pixels, spatial_attention_map(row, coords))


def test_logger_missing_coords_logs_grid_and_warns(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with pytest.warns(GridFallbackWarning, match="step 4: coords missing: 20 attention scores, 0"):
        tag = AttentionHeatmapLogger(writer).log(np.arange(20.0), step=4)
    writer.close()
    assert tag == "val/grid_attention_heatmap"
    [(step, width, height, _)] = read_images(tmp_path)["val/grid_attention_heatmap"]
    assert (step, width, height) == (4, 5 * 16, 4 * 16)


def test_logger_count_mismatch_logs_grid_and_warns(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with pytest.warns(
        GridFallbackWarning,
        match="slide 'a', step 0: coords count mismatch: 20 attention scores, 6",
    ):
        AttentionHeatmapLogger(writer).log(np.arange(20.0), grid_coords(3, 2), step=0, slide_id="a")
    writer.close()
    assert list(read_images(tmp_path)) == ["val/grid_attention_heatmap"]


def test_logger_reads_trident_coords_and_patch_size_from_h5(tmp_path: Path) -> None:
    feats = tmp_path / "features_uni_v1"
    feats.mkdir()
    write_trident_h5(feats / "slide_a.h5", grid_coords(4, 2, step=512), patch_size_level0=512.0)
    writer = SummaryWriter(str(tmp_path / "tb"))
    logger = AttentionHeatmapLogger(writer, features_dir=feats, patch_size=256)
    assert logger.log(np.arange(8.0), step=0, slide_id="slide_a") is not None
    writer.close()
    [(_, width, height, _)] = read_images(tmp_path / "tb")["val/spatial_attention_heatmap"]
    assert (width, height) == (4 * 512 // 32, 2 * 512 // 32)  # patch_size_level0 attr, not 256


def test_logger_reads_clam_h5_files_layout_with_default_patch_size(tmp_path: Path) -> None:
    (tmp_path / "feat" / "h5_files").mkdir(parents=True)
    with h5py.File(tmp_path / "feat" / "h5_files" / "slide_b.h5", "w") as handle:
        handle.create_dataset("features", data=np.zeros((6, EMBED), np.float32))
        handle.create_dataset("coords", data=grid_coords(3, 2, step=256).astype(np.int32))
    writer = SummaryWriter(str(tmp_path / "tb"))
    logger = AttentionHeatmapLogger(writer, features_dir=tmp_path / "feat", patch_size=256)
    logger.log(np.arange(6.0), step=0, slide_id="slide_b")
    writer.close()
    [(_, width, height, _)] = read_images(tmp_path / "tb")["val/spatial_attention_heatmap"]
    assert (width, height) == (24, 16)


def test_logger_h5_without_coords_dataset_falls_back_to_grid(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "pt_only.h5", "w") as handle:
        handle.create_dataset("features", data=np.zeros((6, EMBED), np.float32))
    logger = AttentionHeatmapLogger(ListWriter(), features_dir=tmp_path)
    with pytest.warns(GridFallbackWarning, match="coords missing: 6 attention scores, 0"):
        assert logger.log(np.arange(6.0), step=0, slide_id="pt_only") == (
            "val/grid_attention_heatmap"
        )


def test_logger_missing_h5_falls_back_to_the_grid_map(tmp_path: Path) -> None:
    """CLAM's seed: a slide without an H5 still gets a map (the grid), with one warning."""
    writer = SummaryWriter(str(tmp_path / "tb"))
    logger = AttentionHeatmapLogger(writer, features_dir=tmp_path)
    with pytest.warns(GridFallbackWarning) as record:
        assert logger.log(np.arange(6.0), step=0, slide_id="nope") == "val/grid_attention_heatmap"
        assert logger.log(np.arange(6.0), step=0, slide_id="second") is None  # one per epoch
    writer.close()
    assert len(record) == 1
    message = str(record[0].message)
    assert (
        message.startswith("slide 'nope', step 0: ") and "no feature H5 for slide 'nope'" in message
    )
    assert "coords missing: 6 attention scores, 0 coordinates" in message
    [(step, width, height, pixels)] = read_images(tmp_path / "tb")["val/grid_attention_heatmap"]
    assert step == 0
    with pytest.warns(GridFallbackWarning):
        grid = grid_attention_map(np.arange(6.0))
    np.testing.assert_array_equal(pixels, grid)


def test_smoothing_interpolates_between_patch_centres() -> None:
    """Two patches side by side, scores low and high: flat squares without smoothing; with it
    the pixels between the two centres rise monotonically, the centres keep their colours."""
    coords = [[0, 0], [512, 0]]
    flat = spatial_attention_map([0.0, 1.0], coords, patch_size=512, downsample=64, cmap="gray",
                                 normalize="minmax")  # fmt: skip
    smooth = spatial_attention_map([0.0, 1.0], coords, patch_size=512, downsample=64,
                                   cmap="gray", normalize="minmax", smooth=True)  # fmt: skip
    assert flat.shape == smooth.shape == (8, 16, 3)
    assert set(flat[0, :, 0].tolist()) == {0, 255}
    row = smooth[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # outside the centres: the patch's own value
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 4  # a ramp, not two blocks
    # an uncovered gap stays background
    gap = spatial_attention_map([0.0, 1.0], [[0, 0], [1024, 0]], patch_size=512, downsample=64,
                                cmap="gray", normalize="minmax", smooth=True)  # fmt: skip
    assert gap[0, 8:16].tolist() == [[128, 128, 128]] * 8


class _ClamSplit(torch.utils.data.Dataset):
    """CLAM's Generic_Split as validate_clam sees it: slide_data, data_dir, (features, label)."""

    def __init__(self, data_dir: Path, bags: dict[str, torch.Tensor]) -> None:
        import pandas as pd

        self.data_dir = str(data_dir)
        self.slide_data = pd.DataFrame({"slide_id": list(bags), "label": [0] * len(bags)})
        self.bags = list(bags.values())

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.bags[i], 0


def _collate_mil(batch: list) -> list:
    """CLAM's collate_MIL: features concatenated, labels as a LongTensor."""
    return [torch.cat([b[0] for b in batch]), torch.LongTensor([b[1] for b in batch])]


def test_log_validation_attention_is_a_one_call_hook_for_validate_clam(
    tmp_path: Path, sb_model: ClamSB
) -> None:
    coords = grid_coords(4, 3, step=512)
    (tmp_path / "feat" / "h5_files").mkdir(parents=True)
    write_trident_h5(tmp_path / "feat" / "h5_files" / "slide_0.h5", coords, patch_size_level0=512.0)
    torch.manual_seed(5)
    bags = {"slide_0": torch.randn(12, EMBED), "slide_1": torch.randn(7, EMBED)}
    loader = torch.utils.data.DataLoader(
        _ClamSplit(tmp_path / "feat", bags), batch_size=1, collate_fn=_collate_mil
    )
    writer = SummaryWriter(str(tmp_path / "tb"))
    for epoch in range(2):  # validate_clam's two added lines, once per epoch
        tag = log_validation_attention(writer, sb_model, loader, epoch)
        assert tag == "val/spatial_attention_heatmap"
    writer.close()
    logged = read_images(tmp_path / "tb")["val/spatial_attention_heatmap"]
    assert [step for step, *_ in logged] == [0, 1]
    with torch.no_grad():
        a_raw = sb_model(bags["slide_0"])[3]  # CLAM's forward: A_raw (1, N), pre-softmax
    want = painted_grid(a_raw.numpy(), cols=4, rows=3, cell=512 // 32)
    np.testing.assert_array_equal(logged[0][3], want)  # slide 0's map, its H5 coords and size
    # a split whose first slide has no H5: the grid map, and training is never interrupted
    empty = torch.utils.data.DataLoader(
        _ClamSplit(tmp_path / "nowhere", {"slide_x": torch.randn(5, EMBED)}),
        batch_size=1, collate_fn=_collate_mil,
    )  # fmt: skip
    with pytest.warns(GridFallbackWarning, match="slide 'slide_x'"):
        assert log_validation_attention(_Recorder(), sb_model, empty, 0) == (
            "val/grid_attention_heatmap"
        )
    assert log_validation_attention(None, sb_model, loader, 0) is None  # writer off in CLAM
    with pytest.warns(HeatmapSkippedWarning, match="step 3"):
        broken = torch.utils.data.DataLoader(_ClamSplit(tmp_path, {}), batch_size=1)
        assert log_validation_attention(_Recorder(), sb_model, broken, 3) is None


class _Recorder:
    """An ImageWriter that keeps what it was given."""

    def __init__(self) -> None:
        self.images: list[tuple[str, np.ndarray, int]] = []

    def add_image(self, tag: str, image: np.ndarray, global_step: int, dataformats: str) -> None:
        self.images.append((tag, image, global_step))


def test_raising_coords_loader_does_not_stop_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ClamSB(gate=True, size_arg="small", n_classes=2, embed_dim=EMBED)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    bags = [(torch.randn(12, EMBED) + label, label) for label in (0, 1, 0, 1)]

    def broken_loader(slide_id: str) -> np.ndarray:
        raise OSError(f"disk went away reading {slide_id}")

    writer = SummaryWriter(str(tmp_path))
    logger = AttentionHeatmapLogger(writer, coords_loader=broken_loader)
    epochs_done = 0
    with pytest.warns(HeatmapSkippedWarning) as record:
        for epoch in range(3):
            model.train()
            for h, label in bags:
                loss = torch.nn.functional.cross_entropy(model(h)[0], torch.tensor([label]))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            model.eval()
            with torch.no_grad():
                for i, (h, _) in enumerate(bags):
                    logger.log(model(h), step=epoch, slide_id=f"val_{i}")
            epochs_done += 1
    writer.close()
    assert epochs_done == 3
    assert [str(w.message) for w in record] == [
        f"attention heatmap for step {e} (slide 'val_0') skipped: OSError: disk went away "
        "reading val_0; training continues"
        for e in range(3)
    ]
    assert read_images(tmp_path) == {}


def test_loader_returning_coords_and_patch_size(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    logger = AttentionHeatmapLogger(writer, coords_loader=lambda _: (grid_coords(2, 1, 64), 64))
    logger.log(np.arange(2.0), step=0, slide_id="x")
    writer.close()
    [(_, width, height, _)] = read_images(tmp_path)["val/spatial_attention_heatmap"]
    assert (width, height) == (4, 2)  # 128 x 64 level-0 px / 32


def test_failing_writer_is_skipped_but_interrupt_propagates() -> None:
    class FullDisk:
        def add_image(self, *args: object, **kwargs: object) -> None:
            raise OSError("No space left on device")

    logger = AttentionHeatmapLogger(FullDisk())
    with pytest.warns(HeatmapSkippedWarning, match="OSError: No space left on device"):
        assert logger.log(np.arange(4.0), grid_coords(2, 2), step=0) is None

    def interrupted(_: str) -> np.ndarray:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        AttentionHeatmapLogger(FullDisk(), coords_loader=interrupted).log(
            [1.0], step=0, slide_id="a"
        )


def test_logger_survives_a_bad_step_value() -> None:
    with pytest.warns(HeatmapSkippedWarning, match="step None skipped: TypeError"):
        logger = AttentionHeatmapLogger(ListWriter())
        assert logger.log([1.0], step=None) is None  # type: ignore[arg-type]


def test_logger_rejects_bad_construction() -> None:
    with pytest.raises(TypeError, match="writer must have add_image"):
        AttentionHeatmapLogger(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1, got 0"):
        AttentionHeatmapLogger(ListWriter(), every_n_epochs=0)


def test_missing_tensorboard_gives_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(
        ImportError, match=r"tensorboard is not installed.*clam-heat\[tensorboard\]"
    ):
        open_summary_writer(tmp_path)
    with pytest.raises(ImportError, match="tensorboard is not installed"):
        AttentionHeatmapLogger.from_logdir(tmp_path)


def test_colorbar_logging_leaves_no_figures(tmp_path: Path) -> None:
    figures_before = live_figures()
    writer = SummaryWriter(str(tmp_path))
    logger = AttentionHeatmapLogger(writer, colorbar=True)
    for step in range(20):
        assert logger.log(np.arange(16.0), grid_coords(4, 4), step=step) is not None
    writer.close()
    assert live_figures() == figures_before
    [(_, width, height, _)] = read_images(tmp_path)["val/spatial_attention_heatmap"][:1]
    assert width > 32 and height > 32


# ------------------------------------------------------------------------------ example


def test_example_trains_and_logs_maps(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_clam_tensorboard", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        ["--logdir", str(tmp_path / "tb"), "--epochs", "2", "--features-dir", str(tmp_path / "f")]
    )
    images = read_images(tmp_path / "tb")
    assert sorted(images) == ["val/spatial_attention_heatmap", "val/tumour_truth"]
    assert [step for step, *_ in images["val/spatial_attention_heatmap"]] == [0, 1]
    assert len(list((tmp_path / "f").glob("*.h5"))) == 40


# ------------------------------------------------------------- every registered model's maps

SMALL_SIZES = {
    "abmil": {"hidden_dim": 24, "attn_dim": 12},
    "transmil": {"hidden_dim": 32, "num_heads": 4},
    "dsmil": {"hidden_dim": 24, "attn_dim": 8},
    "ilra": {"hidden_dim": 32, "topk": 6},
    "rrt": {"hidden_dim": 32, "dim_head": 8, "pool_dim": 12, "landmarks": 4},
    "transformer": {"hidden_dim": 32},
}


def registered_model(name: str) -> torch.nn.Module:
    from clam_heat.models import build_model

    torch.manual_seed(5)
    model = build_model(name, n_classes=3, embed_dim=EMBED, **SMALL_SIZES.get(name, {}))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * 0.3)
    return model.eval()


def test_every_registered_model_is_covered() -> None:
    from clam_heat.models import get_model_spec, registered_models

    with_attention = {n for n in registered_models() if get_model_spec(n).has_attention}
    assert with_attention == {"clam_sb", "clam_mb", "clam", *SMALL_SIZES}  # mil_fc: no attention


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb", "clam", *SMALL_SIZES])
def test_logger_draws_spatial_maps_for_every_registered_model(name: str) -> None:
    """The forward output (CLAM's 5-tuple, the others' (logits, attention)) and the model itself
    both give the spatial map of the model's own reduction: never a grid, never skipped."""
    from clam_heat.models import run_attention

    model = registered_model(name)
    coords = grid_coords(4, 3)
    h = torch.randn(12, EMBED)
    expected = painted_grid(run_attention(model, h.numpy()).attention, 4, 3, cell=256 // 32)
    writer = ListWriter()
    logger = AttentionHeatmapLogger(writer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no grid fallback, no skipped image
        with torch.no_grad():
            assert logger.log(model(h), coords, step=0) == "val/spatial_attention_heatmap"
        assert logger.log_model(model, h, coords, step=1) == "val/spatial_attention_heatmap"
    for _, image, _ in writer.images:
        np.testing.assert_array_equal(image, expected)


def test_log_model_draws_the_asked_class_of_a_per_class_model() -> None:
    from clam_heat.models import attention_logits, run_attention

    model = registered_model("dsmil")
    h = torch.randn(12, EMBED)
    other = (run_attention(model, h.numpy()).pred + 1) % 3
    writer = ListWriter()
    AttentionHeatmapLogger(writer).log_model(model, h, grid_coords(4, 3), step=0, class_index=other)
    column = attention_logits(model, h.numpy(), branch=other)
    np.testing.assert_array_equal(
        writer.images[0][1], spatial_attention_map(column, grid_coords(4, 3))
    )
    assert not model.training


def test_spatial_map_colours_are_the_heatmap_colormap() -> None:
    """Scores 0, 2, 1 (min-max 0, 1, 0.5) on three separate patches, "jet": the colours CLAM's
    rule gives (uint8(jet(v) * 255), index int(v * 256)), as clam_heat.heatmap paints them."""
    from clam_heat.heatmap import apply_colormap

    img = spatial_attention_map(
        [0.0, 2.0, 1.0],
        [[0, 0], [2, 0], [4, 0]],
        patch_size=2,
        downsample=1,
        cmap="jet",
        normalize="minmax",
    )
    assert img.shape == (2, 6, 3)
    assert img[0, ::2].tolist() == [[0, 0, 127], [127, 0, 0], [124, 255, 121]]
    np.testing.assert_array_equal(img[0, ::2], apply_colormap(np.array([0.0, 1.0, 0.5]), "jet"))
