"""Benchmark the heatmap stage against the read+encode floor (time and peak RSS per case).

Usage (from the repository root, in the project's venv)::

    python bench/heatmap.py                       # 40000x30000 demo slide, all cases
    python bench/heatmap.py --size 20000x15000    # smaller demo slide
    python bench/heatmap.py --flat-rss            # pyramid-TIFF-only RSS: 1x, 2x tall, 2x wide
    python bench/heatmap.py --full-res            # vis_level 0 JPEG and PNG: peak RSS each
    python bench/heatmap.py --percentiles         # use_ref_scores: 10M scores vs a 10M reference
    python bench/heatmap.py --slide S.svs --h5 FEATURES.h5 --vis-level 1 --overlap 0.75 --json

Every case runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own. The timed
span starts after module imports (a runner pays them once per process, not per slide):

* ``floor``: ``Slide.read_level(vis_level)`` (one OpenSlide read of the whole vis level),
  ``imagecodecs.jpeg8_encode(level=100)`` and the file write -- what any heatmap must at least
  do to produce a JPEG of the vis level.
* ``heatmap``: :func:`clam_heat.heatmap.render_heatmap` for the production image (percentiles,
  jet, alpha 0.4, tissue masking on, JPEG quality 100), with seeded random scores on an
  in-tissue patch grid (256 px level-0 patches, step ``int(256 * (1 - overlap))``).
* ``pyramid``: the same render with only the pyramidal TIFF output (``--flat-rss``).
* ``--full-res``: the production render at vis_level 0 (40000x30000 px for the default slide)
  saved as JPEG (quality 100) and as PNG, one fresh process each; one JSON line per format
  with its peak RSS (target <= 500 MB: both are streamed through libvips above
  ``STREAM_MIN_PIXELS``).
* ``--percentiles``: :func:`clam_heat.heatmap.percentile_of_scores` of 10M scores against a
  10M reference (``use_ref_scores``; one sort of the reference plus binary searches).

Demo slides are generated once with :func:`clam_heat.demo.make_demo_slide` and cached under
``~/.cache/clam-heat-bench/`` (override with ``CLAM_HEAT_BENCH_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CLAM_HEAT_BENCH_CACHE", Path.home() / ".cache" / "clam-heat-bench"))
PATCH_L0 = 256
OVERLAPS = (0.0, 0.5, 0.75, 0.9)


def _cpu() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` from /proc (``ru_maxrss`` is a fallback only:
    Linux carries the parent's high-water mark across fork + exec into it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------- child cases


def _case_floor(args: argparse.Namespace) -> None:
    import imagecodecs

    from clam_heat.slide import open_slide

    rss_before = _peak_rss_mb()
    out = Path(args.out) / "floor.jpg"
    with open_slide(args.slide) as slide:
        level = args.vis_level if args.vis_level >= 0 else slide.best_level_for_downsample(32)
        start, cpu = time.perf_counter(), _cpu()
        image = slide.read_level(level)
        data = imagecodecs.jpeg8_encode(image, level=100)
        out.write_bytes(data)
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    _emit(
        {
            "case": "floor",
            "seconds": seconds,
            "cpu_seconds": cpu,
            "peak_rss_mb": _peak_rss_mb(),
            "import_rss_mb": rss_before,
            "shape": list(image.shape[:2]),
            "image_mb": image.nbytes / 2**20,
            "jpeg_mb": len(data) / 2**20,
        }
    )


def _case_render(args: argparse.Namespace) -> None:
    import matplotlib  # noqa: F401 - import cost is not part of the stage

    from clam_heat.heatmap import HeatmapSpec, colormap_lut, render_heatmap
    from clam_heat.slide import open_slide
    from clam_heat.tissue import load_geojson

    colormap_lut("jet")
    coords = np.load(args.coords)
    scores = np.random.default_rng(args.seed).random(len(coords)).astype(np.float32)
    tissue = load_geojson(args.tissue) if args.tissue else None
    rss_before = _peak_rss_mb()
    pyramid_only = args.case == "pyramid"
    out = Path(args.out)
    spec = HeatmapSpec(
        vis_level=args.vis_level,
        overlap=args.overlap,
        use_percentiles=True,
        segment=tissue is not None,
        tile_size=args.tile_size,
    )
    with open_slide(args.slide) as slide:
        start, cpu = time.perf_counter(), _cpu()
        result = render_heatmap(
            slide,
            coords,
            scores,
            args.patch_size,
            spec,
            tissue=tissue,
            out_path=None if pyramid_only else out / f"heatmap.{args.ext}",
            pyramid_tiff_path=out / "heatmap.tiff" if pyramid_only else None,
        )
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    h, w = result.shape
    _emit(
        {
            "case": args.case,
            "format": "tiff" if pyramid_only else args.ext,
            "vis_level": args.vis_level,
            "overlap": args.overlap,
            "n_patches": int(len(coords)),
            "seconds": seconds,
            "cpu_seconds": cpu,
            "peak_rss_mb": _peak_rss_mb(),
            "import_rss_mb": rss_before,
            "shape": [h, w],
            "image_mb": h * w * 3 / 2**20,
            "file_mb": sum(p.stat().st_size for p in result.paths) / 2**20,
        }
    )


# ----------------------------------------------------------------------------- parent side


def _best(case: str, repeat: int, **kw: Any) -> dict[str, Any]:
    """Run a case ``repeat`` times (fresh processes); keep the fastest (least disturbed) run
    and the largest peak RSS."""
    runs = [_child(case, **kw) for _ in range(max(1, repeat))]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def _child(case: str, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case]
    for key, value in kw.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _demo(width: int, height: int) -> Path:
    """The cached demo slide of this size (generated once, atomically)."""
    from clam_heat.demo import make_demo_slide

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"demo_{width}x{height}.tiff"
    if not path.exists():
        _log(f"generating {path} (once) ...")
        start = time.perf_counter()
        make_demo_slide(path, width=width, height=height, seed=0)
        _log(f"  done in {time.perf_counter() - start:.1f} s")
    return path


def _tissue(slide_path: Path) -> tuple[Path, float]:
    """Segment the slide (CLAM defaults) once; cached as GeoJSON next to it."""
    from clam_heat.slide import open_slide
    from clam_heat.tissue import SegmentationParams, save_geojson, segment_slide

    path = slide_path.with_suffix(".tissue.geojson")
    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        tissue, _ = segment_slide(slide, SegmentationParams())
    seconds = time.perf_counter() - start
    save_geojson(tissue, path)
    return path, seconds


def _grid(slide_path: Path, overlap: float, tissue: Path) -> Path:
    """In-tissue grid at CLAM's step for ``overlap``: patches whose centre is in tissue."""
    from clam_heat.slide import open_slide
    from clam_heat.tissue import load_geojson, rasterize_tissue

    path = slide_path.with_suffix(f".grid{overlap}.npy")
    if path.exists():
        return path
    with open_slide(slide_path) as slide:
        w0, h0 = slide.dimensions
    step = int(PATCH_L0 * (1 - overlap))
    gx, gy = np.meshgrid(
        np.arange(0, w0 - PATCH_L0 + 1, step), np.arange(0, h0 - PATCH_L0 + 1, step)
    )
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    ds = 16
    mask = rasterize_tissue(
        load_geojson(tissue), l0_origin=(0, 0), shape=(h0 // ds, w0 // ds), scale=(1 / ds, 1 / ds)
    )
    cy = np.clip((coords[:, 1] + PATCH_L0 // 2) // ds, 0, mask.shape[0] - 1)
    cx = np.clip((coords[:, 0] + PATCH_L0 // 2) // ds, 0, mask.shape[1] - 1)
    np.save(path, coords[mask[cy, cx]])
    return path


def _log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _percentiles_1m() -> float:
    from clam_heat.heatmap import to_percentiles

    scores = np.random.default_rng(0).random(1_000_000).astype(np.float32)
    to_percentiles(scores[:10])
    start = time.perf_counter()
    to_percentiles(scores)
    return time.perf_counter() - start


def _percentiles_10m(n: int = 10_000_000) -> dict[str, Any]:
    """use_ref_scores at scale: ``n`` scores against an ``n``-score reference (with ties)."""
    from clam_heat.heatmap import percentile_of_scores

    rng = np.random.default_rng(0)
    reference = rng.random(n).astype(np.float32)
    reference[: n // 10] = reference[n // 10 : n // 5]  # ties, as float32 attention has
    scores = rng.random(n).astype(np.float32)
    percentile_of_scores(scores[:10], reference[:10])
    start = time.perf_counter()
    out = percentile_of_scores(scores, reference)
    seconds = time.perf_counter() - start
    return {"case": "percentiles", "n_scores": n, "n_reference": n, "seconds": seconds,
            "checksum": float(out.sum())}  # fmt: skip


def run_full_res(width: int, height: int, overlap: float, tile_size: int) -> None:
    """vis_level 0 production heatmap as JPEG and PNG, one fresh process each: peak RSS."""
    slide = _demo(width, height)
    tissue, _ = _tissue(slide)
    grid = _grid(slide, overlap, tissue)
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=CACHE))
    try:
        for ext in ("jpg", "png"):
            rec = _child(
                "heatmap",
                slide=slide,
                coords=grid,
                tissue=tissue,
                vis_level=0,
                overlap=overlap,
                out=out,
                tile_size=tile_size,
                ext=ext,
            )
            rec["target_peak_rss_mb"] = 500
            rec["ok"] = rec["peak_rss_mb"] <= 500
            _emit(rec)
            for path in out.iterdir():
                path.unlink()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _row(name: str, rec: dict[str, Any], floor: float) -> str:
    budget = rec["image_mb"] + 250
    rss = rec["peak_rss_mb"]
    ok_rss = "ok" if rss <= budget else "OVER"
    return (
        f"{name:<16} {rec['seconds']:8.2f} s  {rec['seconds'] / floor:5.2f}x floor  "
        f"(cpu {rec['cpu_seconds']:5.2f} s)  "
        f"peak RSS {rss:7.0f} MB (budget {budget:5.0f} MB: {ok_rss})  "
        f"patches {rec.get('n_patches', '-')}"
    )


def run_suite(width: int, height: int, vis_level: int, tile_size: int, repeat: int) -> None:
    slide = _demo(width, height)
    tissue, seg_seconds = _tissue(slide)
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=CACHE))
    try:
        floor = _best("floor", repeat, slide=slide, vis_level=vis_level, out=out)
        h, w = floor["shape"]
        print(
            f"slide {slide.name}: {width}x{height}, vis level {vis_level} -> {w}x{h} px "
            f"({floor['image_mb']:.0f} MB RGB); segmentation {seg_seconds:.2f} s"
        )
        print(
            f"{'floor':<16} {floor['seconds']:8.2f} s  (read + JPEG q100 encode + write; "
            f"cpu {floor['cpu_seconds']:.2f} s; peak RSS {floor['peak_rss_mb']:.0f} MB)"
        )
        for overlap in OVERLAPS:
            grid = _grid(slide, overlap, tissue)
            rec = _best(
                "heatmap",
                repeat,
                slide=slide,
                coords=grid,
                tissue=tissue,
                vis_level=vis_level,
                overlap=overlap,
                out=out,
                tile_size=tile_size,
            )
            print(_row(f"overlap {overlap}", rec, floor["seconds"]))
        print(f"{'percentiles 1M':<16} {_percentiles_1m():8.3f} s")
        print(f"{'ref pct 10M/10M':<16} {_percentiles_10m()['seconds']:8.3f} s")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_flat_rss(width: int, height: int, vis_level: int, overlap: float, tile_size: int) -> None:
    """Pyramid-TIFF-only renders of the slide, then twice as tall, then twice as wide.

    Memory is a few 256-row strips (O(width)) plus O(patches) arrays, never O(area): doubling
    the height should leave peak RSS flat, doubling the width adds only strip memory.
    """
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=CACHE))
    try:
        rows = []
        for w0, h0 in ((width, height), (width, 2 * height), (2 * width, height)):
            slide = _demo(w0, h0)
            tissue, _ = _tissue(slide)
            grid = _grid(slide, overlap, tissue)
            rec = _child(
                "pyramid",
                slide=slide,
                coords=grid,
                tissue=tissue,
                vis_level=vis_level,
                overlap=overlap,
                out=out,
                tile_size=tile_size,
            )
            rows.append(rec)
            h, w = rec["shape"]
            print(
                f"{w0}x{h0}: overlay {w}x{h} ({rec['image_mb']:.0f} MB RGB), "
                f"{rec['n_patches']} patches, {rec['seconds']:.2f} s, peak RSS "
                f"{rec['peak_rss_mb']:.0f} MB (after imports {rec['import_rss_mb']:.0f} MB), "
                f"TIFF {rec['file_mb']:.0f} MB"
            )
        for rec, what in ((rows[1], "2x height"), (rows[2], "2x width")):
            grow = rec["peak_rss_mb"] - rows[0]["peak_rss_mb"]
            image_grow = rec["image_mb"] - rows[0]["image_mb"]
            print(
                f"{what}: peak RSS grew {grow:+.0f} MB while the overlay grew {image_grow:.0f} MB"
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_external(args: argparse.Namespace) -> None:
    import h5py

    from clam_heat.features import patch_size_from_attrs
    from clam_heat.slide import open_slide

    slide = Path(args.slide).resolve()
    with open_slide(slide) as sl, h5py.File(args.h5, "r") as h5:
        coords = h5["coords"][:].astype(np.int64).reshape(-1, 2)
        attrs = dict(h5["coords"].attrs)
        found = patch_size_from_attrs(attrs, sl.level_downsamples)
        level = args.vis_level if args.vis_level >= 0 else sl.best_level_for_downsample(32)
    if found is None:
        raise SystemExit(f"{args.h5}: no patch size attrs on 'coords' (patch_size_level0 ...)")
    work = Path(tempfile.mkdtemp(prefix="bench-ext-"))
    try:
        np.save(work / "coords.npy", coords)
        start = time.perf_counter()
        tissue, seg_seconds = _tissue_into(slide, work / "tissue.geojson")
        floor = _best("floor", args.repeat, slide=slide, vis_level=level, out=work)
        rec = _best(
            "heatmap",
            args.repeat,
            slide=slide,
            coords=work / "coords.npy",
            tissue=tissue,
            vis_level=level,
            overlap=args.overlap,
            out=work,
            patch_size=found[0],
            seed=args.seed,
            tile_size=args.tile_size,
        )
        result = {
            "slide": str(slide),
            "vis_level": level,
            "overlap": args.overlap,
            "patch_size_level0": found[0],
            "n_patches": rec["n_patches"],
            "output_shape": rec["shape"],
            "seconds": round(rec["seconds"], 4),
            "floor_seconds": round(floor["seconds"], 4),
            "ratio": round(rec["seconds"] / floor["seconds"], 3),
            "peak_rss_mb": round(rec["peak_rss_mb"], 1),
            "floor_peak_rss_mb": round(floor["peak_rss_mb"], 1),
            "image_mb": round(rec["image_mb"], 1),
            "segment_seconds": round(seg_seconds, 3),
            "total_seconds": round(time.perf_counter() - start, 3),
        }
        if args.json:
            _emit(result)
        else:
            for key, value in result.items():
                print(f"{key:>18}: {value}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tissue_into(slide_path: Path, path: Path) -> tuple[Path, float]:
    from clam_heat.slide import open_slide
    from clam_heat.tissue import SegmentationParams, save_geojson, segment_slide

    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        tissue, _ = segment_slide(slide, SegmentationParams())
    seconds = time.perf_counter() - start
    save_geojson(tissue, path)
    return path, seconds


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=_size, default=(40000, 30000), help="demo slide WxH")
    p.add_argument("--vis-level", type=int, default=1)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--flat-rss", action="store_true", help="pyramid-only RSS at 1x, 2x h, 2x w")
    p.add_argument("--full-res", action="store_true", help="vis_level 0 JPEG and PNG peak RSS")
    p.add_argument("--percentiles", action="store_true", help="10M vs 10M use_ref_scores time")
    p.add_argument("--slide", help="external slide (with --h5) or the child's slide")
    p.add_argument("--h5", help="features/patches H5 with coords (external case)")
    p.add_argument("--json", action="store_true", help="external case: one JSON line")
    p.add_argument("--seed", type=int, default=0, help="random attention scores seed")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest is kept")
    # internal (child) arguments
    p.add_argument("--case", choices=("floor", "heatmap", "pyramid"), help=argparse.SUPPRESS)
    p.add_argument("--coords", help=argparse.SUPPRESS)
    p.add_argument("--tissue", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--patch-size", type=int, default=PATCH_L0, help=argparse.SUPPRESS)
    p.add_argument("--ext", default="jpg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case == "floor":
        _case_floor(args)
    elif args.case in ("heatmap", "pyramid"):
        _case_render(args)
    elif args.h5 or args.slide:
        if not (args.h5 and args.slide):
            p.error("the external case needs both --slide and --h5")
        run_external(args)
    elif args.percentiles:
        _emit(_percentiles_10m())
    elif args.full_res:
        run_full_res(*args.size, args.overlap, args.tile_size)
    elif args.flat_rss:
        run_flat_rss(*args.size, args.vis_level, args.overlap, args.tile_size)
    else:
        run_suite(*args.size, args.vis_level, args.tile_size, args.repeat)


if __name__ == "__main__":
    main()
