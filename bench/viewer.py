"""Benchmark the live viewer: map tiles, server memory, region renders, the cohort page.

Usage (from the repository root, in the project's venv)::

    python bench/viewer.py                  # all cases on the 40000x30000 demo slide
    python bench/viewer.py --tiles 2000     # tile requests for the RSS figure
    python bench/viewer.py --case cohort    # one case: tiles, render or cohort

Cases (each in a fresh subprocess, so peak RSS is its own):

* ``tiles``: a viewer server (``ViewerApp`` + ``ViewerServer``, in a child process) over the
  40000x30000 demo slide with a blockmap of >= 1,000,000 patches (256 px, step 17: overlap
  0.93, the in-tissue grid of ``bench/heatmap.py``) and its tissue mask. The client asks for
  256 px map tiles at random positions inside the slide, levels drawn uniformly from all
  levels. ``first`` is the first tile (it loads and indexes the scores); ``cold`` tiles are
  drawn for the first time (index loaded); ``warm`` tiles are asked again (the server's tile
  cache). Then ``--tiles`` requests in all (new positions and styles: colormap, threshold)
  and the server's peak RSS (``VmHWM``).
* ``render``: :func:`clam_heat.heatmap.region.write_region` of a 10000x10000 level-0 region
  at level 0 to PNG (the region command's path), peak RSS.
* ``cohort``: a server with 10,000 rows; headless Chromium loads the cohort page; the time
  from navigation start to the first painted table (``window.clamHeat.painted``).

Targets (docs/viewer.md): tiles p95 <= 50 ms warm, <= 200 ms cold; server RSS <= 600 MB after 2,000
tiles; render of 10000x10000 <= 500 MB RSS; cohort page <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import heatmap as hb  # noqa: E402 - the demo slide, tissue and grid helpers

OVERLAP = 0.93  # step int(256 * 0.07) = 17 px: >= 1M in-tissue patches on 40000x30000


def _peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _inputs(width: int, height: int) -> tuple[Path, Path, Path]:
    """The slide, its tissue GeoJSON and a blockmap H5 of seeded random scores (cached)."""
    from clam_heat.h5io import write_scores_h5

    slide = hb._demo(width, height)
    tissue = slide.with_suffix(".tissue.geojson")
    if not tissue.exists():
        hb._tissue(slide)
    h5 = slide.with_suffix(f".blockmap{OVERLAP}.h5")
    if not h5.exists():
        coords = np.load(hb._grid(slide, OVERLAP, tissue))
        scores = np.random.default_rng(0).random(len(coords)).astype(np.float32)
        write_scores_h5(h5, scores, coords, coords_attrs={"patch_size_level0": hb.PATCH_L0})
    return slide, tissue, h5


def _serve(args: argparse.Namespace) -> None:
    """Child: a viewer over one slide (or ``--rows`` synthetic rows), prints its URL."""
    from clam_heat.viewer import MapSource, ViewerApp, ViewerEntry, ViewerServer

    slide, tissue, h5 = Path(args.slide), Path(args.tissue), Path(args.h5)
    if args.rows:
        rng = random.Random(0)
        entries = [
            ViewerEntry(
                slide_id=f"slide_{k:05d}",
                label=rng.choice(["normal", "tumour"]),
                slide_path=slide,
                status=rng.choice(["done"] * 9 + ["failed"]),
                details={
                    "Pred_0": rng.choice(["normal", "tumour"]),
                    "p_0": f"{rng.random():.4f}",
                    "attention_mean": f"{rng.gauss(0, 1):.3f}",
                    "attention_std": "1.0",
                },
            )
            for k in range(args.rows)
        ]
    else:
        entries = [
            ViewerEntry(
                slide_id="big",
                label="tumour",
                slide_path=slide,
                status="done",
                maps=(MapSource("attention", h5),),
                tissue=tissue,
            )
        ]
    server = ViewerServer(ViewerApp(entries, title="bench"), port=0)
    print(server.url, flush=True)
    server.serve_forever()


def _start(args: argparse.Namespace, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, __file__, "--child", "serve", "--slide", args.slide]
    cmd += ["--tissue", args.tissue, "--h5", args.h5, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _get(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
    return (time.perf_counter() - start) * 1000


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_tiles(args: argparse.Namespace) -> dict[str, Any]:
    from clam_heat.viewer.tiles import TILE, max_level

    width, height = args.size
    top = max_level((width, height))
    rng = random.Random(1)

    def tile_url(base: str, style: str) -> str:
        level = rng.randint(0, top)
        ds = 2 ** (top - level)
        nx, ny = -(-width // ds // TILE) or 1, -(-height // ds // TILE) or 1
        return f"{base}tiles/big/map/0/{level}/{rng.randrange(nx)}_{rng.randrange(ny)}.png?{style}"

    proc, url = _start(args)
    try:
        first = _get(tile_url(url, "cmap=jet"))
        cold_urls = [tile_url(url, "cmap=jet") for _ in range(args.sample)]
        cold = [_get(u) for u in cold_urls]
        warm = [_get(u) for u in cold_urls]
        styles = ["cmap=jet", "cmap=viridis", "cmap=plasma&th=0.5", "cmap=magma&th=0.2"]
        done = 1 + 2 * len(cold_urls)
        more = [_get(tile_url(url, rng.choice(styles))) for _ in range(max(0, args.tiles - done))]
        rss = _peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return {
        "case": "tiles",
        "first_ms": round(first, 1),
        "cold_p50_ms": round(_p(cold, 50), 1),
        "cold_p95_ms": round(_p(cold, 95), 1),
        "warm_p50_ms": round(_p(warm, 50), 2),
        "warm_p95_ms": round(_p(warm, 95), 2),
        "mixed_p95_ms": round(_p(more, 95), 1),
        "requests": done + len(more),
        "server_peak_rss_mb": round(rss, 1),
    }


def _render_child(args: argparse.Namespace) -> None:
    from clam_heat.heatmap.meta import image_meta
    from clam_heat.heatmap.region import RegionView, patch_paint, write_region
    from clam_heat.slide import open_slide
    from clam_heat.tissue import load_geojson
    from clam_heat.viewer.maps import load_index

    start = time.perf_counter()
    index = load_index(Path(args.h5))
    with open_slide(Path(args.slide)) as slide:
        view = RegionView(
            index,
            patch_paint(index.percentiles / 100, 0.0),
            (1.0, 1.0),
            tuple(int(v) for v in slide.dimensions),
            tissue=load_geojson(Path(args.tissue)),
            slide=slide,
            level=0,
        )
        x0, y0 = 15000, 10000
        out = Path(args.out)
        write_region(view, (x0, y0, x0 + 10000, y0 + 10000), out, meta=image_meta("jet"))
    print(
        json.dumps(
            {
                "case": "render",
                "region": "10000x10000 level 0 -> PNG",
                "patches": len(index),
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "bytes": out.stat().st_size,
            }
        )
    )


def run_render(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", "render", "--slide", args.slide]
        cmd += ["--tissue", args.tissue, "--h5", args.h5, "--out", str(Path(tmp) / "roi.png")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cohort(args: argparse.Namespace) -> dict[str, Any]:
    browser = next(
        (shutil.which(b) for b in ("chromium-headless-shell", "chromium") if shutil.which(b)), None
    )
    if browser is None:
        return {"case": "cohort", "skipped": "no headless Chromium"}
    import websocket

    proc, url = _start(args, "--rows", str(args.rows))
    profile = tempfile.mkdtemp()
    chrome = subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-port=0",
            "--window-size=1200,800",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert chrome.stderr is not None
        port = next(
            m.group(1)
            for line in chrome.stderr
            if (m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line))
        )
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        ws = websocket.create_connection(
            next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"],
            suppress_origin=True,
        )
        n = 0

        def call(method: str, **params: Any) -> dict[str, Any]:
            nonlocal n
            n += 1
            ws.send(json.dumps({"id": n, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == n:
                    return msg.get("result", {})

        times = []
        for _ in range(3):
            call("Page.navigate", url=url)
            for _ in range(600):
                value = call(
                    "Runtime.evaluate",
                    expression="window.clamHeat && window.clamHeat.painted",
                    returnByValue=True,
                )["result"].get("value")
                if value:
                    break
                time.sleep(0.05)
            rows = call(
                "Runtime.evaluate",
                expression="document.querySelectorAll('#rows tbody tr').length",
                returnByValue=True,
            )["result"]["value"]
            times.append(float(value))
        ws.close()
    finally:
        os.killpg(chrome.pid, signal.SIGKILL)
        chrome.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return {
        "case": "cohort",
        "rows": args.rows,
        "rows_in_dom": rows,
        "paint_ms_runs": [round(t) for t in times],
        "paint_ms_best": round(min(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=hb._size, default=(40000, 30000))
    parser.add_argument("--case", choices=["tiles", "render", "cohort"], action="append")
    parser.add_argument("--tiles", type=int, default=2000, help="tile requests in all")
    parser.add_argument("--sample", type=int, default=200, help="tiles timed cold and warm")
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--tissue", help=argparse.SUPPRESS)
    parser.add_argument("--h5", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "serve":
        if args.rows == 10000 and "--rows" not in sys.argv:
            args.rows = 0
        _serve(args)
        return
    if args.child == "render":
        _render_child(args)
        return
    slide, tissue, h5 = _inputs(*args.size)
    args.slide, args.tissue, args.h5 = str(slide), str(tissue), str(h5)
    for case in args.case or ["tiles", "render", "cohort"]:
        record = {"tiles": run_tiles, "render": run_render, "cohort": run_cohort}[case](args)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
