"""Slides per minute of ``clam-heat run`` with 1 and 2 local workers on the demo project.

    python bench/throughput.py             # 8 large (40000x30000) demo slides, 1 and 2 workers
    python bench/throughput.py --slides 8 --size small --workers 1 2 4 --json out.json
    python bench/throughput.py --set heatmap_arguments.vis_level=1   # CLAM template's heatmap level

Every configuration runs the full pipeline (segment -> infer -> heatmap -> sample) from scratch in
the same folder (outputs removed in between, so absolute paths inside outputs match), and the
script checks that every configuration wrote byte-identical outputs and process-list rows.

Two numbers per configuration:

* ``end_to_end``: a fresh interpreter running what ``clam-heat run --workers N`` runs
  (``--workers 1`` runs rows in the driver process; more start a fork server that imports the
  libraries once and forks the workers), imports and start-up included: what a user waits for
  on a short list;
* ``steady``: workers started (libraries imported) and warmed by one untimed pass over the list
  (each has loaded the model and touched the slides) before the clock starts, so start-up is not
  counted. This is the rate of a long list, the throughput the workers deliver.

Each line also shows the CPU seconds the workers used and the cores that makes on average; the
report gives CPU seconds per slide for each worker count and their ratio to the first count
(``*_cpu_per_slide_ratio_wN``, target <= 1.1: the scaling figure a 2-core machine can show,
since its wall-clock ratio is capped by the cores), next to the wall ratio, and
the script measures before and after how many cores this machine really gives two busy processes
(``free_cores_*``: 2.0 on an idle 2-core machine): on a shared machine other processes take
cores, and no executor can do better than the cores it gets.

The demo project is generated once under ``--folder`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every output file under ``root``, minus ledgers and logs (they hold times)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith((".ledger.json", ".log")):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.drop(columns=["updated_at"], errors="ignore").to_dict("records")


def _reset(folder: Path, pristine_list: bytes, results: Path) -> None:
    """Remove every output so the next configuration starts from scratch."""
    shutil.rmtree(folder / "heatmaps", ignore_errors=True)
    (folder / "heatmaps").mkdir()
    shutil.rmtree(results, ignore_errors=True)
    (folder / "process_lists" / "demo.csv").write_bytes(pristine_list)


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by live processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


_E2E = """
import sys
from clam_heat.config import load_config
from clam_heat.executors import make_executor
from clam_heat.runner import run_pipeline

cfg = load_config(sys.argv[1], overrides=sys.argv[3:])
summary = run_pipeline(cfg, executor=make_executor(workers=int(sys.argv[2])))
# stop the fork server (and so reap it) so its CPU time and the workers' count as ours
from multiprocessing import forkserver
if getattr(forkserver._forkserver, "_forkserver_pid", None):
    forkserver._forkserver._stop()
sys.exit(0 if summary.ok else 1)
"""


def _end_to_end(config: Path, overrides: list[str], workers: int) -> tuple[float, float]:
    """A fresh interpreter running what ``clam-heat run --workers N`` runs (1: in-process)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _E2E, str(config), str(workers), *overrides], check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"benchmark run with {workers} workers failed (exit {done.returncode})")
    return seconds, _children_cpu() - cpu


def _steady(cfg: Any, workers: int, reset: Any) -> tuple[float, float]:
    """A run on started, warmed-up workers: wall seconds and the CPU seconds the workers used."""
    from clam_heat.executors import LocalExecutor
    from clam_heat.runner import run_pipeline

    with LocalExecutor(workers) as pool:
        if not run_pipeline(cfg, executor=pool).ok:  # warm-up: models loaded in every worker
            raise SystemExit("benchmark warm-up run failed")
        reset()
        pids = pool.pids
        cpu = _proc_cpu(pids)
        start = time.perf_counter()
        summary = run_pipeline(cfg, executor=pool)
        seconds = time.perf_counter() - start
        cpu = _proc_cpu(pids) - cpu
    if not summary.ok:
        raise SystemExit(f"benchmark run failed: {summary.failed}")
    return seconds, cpu


def _spin(n: int) -> float:
    """Pure-Python work; returns the CPU seconds it took."""
    start = time.process_time()
    total = 0
    for k in range(n):
        total += k * k
    return time.process_time() - start


def _free_cores(n: int = 4_000_000) -> float:
    """Cores two busy processes of ours actually get right now (2.0 on an idle 2-core machine)."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [1000, 1000], chunksize=1)  # both started
        start = time.perf_counter()
        cpu = sum(pool.map(_spin, [n, n], chunksize=1))
        return cpu / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", default="large", choices=["tiny", "small", "large"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (best kept)")
    parser.add_argument(
        "--folder", type=Path, default=Path(tempfile.gettempdir()) / "clam_heat_bench"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="BLOCK.KEY=VALUE",
        help="config override, as `clam-heat run --set` (e.g. heatmap_arguments.vis_level=1)",
    )
    args = parser.parse_args(argv)

    from clam_heat.config import load_config
    from clam_heat.demo import make_demo_project
    from clam_heat.executors import available_cores

    folder = args.folder.resolve() / f"{args.size}_{args.slides}"
    project = make_demo_project(folder, n_slides=args.slides, size=args.size)
    results = folder / "bench_results"
    out = folder / "heatmaps"
    overrides = [
        f"exp_arguments.raw_save_dir={out / 'heatmap_raw_results'}",
        f"exp_arguments.production_save_dir={out / 'heatmap_production_results'}",
        f"runner_arguments.results_dir={results}",
        *args.set,
    ]
    cfg = load_config(project.config_path, overrides=overrides)
    pristine = project.process_list_path.read_bytes()
    n = args.slides
    report: dict[str, Any] = {
        "slides": n,
        "size": args.size,
        "cores": available_cores(),
        "overrides": args.set,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "free_cores_before": round(_free_cores(), 2),
    }
    sys.stderr.write(
        f"{n} {args.size} demo slides, {report['cores']} cores, load average "
        f"{report['load_average_1min']}, two busy processes get "
        f"{report['free_cores_before']:.2f} cores right now\n"
    )
    reference: tuple[dict[str, str], list[dict[str, Any]]] | None = None
    for mode in ("end_to_end", "steady"):
        for workers in args.workers:
            best, best_cpu = float("inf"), 0.0
            for _ in range(args.repeat):
                _reset(folder, pristine, results)
                if mode == "steady":
                    seconds, cpu = _steady(cfg, workers, lambda: _reset(folder, pristine, results))
                else:
                    seconds, cpu = _end_to_end(project.config_path, overrides, workers)
                if seconds < best:
                    best, best_cpu = seconds, cpu
                outputs = (_digests(out), _rows(project.process_list_path))
                if reference is None:
                    reference = outputs
                elif outputs != reference:
                    raise SystemExit(f"{mode} workers={workers}: outputs differ from the first run")
            key = f"{mode}_w{workers}"
            report[f"{key}_seconds"] = round(best, 2)
            report[f"{key}_slides_per_min"] = round(60 * n / best, 1)
            report[f"{key}_worker_cpu_seconds"] = round(best_cpu, 2)
            sys.stderr.write(
                f"{mode:>10} workers={workers}: {best:6.1f}s {60 * n / best:6.1f} slides/min  "
                f"(used {best_cpu:.1f} CPU s = {best_cpu / best:.2f} cores)\n"
            )
        first = args.workers[0]
        base = report[f"{mode}_w{first}_seconds"]
        base_cpu = report[f"{mode}_w{first}_worker_cpu_seconds"] / n
        for workers in args.workers:
            report[f"{mode}_w{workers}_cpu_seconds_per_slide"] = round(
                report[f"{mode}_w{workers}_worker_cpu_seconds"] / n, 3
            )
        for workers in args.workers[1:]:
            speedup = base / report[f"{mode}_w{workers}_seconds"]
            cpu_ratio = report[f"{mode}_w{workers}_cpu_seconds_per_slide"] / base_cpu
            report[f"{mode}_speedup_w{workers}"] = round(speedup, 2)
            report[f"{mode}_wall_ratio_w{workers}"] = round(1 / speedup, 3)
            report[f"{mode}_cpu_per_slide_ratio_w{workers}"] = round(cpu_ratio, 3)
            sys.stderr.write(
                f"{mode:>10} {workers} vs {first} workers: speed-up {speedup:.2f}x, CPU seconds "
                f"per slide {cpu_ratio:.2f}x (target <= 1.1x: the work per slide does not grow "
                "with the workers)\n"
            )
    report["free_cores_after"] = round(_free_cores(), 2)
    sys.stderr.write(f"two busy processes get {report['free_cores_after']:.2f} cores right now\n")
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
