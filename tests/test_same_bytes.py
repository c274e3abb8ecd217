"""Same bytes whatever the executor: a serial run, local workers and Dask workers write
identical files, H5 included, although each runs torch with a different thread count.

Compared: every file under the output roots (blockmap and overlap-free score H5s, heatmap
images, pyramidal TIFF, attention GeoJSON, segmentation GeoJSON and mask, sampled patches, the
saved config). Not compared: the per-slide ``*.ledger.json`` and the run log (they hold times),
and the process-list and results CSVs (their ``updated_at`` column; their other columns are
compared by ``tests/test_executors.py``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clam_heat.config import load_config
from clam_heat.executors import DaskExecutor, LocalExecutor
from clam_heat.models import run_attention
from clam_heat.models.checkpoint import build_model
from clam_heat.runner import run_pipeline

N_SLIDES = 3


@pytest.mark.parametrize(("n", "size"), [(11, "small"), (1600, "small"), (300, "big")])
def test_attention_is_the_same_floats_whatever_the_thread_count(n: int, size: str) -> None:
    """Bags whose float sums depend on torch's thread count without a fixed inference thread
    count (here 11 patches already differ between 2 threads and 1 by ~2e-8, 1600 between 16
    and 1 by ~4e-9), scored under several counts."""
    torch.manual_seed(0)
    model = build_model("clam_sb", n_classes=2, embed_dim=64, model_size=size).eval()
    bag = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (16, 1, 8, 2):
            torch.set_num_threads(threads)
            out = run_attention(model, bag)
            assert torch.get_num_threads() == threads  # restored after the forward
            outs.append((out.attention.tobytes(), out.probs.tobytes(), out.logits.tobytes()))
    finally:
        torch.set_num_threads(before)
    assert all(o == outs[0] for o in outs)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith((".ledger.json", ".log"))
    }


@pytest.fixture()
def project(demo_source: Path, tmp_path: Path):
    """Demo config with 3 rows, every optional output on, all outputs under ``heatmaps/``."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_source, folder)
    plist = folder / "process_lists" / "demo.csv"
    plist.write_text("\n".join(plist.read_text().splitlines()[: N_SLIDES + 1]) + "\n")
    (folder / "pristine.csv").write_bytes(plist.read_bytes())
    out = folder / "heatmaps"
    return load_config(
        folder / "config.yaml",
        overrides=[
            f"exp_arguments.raw_save_dir={out / 'raw'}",
            f"exp_arguments.production_save_dir={out / 'production'}",
            f"runner_arguments.results_dir={folder / 'results'}",
            "runner_arguments.write_geojson=true",
            "runner_arguments.write_pyramid_tiff=true",
            "heatmap_arguments.save_orig=true",
        ],
    )


def _fresh(cfg) -> None:
    folder = cfg.config_dir
    shutil.rmtree(folder / "heatmaps", ignore_errors=True)
    shutil.rmtree(folder / "results", ignore_errors=True)
    cfg.process_list_path.write_bytes((folder / "pristine.csv").read_bytes())


def test_serial_local_and_dask_runs_write_the_same_bytes(project) -> None:
    distributed = pytest.importorskip("distributed")
    out = project.config_dir / "heatmaps"

    # serial, in this process, with the thread count of a 16-core node's driver
    before = torch.get_num_threads()
    torch.set_num_threads(16)
    try:
        _fresh(project)
        assert run_pipeline(project).counts == {"done": N_SLIDES}
    finally:
        torch.set_num_threads(before)
    serial = _digests(out)
    kinds = {Path(name).suffix for name in serial}
    assert {".h5", ".jpg", ".tiff", ".geojson", ".png", ".yaml"} <= kinds
    assert sum(name.endswith("_blockmap.h5") for name in serial) == N_SLIDES

    _fresh(project)
    with LocalExecutor(2) as pool:  # two workers, one thread each on this machine
        assert run_pipeline(project, executor=pool).counts == {"done": N_SLIDES}
    assert _digests(out) == serial

    _fresh(project)
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        dask = run_pipeline(project, executor=DaskExecutor(cluster.scheduler_address))
    finally:
        cluster.close()
    assert dask.counts == {"done": N_SLIDES}
    assert _digests(out) == serial
