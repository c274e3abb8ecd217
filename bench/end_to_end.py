"""End to end: demo slides through ``clam-heat run`` (and CLAM's ``create_heatmaps.py``).

Usage (from the repository root, in the project's venv)::

    python bench/end_to_end.py                        # 16 tiny + 4 small demo slides, ours only
    python bench/end_to_end.py --clam ~/src/CLAM      # also CLAM's create_heatmaps.py, and ratios
    python bench/end_to_end.py --sizes tiny --slides 16 --repeats 2
    python bench/end_to_end.py --full-res             # + the 40000x30000 slide at vis_level 0
    python bench/end_to_end.py --json                 # one JSON line per measurement

The package is byte-compiled first (as an install is; see ``_compile_package``). What it
measures, each in a fresh process (CPU seconds = user + system of the process and
every process it waited for, taken from outside with ``getrusage(RUSAGE_CHILDREN)``, so
start-up and exit are included; never wall time, which on a shared machine
says more about the neighbours than about the code):

* ``run``: ``clam-heat run config.yaml --quiet`` on a demo project with no outputs: slides per
  CPU-minute, total CPU, the driver's peak RSS (``VmHWM``) and the model process' peak RSS
  (the forked helper that runs the stages that need torch), and CPU per stage (each stage's
  ``run`` wrapped to record its own process' CPU, in whichever process it ran).
* ``noop``: the same command again with every row done (CPU, peak RSS, whether torch loaded).
* ``status``: ``clam-heat status`` on a 10,000-row process list (CPU, peak RSS).
* ``floor``: the ``sample`` stage's floor: open each slide, read its sampled patches and encode
  them as the stage does (PNG, zlib level 1), no file writes.
* ``clam`` (with ``--clam PATH``): CLAM's own ``create_heatmaps.py`` from that checkout on the
  same slides, features, checkpoint and settings, and the ratio of slides per CPU-minute.
  Untested here (CLAM is not installed on the machine this was written on): it writes the
  demo config with absolute paths into ``PATH/heatmaps/configs/`` and the process list into
  ``PATH/heatmaps/process_lists/``, then runs ``python create_heatmaps.py --config_file``.
* ``full_res`` (``--full-res``): one row of the 40000x30000 demo slide at vis_level 0 saved as
  JPEG, PNG and TIFF + pyramid TIFF: total CPU and the peak RSS of each process.

Goals (issue 24): >= 3x CLAM's slides per CPU-minute; no-op rerun <= 0.8 CPU s and <= 150 MB;
``status`` on 10,000 rows <= 0.4 CPU s; a vis_level-0 row <= 500 MB in every format.

Demo projects are generated once and cached under ``~/.cache/clam-heat-bench/`` (override with
``CLAM_HEAT_BENCH_CACHE``); each measured run works on a fresh copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CLAM_HEAT_BENCH_CACHE", Path.home() / ".cache" / "clam-heat-bench"))

#: Runs ``clam-heat ARGS`` in this process and prints one JSON line of its costs. Each stage's
#: ``run`` is wrapped (before the model process forks, so the wrapper is there too) to append
#: its own process' CPU to the file named by ``CLAM_HEAT_BENCH_STAGES``.
_CHILD = r"""
import json, os, resource, sys, time

def cpu_self():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

stages_log = os.environ.get("CLAM_HEAT_BENCH_STAGES")
if stages_log:
    from clam_heat.stages import registry

    def wrap(cls):
        real = cls.run
        def run(self, ctx):
            before = cpu_self()
            try:
                return real(self, ctx)
            finally:
                with open(stages_log, "a") as fh:
                    fh.write(json.dumps([self.name, cpu_self() - before]) + "\n")
        cls.run = run

    for stage in registry.stages():
        wrap(type(stage))

from clam_heat.cli import cli_main
code = cli_main(sys.argv[1:])

def hwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH " + json.dumps({
    "code": code,
    "driver_cpu_s": round(cpu_self(), 3),
    "children_cpu_s": round(kids.ru_utime + kids.ru_stime, 3),
    "driver_peak_mb": round(hwm(), 1),
    "model_process_peak_mb": round(kids.ru_maxrss / 1024, 1),
    "torch_in_driver": "torch" in sys.modules,
}), flush=True)
from clam_heat.cli.output import exit_now
exit_now(code)  # as the console script ends
"""


def _measure(args: list[str], cwd: Path, stages_log: Path | None = None) -> dict[str, Any]:
    """``clam-heat ARGS`` in a fresh interpreter; its JSON line plus the total CPU."""
    import resource

    env = dict(os.environ)
    if stages_log is not None:
        env["CLAM_HEAT_BENCH_STAGES"] = str(stages_log)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"clam-heat {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    record = json.loads(line[6:])
    if record["code"] != 0:
        raise RuntimeError(f"clam-heat {' '.join(args)} exited {record['code']}:\n{done.stdout}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # measured from outside: start-up and exit included, as a user's `clam-heat` pays them
    record["cpu_s"] = round(
        (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 3
    )
    return record


def _project(size: str, n_slides: int) -> Path:
    """The cached demo project of ``n_slides`` ``size`` slides (generated on first use)."""
    from clam_heat.demo import make_demo_project

    folder = CACHE / f"e2e_{size}_{n_slides}"
    make_demo_project(folder, n_slides=n_slides, size=size)  # type: ignore[arg-type]
    return folder


def _fresh_copy(project: Path, into: Path) -> Path:
    """A copy of ``project`` without outputs (slides linked, not copied)."""
    target = into / project.name
    shutil.copytree(
        project,
        target,
        ignore=shutil.ignore_patterns("heatmaps", "*.lock"),
        copy_function=os.link if _same_device(project, into) else shutil.copy2,
    )
    for csv in (target / "process_lists").glob("*.csv"):
        csv.unlink()
    # the process list is rebuilt from the folder and the demo's own list, as on a first run
    shutil.copy2(project / "process_lists" / "demo.csv", target / "process_lists" / "demo.csv")
    _reset_list(target / "process_lists" / "demo.csv")
    return target


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _reset_list(path: Path) -> None:
    """The demo's list as generated: every row to be processed, no results."""
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    keep = [i for i, name in enumerate(header) if name in ("slide_id", "label", "process")]
    out = [[header[i] for i in keep]] + [[row[i] for i in keep] for row in rows[1:] if row]
    path.unlink()
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(out)


def bench_ours(size: str, n_slides: int, work: Path) -> list[dict[str, Any]]:
    """A first run and a no-op rerun of ``n_slides`` ``size`` demo slides."""
    project = _fresh_copy(_project(size, n_slides), work)
    stages_log = work / f"stages_{size}.jsonl"
    stages_log.unlink(missing_ok=True)
    first = _measure(["run", "config.yaml", "--quiet"], project, stages_log)
    per_stage: dict[str, float] = {}
    for line in stages_log.read_text(encoding="utf-8").splitlines():
        name, secs = json.loads(line)
        per_stage[name] = round(per_stage.get(name, 0.0) + secs, 3)
    first.update(
        case="run",
        size=size,
        slides=n_slides,
        slides_per_cpu_min=round(60 * n_slides / first["cpu_s"], 1),
        stage_cpu_s=per_stage,
        floor_sample_cpu_s=round(_sample_floor(project), 3),
    )
    noop = _measure(["run", "config.yaml", "--quiet"], project)
    noop.update(case="noop", size=size, slides=n_slides)
    return [first, noop]


def _sample_floor(project: Path) -> float:
    """CPU of what the ``sample`` stage must at least do: read its patches and encode them."""
    code = r"""
import glob, json, resource, sys
import imagecodecs
from clam_heat.config import load_config
from clam_heat.h5io import read_scores
from clam_heat.rows import blockmap_h5_path, build_contexts
from clam_heat.process_list import read_process_list
from clam_heat.sampling import PNG_LEVEL, sample_indices
cfg = load_config("config.yaml")
jobs = []
for ctx in build_contexts(cfg, read_process_list(cfg.process_list_path)):
    scores, coords, side = read_scores(blockmap_h5_path(ctx))
    for spec in cfg.sample_arguments.samples:
        idx, _ = sample_indices(scores, mode=spec.mode, k=spec.k, seed=spec.seed)
        jobs.append((ctx, coords[idx], side))
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF); return u.ru_utime + u.ru_stime
start = cpu()
for ctx, xy, side in jobs:
    slide = ctx.slide()
    for x, y in xy.tolist():
        imagecodecs.png_encode(slide.read_region((x, y), 0, (side, side)), level=PNG_LEVEL)
    ctx.close()
print(json.dumps(cpu() - start))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return float(done.stdout.strip().splitlines()[-1])


def bench_status(work: Path, rows: int = 10_000) -> dict[str, Any]:
    """``clam-heat status`` on a ``rows``-row list (statuses and errors as a run leaves them)."""
    path = work / "status_list.csv"
    statuses = ("done", "done", "done", "failed", "tbp", "skipped")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("slide_id,label,process,status,stage,error,updated_at\n")
        for i in range(rows):
            status = statuses[i % len(statuses)]
            error = "slide_x.svs: no tissue found (check the preset)" if status == "failed" else ""
            stage = "sample" if status == "done" else ""
            fh.write(f"slide_{i:05d},tumour,1,{status},{stage},{error},2026-01-01T00:00:00\n")
    record = _measure(["status", str(path)], work)
    record.update(case="status", rows=rows)
    return record


def bench_full_res(work: Path) -> list[dict[str, Any]]:
    """One vis_level-0 row of the 40000x30000 slide per format: CPU and peak RSS."""
    project = _fresh_copy(_project("large", 1), work)
    out = []
    for fmt, extra in (
        ("jpg", []),
        ("png", []),
        ("tiff", ["--set", "runner_arguments.write_pyramid_tiff=true"]),
    ):
        args = ["run", "config.yaml", "--quiet", "--save_exp_code", f"full_{fmt}"]
        args += ["--set", "heatmap_arguments.vis_level=0"]
        args += ["--set", f"heatmap_arguments.save_ext={fmt}", *extra]
        record = _measure(args, project)
        record.update(case="full_res", format=fmt + (" + pyramid" if extra else ""))
        out.append(record)
    return out


def bench_clam(clam: Path, size: str, n_slides: int, work: Path) -> dict[str, Any]:
    """CLAM's ``create_heatmaps.py`` on the same demo project (see the module docstring)."""
    import resource

    import yaml

    project = _fresh_copy(_project(size, n_slides), work)
    cfg = yaml.safe_load((project / "config.yaml").read_text(encoding="utf-8"))
    cfg.pop("runner_arguments", None)  # ours only
    exp, data, model = cfg["exp_arguments"], cfg["data_arguments"], cfg["model_arguments"]
    exp["raw_save_dir"] = str(project / "clam_out" / "raw")
    exp["production_save_dir"] = str(project / "clam_out" / "production")
    data["data_dir"] = str(project / "slides")
    data["preset"] = str(project / "presets" / "demo.csv")
    list_name = f"clam_heat_bench_{size}.csv"
    shutil.copy2(
        project / "process_lists" / "demo.csv", clam / "heatmaps" / "process_lists" / list_name
    )
    data["process_list"] = list_name
    model["ckpt_path"] = str(project / model["ckpt_path"])
    config_name = f"clam_heat_bench_{size}.yaml"
    (clam / "heatmaps" / "configs" / config_name).write_text(yaml.safe_dump(cfg), encoding="utf-8")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "create_heatmaps.py", "--config_file", config_name],
        cwd=clam,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"CLAM's create_heatmaps.py failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "case": "clam",
        "size": size,
        "slides": n_slides,
        "cpu_s": round(cpu, 3),
        "slides_per_cpu_min": round(60 * n_slides / cpu, 1),
        "peak_mb": round(after.ru_maxrss / 1024, 1),
    }


def _compile_package() -> None:
    """Byte-compile clam-heat before measuring, as ``pip install`` does and as any Python does
    on a package's first import. Where ``PYTHONDONTWRITEBYTECODE`` is set (this machine sets it)
    an editable checkout is otherwise compiled from source by every process: ~0.15 CPU s of
    each run, start-up cost a user's installed copy never pays. Idempotent (only stale files are
    compiled); the ``__pycache__`` folders are git-ignored."""
    import compileall

    import clam_heat

    package = Path(clam_heat.__file__).parent
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print(f"PYTHONDONTWRITEBYTECODE is set: byte-compiling {package} first", flush=True)
    compileall.compile_dir(package, quiet=1)


def _print(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
        return
    case = record["case"]
    if case == "run":
        stages = ", ".join(f"{k} {v:.2f}" for k, v in record["stage_cpu_s"].items())
        print(
            f"run {record['size']} x{record['slides']}: {record['cpu_s']:.2f} CPU s = "
            f"{record['slides_per_cpu_min']} slides/CPU-min; peak RSS driver "
            f"{record['driver_peak_mb']} MB, model process {record['model_process_peak_mb']} MB; "
            f"stage CPU s: {stages}; sample floor (read + encode) "
            f"{record['floor_sample_cpu_s']:.2f} s",
            flush=True,
        )
    elif case == "noop":
        print(
            f"no-op rerun {record['size']} x{record['slides']}: {record['cpu_s']:.2f} CPU s, "
            f"peak RSS {max(record['driver_peak_mb'], record['model_process_peak_mb'])} MB, "
            f"torch imported: {record['torch_in_driver']}",
            flush=True,
        )
    elif case == "status":
        print(
            f"status on {record['rows']} rows: {record['cpu_s']:.2f} CPU s, "
            f"peak RSS {record['driver_peak_mb']} MB",
            flush=True,
        )
    elif case == "full_res":
        print(
            f"vis_level-0 row, {record['format']}: {record['cpu_s']:.1f} CPU s; peak RSS driver "
            f"{record['driver_peak_mb']} MB, model process {record['model_process_peak_mb']} MB",
            flush=True,
        )
    elif case == "clam":
        print(
            f"CLAM {record['size']} x{record['slides']}: {record['cpu_s']:.2f} CPU s = "
            f"{record['slides_per_cpu_min']} slides/CPU-min; peak RSS {record['peak_mb']} MB",
            flush=True,
        )
    elif case == "ratio":
        print(f"ratio {record['size']}: {record['ratio']:.2f}x CLAM's slides/CPU-min", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help="demo sizes (tiny, small)")
    parser.add_argument("--slides", default="16,4", help="slides per size, in --sizes order")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (median kept)")
    parser.add_argument("--clam", type=Path, help="a CLAM checkout: also run create_heatmaps.py")
    parser.add_argument("--full-res", action="store_true", help="vis_level-0 rows (slow)")
    parser.add_argument("--json", action="store_true", help="JSON lines")
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    counts = [int(n) for n in args.slides.split(",")]
    counts += counts[-1:] * (len(sizes) - len(counts))
    CACHE.mkdir(parents=True, exist_ok=True)
    _compile_package()
    if args.clam is None:
        print("no --clam given: our figures only (no ratio to CLAM)", flush=True)
    with tempfile.TemporaryDirectory(prefix="e2e-", dir=CACHE) as tmp:
        work = Path(tmp)
        for size, n in zip(sizes, counts, strict=False):
            runs = []
            for i in range(args.repeats):
                run_dir = work / f"{size}_{i}"
                run_dir.mkdir()
                first, noop = bench_ours(size, n, run_dir)
                runs.append(first)
                _print(first, args.json)
                _print(noop, args.json)
            ours = sorted(runs, key=lambda r: r["cpu_s"])[len(runs) // 2]
            if args.clam is not None:
                clam_dir = work / f"{size}_clam"
                clam_dir.mkdir()
                clam = bench_clam(args.clam.resolve(), size, n, clam_dir)
                _print(clam, args.json)
                ratio = ours["slides_per_cpu_min"] / clam["slides_per_cpu_min"]
                _print({"case": "ratio", "size": size, "ratio": ratio}, args.json)
        _print(bench_status(work), args.json)
        if args.full_res:
            full = work / "full"
            full.mkdir()
            for record in bench_full_res(full):
                _print(record, args.json)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
