"""The viewer's answers as plain Python (bytes and dicts), no HTTP: slide information, slide
and map tiles, the patch under the cursor, thumbnails, the cohort table and review notes.

:mod:`.server` maps URLs to these calls; tests may call them directly. Everything a request
can name is looked up in the run's entries (slide ids, map numbers): no request value ever
becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ..errors import ClamHeatError, OutputError
from .entries import ViewerEntry, attention_stats, cohort_row
from .maps import SCALES, Style, load_index, values01
from .review import ReviewNotes
from .tiles import TILE, MapTiles, OpenSlides, legend, max_level, open_image, slide_tile

if TYPE_CHECKING:
    from ..heatmap.region import ScoreIndex

__all__ = ["THUMB_SIDE", "BadRequest", "ViewerApp"]

log = logging.getLogger(__name__)

#: Longest side of a cohort thumbnail (px).
THUMB_SIDE = 160
_JPEG_QUALITY = 88


class BadRequest(ValueError):
    """A request the viewer refuses (answered 400 with this message)."""


class ViewerApp:
    """The state of one ``clam-heat view``: entries, open slides, map caches, notes.

    ``base_style`` is the run's production style (the page opens on it); ``cache_dir`` holds
    thumbnails and statistics (under the run's output root; None: not cached on disk);
    ``review`` the notes file (None: no notes, pair mode).
    """

    def __init__(
        self,
        entries: list[ViewerEntry],
        *,
        title: str = "clam-heat",
        base_style: Style | None = None,
        cache_dir: Path | None = None,
        review: Path | None = None,
        cohort_file: Path | None = None,
        run_hint: str = "clam-heat run CONFIG",
    ) -> None:
        self.entries = {e.slide_id: e for e in entries}
        self.order = [e.slide_id for e in entries]
        self.position = {sid: k for k, sid in enumerate(self.order)}
        self.title, self.run_hint = title, run_hint
        self.base_style = base_style or Style()
        self.cache_dir, self.cohort_file = cache_dir, cohort_file
        self.notes = ReviewNotes(review, set(self.entries)) if review is not None else None
        self.slides = OpenSlides()
        self.maps = MapTiles()
        self.sizes: dict[str, tuple[int, int]] = {}
        self.mpps: dict[str, float | None] = {}
        self.stats: dict[str, dict[str, float]] = {}
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self.slides.close()

    # -- lookups -------------------------------------------------------------------------

    def entry(self, slide_id: str) -> ViewerEntry:
        try:
            return self.entries[slide_id]
        except KeyError:
            raise KeyError(f"no slide {slide_id!r} in this run's process list") from None

    def l0_size(self, slide_id: str) -> tuple[int, int]:
        size = self.sizes.get(slide_id)
        if size is None:
            entry = self.entry(slide_id)
            with self.slides.hold(slide_id, entry.slide_path) as slide:
                size = tuple(int(v) for v in slide.dimensions)  # type: ignore[assignment]
                self.mpps[slide_id] = slide.mpp
            self.sizes[slide_id] = size  # type: ignore[assignment]
        return size  # type: ignore[return-value]

    def index(self, slide_id: str, map_no: int) -> ScoreIndex:
        entry = self.entry(slide_id)
        if not 0 <= map_no < len(entry.maps):
            raise KeyError(f"{slide_id!r} has no map {map_no}")
        source = entry.maps[map_no]
        return self.maps.index((slide_id, map_no), lambda: load_index(source))

    def tissue(self, slide_id: str) -> Any:
        entry = self.entry(slide_id)
        if entry.tissue is None:
            return None

        def load() -> Any:
            from ..tissue import load_geojson

            return load_geojson(entry.tissue)  # type: ignore[arg-type]

        return self.maps.tissues.get_or_make(slide_id, load)

    # -- pages' data ---------------------------------------------------------------------

    def slide_info(self, slide_id: str) -> dict[str, Any]:
        entry = self.entry(slide_id)
        info: dict[str, Any] = {
            "slide_id": slide_id,
            "label": entry.label,
            "status": entry.status,
            "details": entry.details,
            "tile": TILE,
            "style": self.base_style.__dict__,
            "cohort_scale": bool(self.cohort_file and self.cohort_file.is_file()),
            "maps": [
                {"no": k, "name": m.name, "cmap": m.cmap, "scale": m.scale}
                for k, m in enumerate(entry.maps)
            ],
            "image": None,
            "review": self.reviews().get(slide_id) if self.notes else None,
            "reviewable": self.notes is not None,
            "error": None,
        }
        k = self.position[slide_id]
        info["prev"] = self.order[k - 1] if k > 0 else None
        info["next"] = self.order[k + 1] if k + 1 < len(self.order) else None
        try:
            size = self.l0_size(slide_id)
        except ClamHeatError as err:
            info.update(width=None, height=None, error=str(err))
            return info
        info.update(
            width=size[0], height=size[1], max_level=max_level(size), mpp=self.mpps.get(slide_id)
        )
        if entry.image is not None:
            try:
                with self.slides.hold((slide_id, "image"), entry.image, open_image) as img:
                    w, h = (int(v) for v in img.dimensions)
                info["image"] = {"width": w, "height": h, "max_level": max_level((w, h))}
                info["image"].update(entry.image_meta or {})
            except ClamHeatError as err:
                info["error"] = str(err)
        if not entry.maps and entry.image is None:
            info["error"] = (
                f"no scores yet for {slide_id} (row status: {entry.status}); "
                f"run `{self.run_hint}` first"
            )
        return info

    def legend(
        self, cmap: str, scale: str = "percentile", slide_id: str | None = None, map_no: int = 0
    ) -> dict[str, Any]:
        """The colour bar of ``cmap`` and what its ends mean for a map under ``scale``."""
        from ..heatmap.region import describe

        if scale not in SCALES:
            raise BadRequest(f"scale={scale[:20]!r}: one of {', '.join(SCALES)}")
        try:
            bar = legend(cmap, scale, "", "")
        except ValueError as err:
            raise BadRequest(str(err)) from None
        name = "heatmap image"
        ends: dict[str, Any] = {"low": 0.0, "high": 100.0}
        if slide_id is not None:
            index = self.index(slide_id, map_no)
            name = self.entry(slide_id).maps[map_no].name
            ends = describe(index, scale)
        bar.update(title=f"{name} ({scale})", low=ends["low"], high=ends["high"])
        return bar

    # -- tiles ---------------------------------------------------------------------------

    def slide_tile(self, slide_id: str, level: int, tx: int, ty: int) -> bytes | None:
        entry = self.entry(slide_id)
        key = (slide_id, "slide", level, tx, ty)
        hit = self.maps.encoded.get(key)
        if hit is not None:
            return hit
        with self.slides.hold(slide_id, entry.slide_path) as slide:
            rgb = slide_tile(slide, level, tx, ty)
        if rgb is None:
            return None
        return self.maps.encoded.put(key, _encode(rgb, "jpg"))

    def image_tile(self, slide_id: str, level: int, tx: int, ty: int) -> bytes | None:
        entry = self.entry(slide_id)
        if entry.image is None:
            return None
        with self.slides.hold((slide_id, "image"), entry.image, open_image) as img:
            rgb = slide_tile(img, level, tx, ty)
        return None if rgb is None else _encode(rgb, "png")

    def map_tile(
        self, slide_id: str, map_no: int, style: Style, level: int, tx: int, ty: int
    ) -> bytes | None:
        key = (slide_id, "map", map_no, style, level, tx, ty)
        hit = self.maps.encoded.get(key)
        if hit is not None:
            return hit
        index = self.index(slide_id, map_no)
        size = self.l0_size(slide_id)
        paint = self.maps.paint(
            (slide_id, map_no), index, style, lambda: values01(index, style, self.cohort_file)
        )
        tissue = self.tissue(slide_id) if style.segment else None
        rgba = self.maps.rgba((slide_id, map_no), index, paint, style, tissue, size, level, tx, ty)
        if rgba is None:
            return None
        return self.maps.encoded.put(key, _encode(rgba, "png"))

    def patch_info(
        self, slide_id: str, map_no: int, scale: str, l0_x: float, l0_y: float
    ) -> dict[str, Any] | None:
        """The patch under level-0 (x, y): its score, percentile, rank and footprint."""
        index = self.index(slide_id, map_no)
        k = index.patch_at(l0_x, l0_y)
        if k is None:
            return None
        style = replace(self.base_style, scale=scale if scale in SCALES else "percentile")
        try:
            drawn = float(values01(index, style, self.cohort_file)[k])
        except OutputError:
            drawn = None  # type: ignore[assignment]
        x, y = (int(v) for v in index.coords[k])
        return {
            "x": x,
            "y": y,
            "w": index.patch[0],
            "h": index.patch[1],
            "score": float(index.scores[k]),
            "percentile": float(index.percentiles[k]),
            "rank": int(index.ranks[k]),
            "n": len(index),
            "drawn": drawn,
        }

    def patch_image(self, slide_id: str, map_no: int, l0_x: int, l0_y: int) -> bytes | None:
        """The patch under level-0 (x, y) at full resolution, JPEG (only the run's patches)."""
        index = self.index(slide_id, map_no)
        k = index.patch_at(l0_x, l0_y)
        if k is None:
            return None
        x, y = (int(v) for v in index.coords[k])
        w, h = (min(4096, v) for v in index.patch)
        with self.slides.hold(slide_id, self.entry(slide_id).slide_path) as slide:
            rgb = slide.read_region((x, y), 0, (w, h))
        return _encode(rgb, "jpg")

    # -- cohort --------------------------------------------------------------------------

    def reviews(self) -> dict[str, dict[str, str]]:
        return self.notes.read() if self.notes is not None else {}

    def save_review(self, slide_id: str, body: bytes) -> dict[str, str]:
        if self.notes is None:
            raise BadRequest("review notes need a run (clam-heat view CONFIG)")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the body must be JSON: {verdict, note}") from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k, ""), str) for k in ("verdict", "note")
        ):
            raise BadRequest("the body must be JSON: {verdict, note} (strings)")
        return self.notes.save(slide_id, data.get("verdict", ""), data.get("note", ""))

    def cohort(self) -> dict[str, Any]:
        notes = self.reviews()
        rows = []
        for sid in self.order:
            row = cohort_row(self.entries[sid], self.stats.get(sid))
            note = notes.get(sid, {})
            row["verdict"], row["note"] = note.get("verdict", ""), note.get("note", "")
            rows.append(row)
        return {"title": self.title, "rows": rows, "reviewable": self.notes is not None}

    def compute_stats(self) -> None:
        """Attention statistics of every row (top-10 % share), cached on disk by blockmap
        identity; run on a background thread at start."""
        cache: dict[str, Any] = {}
        path = self.cache_dir / "stats.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                cache = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cache = {}
        changed = False
        for sid in self.order:
            entry = self.entries[sid]
            if not entry.maps:
                continue
            source = entry.maps[0].path
            try:
                stamp = source.stat().st_mtime_ns
            except OSError:
                continue
            key = f"{sid}\n{stamp}"
            if key not in cache:
                try:
                    cache[key] = attention_stats(source)
                except (OSError, KeyError, ValueError):
                    continue
                changed = True
            with self._stats_lock:
                self.stats[sid] = cache[key]
        if changed and path is not None:
            from ..atomic import write_text_atomic

            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(cache), durable=False)
            except OSError as err:
                log.warning("viewer: cannot cache statistics in %s (%s)", path, err)

    def thumbnail(self, slide_id: str) -> bytes:
        """Slide + attention thumbnail (JPEG), made on first request and cached on disk."""
        entry = self.entry(slide_id)
        stamp = entry.maps[0].path.stat().st_mtime_ns if entry.maps else 0
        digest = hashlib.sha256(f"{slide_id}\n{stamp}\n{self.base_style}".encode()).hexdigest()
        cached = self.cache_dir / "thumbs" / f"{digest[:32]}.jpg" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        size = self.l0_size(slide_id)
        level = max(0, max_level(size) - math.ceil(math.log2(max(size) / THUMB_SIDE)))
        with self.slides.hold(slide_id, entry.slide_path) as slide:
            rgb = slide_tile(slide, level, 0, 0)
        assert rgb is not None
        if entry.maps:
            try:
                data = self.map_tile(slide_id, 0, self.base_style, level, 0, 0)
                rgba = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_UNCHANGED)
                if rgba is not None:
                    over = cv2.cvtColor(rgba, cv2.COLOR_BGRA2RGBA)
                    a = over[..., 3:4].astype(np.float32) / 255 * self.base_style.alpha
                    rgb = (over[..., :3] * a + rgb * (1 - a)).round().astype(np.uint8)
            except ClamHeatError:
                pass
        data = _encode(rgb, "jpg")
        if cached is not None:
            from ..atomic import write_bytes_atomic

            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(cached, data, durable=False)
            except OSError as err:
                log.warning("viewer: cannot cache a thumbnail in %s (%s)", cached.parent, err)
        return data


def _encode(image: np.ndarray, ext: str) -> bytes:
    """RGB(A) -> JPEG or PNG bytes."""
    if image.shape[2] == 4:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = (
        [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
        if ext == "jpg"
        else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    ok, data = cv2.imencode(f".{ext}", bgr, params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError(f"{ext} encoding failed")
    return data.tobytes()
