"""Resident memory of ``AttentionHeatmapLogger`` over 1,000 calls (moved out of the tests:
a memory threshold flakes on a busy CI box).

    python bench/training_memory.py            # prints the RSS growth in MB as JSON
"""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from clam_heat.training import AttentionHeatmapLogger


def rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    i = np.arange(16)
    coords = np.stack([(i % 4) * 256, (i // 4) * 256], axis=1).astype(np.int64)
    scores = torch.randn(1, 16)
    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder, max_queue=10)
        logger = AttentionHeatmapLogger(writer, downsample=64)
        for step in range(100):  # warm-up: imports, caches, writer thread
            logger.log(scores, coords, step=step)
        gc.collect()
        before = rss_kib()
        for step in range(100, 1100):
            logger.log(scores, coords, step=step)
        writer.flush()
        gc.collect()
        growth_mb = (rss_kib() - before) / 1024
        writer.close()
    print(json.dumps({"calls": 1000, "rss_growth_mb": round(growth_mb, 1)}))


if __name__ == "__main__":
    main()
