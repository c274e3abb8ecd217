"""Time and memory budgets that used to be asserts inside the test suite.

    python bench/limits.py            # every check, one line each; exit 1 if one is over budget
    python bench/limits.py --json     # one JSON object per check
    python bench/limits.py --only demo_slide_peak_rss

Wall clocks and peak memory depend on the machine and on what else runs on it, so the tests
check behaviour only and these budgets live here. Every check runs in a fresh subprocess (its
own peak RSS, no warm caches from another check) under a temporary folder that is removed.

- ``demo_slide_peak_rss``: writing a 1024 x 32768 demo slide raises the process's peak RSS
  (``VmHWM``, which sees C allocations too, unlike tracemalloc) by less than a third of the
  level-0 canvas (33.5 of 100 MB): the generator streams tiles instead of holding the canvas.
- ``demo_project_reuse_seconds``: ``make_demo_project`` on an existing project with the same
  parameters reuses it in under 1 s.
- ``thumbnail_seconds``: a tracker thumbnail of a 4000 x 3000 JPEG in under 5 s (decoded
  reduced, never at full size).
- ``wandb_offline_init_seconds``: a W&B offline tracker starts in under 20 s (skipped when
  ``wandb`` is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import textwrap

#: name -> (budget, unit, the code run in a fresh interpreter; it prints one number)
CHECKS: dict[str, tuple[float, str, str]] = {
    "demo_slide_peak_rss": (
        1024 * 32768 * 3 / 3 / 1e6,  # a third of the level-0 RGB canvas
        "MB",
        """
        import sys
        from pathlib import Path
        import clam_heat.demo.slides as slides

        def status_mb(key):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1e3
            sys.exit(f"no {key} in /proc/self/status on this system")

        slides._pyramid_textures(0.5, 256)  # shared textures, built outside the measurement
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
        before = status_mb("VmRSS")
        slides.make_demo_slide(Path(sys.argv[1]) / "tall.tiff", width=1024, height=32768)
        print(status_mb("VmHWM") - before)
        """,
    ),
    "demo_project_reuse_seconds": (
        1.0,
        "s",
        """
        import sys, time
        from pathlib import Path
        from clam_heat.demo import make_demo_project

        folder = Path(sys.argv[1]) / "demo"
        make_demo_project(folder, n_slides=5, size="tiny")
        start = time.perf_counter()
        make_demo_project(folder, n_slides=5, size="tiny")
        print(time.perf_counter() - start)
        """,
    ),
    "thumbnail_seconds": (
        5.0,
        "s",
        """
        import sys, time
        from pathlib import Path
        import cv2, numpy as np
        from clam_heat.trackers import thumbnail

        path = Path(sys.argv[1]) / "big.jpg"
        assert cv2.imwrite(str(path), np.full((3000, 4000, 3), (255, 0, 0), np.uint8))
        start = time.perf_counter()
        thumbnail(path)
        print(time.perf_counter() - start)
        """,
    ),
    "wandb_offline_init_seconds": (
        20.0,
        "s",
        """
        import os, sys, time
        from pathlib import Path
        from clam_heat.trackers import make_tracker

        root = Path(sys.argv[1])
        os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            os.environ[name] = str(root / name.lower())
        os.environ["NETRC"] = str(root / "no.netrc")
        start = time.perf_counter()
        tracker = make_tracker("wandb", run_name="bench", project="BENCH", directory=root)
        seconds = time.perf_counter() - start
        with tracker:
            pass
        print(seconds)
        """,
    ),
}


def measure(name: str) -> float | None:
    """Run one check in a fresh interpreter; None when its optional package is missing."""
    if name == "wandb_offline_init_seconds" and importlib.util.find_spec("wandb") is None:
        return None
    code = textwrap.dedent(CHECKS[name][2])
    with tempfile.TemporaryDirectory(prefix=f"clam-heat-{name}-") as folder:
        done = subprocess.run(
            [sys.executable, "-c", code, folder], capture_output=True, text=True, timeout=600
        )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr.strip()}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CHECKS), action="append")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    over = 0
    for name in args.only or list(CHECKS):
        budget, unit, _ = CHECKS[name]
        value = measure(name)
        ok = value is None or value < budget
        over += not ok
        if args.json:
            print(json.dumps({"check": name, "value": value, "budget": budget, "unit": unit}))
        elif value is None:
            print(f"{name:28s} skipped (optional package not installed)")
        else:
            verdict = "ok" if ok else "OVER BUDGET"
            print(f"{name:28s} {value:9.2f} {unit:2s} (budget < {budget:g} {unit}) {verdict}")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
