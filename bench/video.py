"""Time a fly-through video (``clam_heat.video.make_flythrough``) on a large demo slide.

    python bench/video.py                        # 40000x30000 slide, 1280x720, 20 s at 25 fps
    python bench/video.py --size small --seconds 10 --json

The demo project (one slide, its features and checkpoint) is generated once under
``~/.cache/clam-heat-bench/video_<size>/`` (override with ``CLAM_HEAT_BENCH_CACHE``) and its
inference run once; the timed span is the video alone (plan, reads, overlay, encoding).
The issue's target: a 720p video of about 20 s in under a minute on CPU for a 40000x30000 slide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2

from clam_heat.config import load_config
from clam_heat.demo import make_demo_project
from clam_heat.runner import run_pipeline
from clam_heat.video import make_flythrough

CACHE = Path(os.environ.get("CLAM_HEAT_BENCH_CACHE", Path.home() / ".cache" / "clam-heat-bench"))


def project(size: str) -> Path:
    """The cached one-slide demo project with its blockmap (made on first use)."""
    demo = make_demo_project(CACHE / f"video_{size}", n_slides=1, size=size)
    summary = run_pipeline(load_config(demo.config_path), stages=("infer",))
    if not summary.ok:
        sys.exit(f"demo inference failed: {summary.failed}")
    return demo.config_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=("tiny", "small", "large"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--frame", default="1280x720", help="video width x height")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="also keep the video here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.frame.lower().split("x"))
    config = project(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "fly.mp4"
        start = time.perf_counter()
        info = make_flythrough(
            config,
            "demo_000",
            out,
            seconds=args.seconds,
            fps=args.fps,
            size=(width, height),
            topk=args.topk,
            workers=args.workers,
        )
        wall = time.perf_counter() - start
        cap = cv2.VideoCapture(str(out))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        result = {
            "slide": args.size,
            "frame": [width, height],
            "video_seconds": info.seconds,
            "frames": info.n_frames,
            "frames_read_back": frames,
            "regions": len(info.regions),
            "wall_seconds": round(wall, 2),
            "bytes": out.stat().st_size,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['frames']} frames ({info.seconds:g} s at {args.fps:g} fps, "
            f"{width}x{height}) of a {args.size} demo slide: {result['wall_seconds']} s wall, "
            f"{result['bytes'] / 1e6:.1f} MB, {result['cpus']} CPUs"
        )


if __name__ == "__main__":
    main()
