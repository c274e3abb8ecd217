"""Train a CLAM_SB on synthetic bags and watch where it looks, epoch by epoch, in TensorBoard.

    python examples/train_clam_tensorboard.py --logdir runs/clam_heat_demo
    tensorboard --logdir runs/clam_heat_demo

The same maps also go to an experiment tracker with ``--tracker mlflow`` (run in
the experiment ``clam-heat-training`` of ``--tracker-uri``, default ``<logdir>/mlruns``) or
``--tracker wandb`` (offline under ``<logdir>/wandb`` unless a W&B key is known).

Each synthetic slide is an elliptical tissue region tiled by 512-px level-0 patches (a 20x,
256-px grid on a 40x scan, as TRIDENT stores it, ``coords.attrs['patch_size_level0'] = 512``).
Tumour slides contain a disc of patches whose features are shifted along one fixed direction; to
classify a bag the model has to find those patches, so ``val/spatial_attention_heatmap`` should
light up on the disc shown in ``val/tumour_truth`` within a few epochs. Runs in seconds on CPU.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from clam_heat.atomic import atomic_path
from clam_heat.models import ClamSB
from clam_heat.trackers import TrackerError, TrackerKind, make_tracker
from clam_heat.training import AttentionHeatmapLogger, open_summary_writer, spatial_attention_map

LOG = logging.getLogger("train_clam_tensorboard")

#: Level-0 patch side: 256 px at 20x read from a 40x scan.
PATCH_SIZE_L0 = 512


def make_bag(
    rng: np.random.Generator, *, tumour: bool, direction: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic slide: features (N, D) float32, l0 coords (N, 2) int64, tumour mask (N,).

    Tissue is an ellipse on a 20 x 14 patch grid placed at a random level-0 offset; a tumour
    slide gets a radius-3 disc of patches whose features are shifted by ``direction``.
    """
    grid_rows, grid_cols = np.mgrid[0:14, 0:20]
    in_tissue = ((grid_cols - 9.5) / 10.0) ** 2 + ((grid_rows - 6.5) / 7.0) ** 2 <= 1.0
    cols, rows = grid_cols[in_tissue], grid_rows[in_tissue]
    l0_offset = rng.integers(0, 40, size=2) * PATCH_SIZE_L0
    l0_coords = np.stack([cols, rows], axis=1).astype(np.int64) * PATCH_SIZE_L0 + l0_offset
    features = rng.standard_normal((cols.size, direction.size)).astype(np.float32)
    is_tumour = np.zeros(cols.size, dtype=bool)
    if tumour:
        centre = np.array([cols, rows]).T[rng.integers(cols.size)]
        is_tumour = ((cols - centre[0]) ** 2 + (rows - centre[1]) ** 2) <= 9
        features[is_tumour] += direction
    return features, l0_coords, is_tumour


def write_bag(path: Path, features: np.ndarray, l0_coords: np.ndarray) -> None:
    """Write a TRIDENT-layout feature H5 atomically (through clam_heat.atomic's temp names)."""
    with atomic_path(path, durable=False) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("features", data=features)
        coords = handle.create_dataset("coords", data=l0_coords)
        coords.attrs.update(
            patch_size=256,
            patch_size_level0=PATCH_SIZE_L0,
            level0_magnification=40,
            target_magnification=20,
        )


def train(
    logdir: Path,
    *,
    features_dir: Path | None = None,
    epochs: int = 8,
    n_train: int = 32,
    n_val: int = 8,
    embed_dim: int = 1024,
    seed: int = 0,
    tracker: TrackerKind = "none",
    tracker_uri: str | None = None,
) -> float:
    """Generate bags, train a CLAM_SB, log maps and scalars to ``logdir``, the maps also to
    ``tracker``; return val accuracy."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    direction = (rng.standard_normal(embed_dim) * 0.2).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="clam_heat_bags_") as scratch:
        feat_dir = Path(features_dir) if features_dir is not None else Path(scratch)
        feat_dir.mkdir(parents=True, exist_ok=True)
        bags: dict[str, tuple[torch.Tensor, int]] = {}
        truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(n_train + n_val):
            slide_id = f"{'train' if i < n_train else 'val'}_{i:03d}"
            label = (i + 1) % 2  # alternate, so the first validation slide is a tumour slide
            features, l0_coords, is_tumour = make_bag(rng, tumour=bool(label), direction=direction)
            write_bag(feat_dir / f"{slide_id}.h5", features, l0_coords)
            bags[slide_id] = (torch.from_numpy(features), label)
            truth[slide_id] = (l0_coords, is_tumour)
        train_ids = [s for s in bags if s.startswith("train")]
        val_ids = [s for s in bags if s.startswith("val")]

        model = ClamSB(gate=True, size_arg="small", dropout=0.25, n_classes=2, embed_dim=embed_dim)
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
        loss_fn = torch.nn.CrossEntropyLoss()
        run = make_tracker(
            tracker,
            run_name=f"train_clam_seed{seed}",
            project="clam-heat-training",
            directory=logdir,
            uri=tracker_uri,
            setting="--tracker",
        )
        run.log_config({"epochs": epochs, "n_train": n_train, "n_val": n_val, "seed": seed})
        try:
            writer = open_summary_writer(logdir)
        except BaseException:  # tensorboard missing: end the tracker run before saying so
            run.close("failed")
            raise
        heatmaps = AttentionHeatmapLogger(
            writer, every_n_epochs=1, features_dir=feat_dir, tracker=run
        )
        l0_coords, is_tumour = truth[val_ids[0]]
        truth_map = spatial_attention_map(
            is_tumour.astype(float), l0_coords, PATCH_SIZE_L0, 32, normalize="minmax"
        )
        writer.add_image("val/tumour_truth", truth_map, global_step=0, dataformats="HWC")
        run.log_image("val/tumour_truth", truth_map, 0)
        accuracy = 0.0
        status = "failed"
        try:
            for epoch in range(epochs):
                model.train()
                train_loss = 0.0
                for index in rng.permutation(len(train_ids)):
                    features, label = bags[train_ids[index]]
                    logits, *_ = model(features)
                    loss = loss_fn(logits, torch.tensor([label]))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    train_loss += loss.item() / len(train_ids)
                model.eval()
                val_loss, correct = 0.0, 0
                with torch.no_grad():
                    for slide_id in val_ids:
                        features, label = bags[slide_id]
                        output = model(features)
                        val_loss += loss_fn(output[0], torch.tensor([label])).item() / len(val_ids)
                        correct += int(output[2].item() == label)
                        # Only the first validation slide of each epoch is drawn; coords come
                        # from <features_dir>/<slide_id>.h5. Never raises into this loop.
                        heatmaps.log(output, step=epoch, slide_id=slide_id)
                accuracy = correct / len(val_ids)
                writer.add_scalar("train/loss", train_loss, epoch)
                writer.add_scalar("val/loss", val_loss, epoch)
                writer.add_scalar("val/accuracy", accuracy, epoch)
                LOG.info(
                    "epoch %d: train loss %.3f, val loss %.3f, val acc %.2f",
                    epoch,
                    train_loss,
                    val_loss,
                    accuracy,
                )
            status = "finished"
        finally:
            writer.close()
            run.close(status)
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs/clam_heat_demo"))
    parser.add_argument(
        "--features-dir",
        type=Path,
        default=None,
        help="keep the generated bags here (default: a temporary folder)",
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tracker",
        choices=["none", "mlflow", "wandb"],
        default="none",
        help="also send the maps and scalars to MLflow or W&B (pip install 'clam-heat[mlflow]')",
    )
    parser.add_argument(
        "--tracker-uri",
        default=None,
        help="MLflow tracking URI (default <logdir>/mlruns) or a W&B server's base URL",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train(
            args.logdir,
            features_dir=args.features_dir,
            epochs=args.epochs,
            seed=args.seed,
            tracker=args.tracker,
            tracker_uri=args.tracker_uri,
        )
    except TrackerError as err:  # the extra is missing or the server refused: one line, exit 2
        parser.exit(err.exit_code, f"error: {err}\n")
    LOG.info("done; view the maps with: tensorboard --logdir %s", args.logdir)


if __name__ == "__main__":
    main()
