"""Benchmark the encoder path: patches per second from slide pixels to features.

Measures :func:`clam_heat.encoders.encode_patches` (OpenSlide reads, resize to 224 px,
normalisation, forward pass) on a generated demo slide for ``tiny_cnn`` and ``resnet50_trunc``
(random weights: speed does not depend on the values), batch 64, with 0 and 2 loader workers.

    python bench/encoder.py                 # table
    python bench/encoder.py --json          # machine-readable
    python bench/encoder.py --patches 64 --encoders tiny_cnn --workers 0 2 4 --device cuda --amp

The slide is written once to ``~/.cache/clam-heat-bench/`` and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clam_heat.demo import make_demo_slide
from clam_heat.encoders import build_encoder, encode_patches

CACHE = Path.home() / ".cache" / "clam-heat-bench"
SLIDE_SIZE = (4096, 3072)
PATCH = 256


def demo_slide() -> Path:
    """The cached benchmark slide (generated on first use)."""
    path = CACHE / f"bench_{SLIDE_SIZE[0]}x{SLIDE_SIZE[1]}.tiff"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        make_demo_slide(path, width=SLIDE_SIZE[0], height=SLIDE_SIZE[1], seed=0)
    return path


def grid(n: int) -> np.ndarray:
    """The first ``n`` level-0 top-lefts of the non-overlapping 256 px grid, (n, 2) int64."""
    l0_x = np.arange(0, SLIDE_SIZE[0] - PATCH + 1, PATCH)
    l0_y = np.arange(0, SLIDE_SIZE[1] - PATCH + 1, PATCH)
    xx, yy = np.meshgrid(l0_x, l0_y)
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)
    return np.resize(coords, (n, 2))  # repeats the grid if more patches are asked for


def run_one(
    slide: Path, name: str, workers: int, n: int, batch: int, device: str, amp: bool
) -> dict[str, object]:
    encoder = build_encoder(name, target_img_size=224, device=device, allow_random=True)
    coords = grid(n)
    kwargs = {
        "encoder": encoder,
        "patch_level": 0,
        "patch_size": PATCH,
        "batch_size": batch,
        "num_workers": workers,
        "amp": amp,
    }
    encode_patches(slide, coords[: min(batch, n)], **kwargs)  # warm-up (kernels, first reads)
    start = time.perf_counter()
    feats = encode_patches(slide, coords, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "encoder": name,
        "workers": workers,
        "patches": n,
        "batch": batch,
        "device": device,
        "amp": amp,
        "dim": int(feats.shape[1]),
        "seconds": round(seconds, 3),
        "patches_per_s": round(n / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["tiny_cnn", "resnet50_trunc"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--patches", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast on CUDA")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    slide = demo_slide()
    rows = [
        run_one(slide, name, w, args.patches, args.batch, args.device, args.amp)
        for name in args.encoders
        for w in args.workers
    ]
    if args.json:
        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }
        sys.stdout.write(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
        return 0
    header = (
        f"{'encoder':<16}{'workers':>8}{'patches':>9}{'batch':>7}{'seconds':>10}{'patch/s':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['encoder']:<16}{r['workers']:>8}{r['patches']:>9}{r['batch']:>7}"
            f"{r['seconds']:>10.2f}{r['patches_per_s']:>10.1f}"
        )
    sys.stdout.write("\n".join(lines) + f"\n(device {args.device}, torch {torch.__version__})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
