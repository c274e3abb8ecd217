"""Driver cost per row of ``clam-heat run`` on cohort-sized process lists (100, 1,000, 10,000).

    python bench/cohort.py                       # 100, 1,000 and 10,000 rows, 2 local workers
    python bench/cohort.py --sizes 100 1000 --workers 1

What it builds: a tiny 3-slide demo project (cached under ``~/.cache/clam-heat-bench/cohort``,
``CLAM_HEAT_BENCH_CACHE`` moves it) and, per size, a folder of N symlinks to those slides, so
``clam-heat list`` sees N slides. What it runs: the whole driver (list build, journal replay,
planning, hand-out to the workers, recording, CSV flushes) with **no stages**
(``run_pipeline(stages=[])``), so every row is planned, handed out, run as an empty row and
recorded, and the stage work that would hide the bookkeeping is zero. With ``--workers 2`` the
rows run in the local pool's processes, so the driver's CPU time (``time.process_time`` of this
process) is the driver's alone; with ``--workers 1`` rows run in the driver and the rows' own
seconds are subtracted.

One JSON line per size: ``driver_cpu_ms_per_row``, ``ratio_to_first`` (against the smallest
size), the wall seconds of ``clam-heat list`` (first build of the list) and of
``run --dry-run`` with every stage (the plan of each row), the run's wall time and flushes.
Target: <= 5 ms per row at 10,000 rows and <= 1.2x the 100-row cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("CLAM_HEAT_BENCH_CACHE", Path.home() / ".cache" / "clam-heat-bench"))


def _project(folder: Path) -> Path:
    from clam_heat.demo import make_demo_project

    config = folder / "demo" / "config.yaml"
    if not config.is_file():
        shutil.rmtree(folder / "demo", ignore_errors=True)
        make_demo_project(folder / "demo", n_slides=3, size="tiny")
    return config


def _cohort(folder: Path, config: Path, rows: int) -> list[str]:
    """N symlinks to the demo slides, fresh outputs and list; returns the --set overrides."""
    work = folder / f"rows_{rows}"
    shutil.rmtree(work, ignore_errors=True)
    slides = work / "slides"
    slides.mkdir(parents=True)
    sources = sorted((config.parent / "slides").glob("*.tiff"))
    for k in range(rows):
        (slides / f"s{k:05d}.tiff").symlink_to(sources[k % len(sources)])
    return [
        f"data_arguments.data_dir={slides}",
        f"data_arguments.process_list={work / 'cohort.csv'}",
        f"exp_arguments.raw_save_dir={work / 'raw'}",
        f"exp_arguments.production_save_dir={work / 'production'}",
        f"runner_arguments.results_dir={work / 'results'}",
    ]


def measure(config: Path, sets: list[str], rows: int, workers: int) -> dict[str, float]:
    from clam_heat.config import load_config
    from clam_heat.executors import LocalExecutor, SerialExecutor
    from clam_heat.process_list import build_process_list
    from clam_heat.runner import run_pipeline

    cfg = load_config(config, overrides=sets)
    wall = time.perf_counter()
    df, _path = build_process_list(cfg, write=True)
    list_s = time.perf_counter() - wall
    assert len(df) == rows, (len(df), rows)

    wall = time.perf_counter()
    plan = run_pipeline(cfg, dry_run=True)
    dry_s = time.perf_counter() - wall
    assert len(plan.plans) == rows

    executor = LocalExecutor(workers) if workers > 1 else SerialExecutor()
    with executor:  # pool start-up is not per-row cost
        row_seconds = 0.0

        def on_row(outcome) -> None:
            nonlocal row_seconds
            row_seconds += outcome.seconds

        cpu, wall = time.process_time(), time.perf_counter()
        summary = run_pipeline(cfg, stages=[], executor=executor, on_row=on_row)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert summary.counts == {"done": rows}, summary.counts
    if workers == 1:
        cpu -= row_seconds  # the rows ran in this process
    return {
        "rows": rows,
        "workers": workers,
        "driver_cpu_ms_per_row": round(1000 * cpu / rows, 3),
        "run_wall_s": round(wall, 2),
        "list_s": round(list_s, 2),
        "dry_run_s": round(dry_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=CACHE / "cohort")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    config = _project(args.folder)
    first = None
    for rows in args.sizes:
        result = measure(config, _cohort(args.folder, config, rows), rows, args.workers)
        first = first or result["driver_cpu_ms_per_row"]
        result["ratio_to_first"] = round(result["driver_cpu_ms_per_row"] / first, 2)
        print(json.dumps(result), flush=True)
        shutil.rmtree(args.folder / f"rows_{rows}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
