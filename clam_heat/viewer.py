"""Side-by-side slide / heatmap viewer: a small local web server and one page.

``clam-heat view CONFIG`` serves, for every row of the run's process list, the slide in the left
pane and its production heatmap in the right pane. Both panes share one view, so dragging or
zooming either moves both, and the cursor is mirrored as a cross in the other pane. Both are
tiled pyramids: only the tiles on screen are read, at the level that matches the zoom, so a
40x slide opens as fast as a thumbnail and memory does not grow with the slide.

Coordinate frames (as in openslide's deepzoom): ``l0_`` values are level-0 pixels of the slide;
``layer`` pixels are pixels of one level of a pane's pyramid. Each pane's pyramid is placed on
the slide's level-0 frame by an origin and a per-level downsample, so the heatmap (drawn at the
vis level, maybe of an ROI, maybe shrunk by ``custom_downsample``) lines up with the slide.

The heatmap pane reads ``<prod>/<id>_heatmap_pyramid.tiff`` when the run wrote it
(``runner_arguments.write_pyramid_tiff: true``): tiles then stream from disk. Otherwise it reads
the production image (``save_ext``) once per slide and keeps an in-memory pyramid of it.

Nothing here draws a heatmap: the viewer shows the files the ``heatmap`` stage wrote.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import math
import re
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import cv2
import numpy as np

from .errors import ClamHeatError, OutputError, SlideError

if TYPE_CHECKING:
    from .config import HeatmapConfig
    from .slide import Slide

__all__ = [
    "TILE_SIZE",
    "Layer",
    "ViewerEntry",
    "ViewerServer",
    "open_heatmap_layer",
    "viewer_entries",
]

log = logging.getLogger(__name__)

#: Side of a served tile, in pixels of the tile's pyramid level.
TILE_SIZE = 512
#: Slides whose opened pyramids are kept, and the most memory their decoded heatmap images may
#: hold together (the newest slide is always kept): a vis-level-1 heatmap of a 40x slide is
#: about 300 MB with its pyramid, a pyramidal TIFF costs nothing.
OPEN_SLIDES = 4
OPEN_IMAGE_BYTES = 768 * 2**20
_JPEG_QUALITY = 90


@dataclass(frozen=True)
class ViewerEntry:
    """One viewable row: where its slide and heatmap are, and what the index shows about it.

    ``heatmap_path`` is the pyramidal TIFF when it exists, else the production image, else None
    (the heatmap stage has not run). ``l0_box`` is the level-0 (x1, y1, x2, y2) the heatmap
    covers: the row's ROI with ``use_roi``, else None for the whole slide.
    """

    slide_id: str
    label: str
    slide_path: Path
    heatmap_path: Path | None
    expected_heatmap: Path
    l0_box: tuple[int, int, int, int] | None
    status: str
    details: dict[str, str] = field(default_factory=dict)


#: Run columns shown in a row's details, besides the prediction columns (bag_size, Pred_c, p_c).
_DETAIL_COLUMNS = ("stage", "error")


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def viewer_entries(cfg: HeatmapConfig) -> list[ViewerEntry]:
    """The rows of ``cfg``'s process list (``process == 1``), in list order, for the viewer."""
    from .process_list import PREDICTION_COLUMN, read_process_list
    from .rows import build_contexts, production_heatmap_path, pyramid_heatmap_path

    list_path = cfg.process_list_path
    if not list_path.is_file():
        raise OutputError(
            f"{list_path}: no process list yet; run `clam-heat run CONFIG` before viewing"
        )
    entries = []
    for ctx in build_contexts(cfg, read_process_list(list_path)):
        pyramid, image = pyramid_heatmap_path(ctx), production_heatmap_path(ctx)
        heatmap = pyramid if pyramid.is_file() else image if image.is_file() else None
        try:
            box = ctx.roi()
        except ClamHeatError:
            box = None
        details = {
            str(k): text
            for k, v in ctx.row.items()
            if (k in _DETAIL_COLUMNS or PREDICTION_COLUMN.match(str(k))) and (text := _text(v))
        }
        entries.append(
            ViewerEntry(
                slide_id=ctx.slide_id,
                label=ctx.label,
                slide_path=ctx.slide_path,
                heatmap_path=heatmap,
                expected_heatmap=image,
                l0_box=box,
                status=_text(ctx.row.get("status")) or "tbp",
                details=details,
            )
        )
    return entries


# ---------------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """A tiled pyramid placed on the slide's level-0 frame.

    Pixel (x, y) of level ``k`` covers level-0 ``l0_origin + (x, y) * downsample(k)``, where
    ``downsample(k) = l0_per_px * slide.level_downsamples[k]``.
    """

    slide: Slide
    l0_origin: tuple[float, float] = (0.0, 0.0)
    l0_per_px: tuple[float, float] = (1.0, 1.0)
    #: tile encoding: JPEG for slide pixels, lossless PNG for heatmaps (no second JPEG pass
    #: over colour blocks that the page may magnify many times)
    format: str = "jpg"

    def info(self) -> dict[str, Any]:
        levels = []
        for (w, h), (dx, dy) in zip(
            self.slide.level_dimensions, self.slide.level_downsamples, strict=True
        ):
            levels.append(
                {
                    "width": int(w),
                    "height": int(h),
                    "downsample": [dx * self.l0_per_px[0], dy * self.l0_per_px[1]],
                }
            )
        return {
            "origin": list(self.l0_origin),
            "tile": TILE_SIZE,
            "format": self.format,
            "levels": levels,
        }

    def tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        """Tile (tx, ty) of ``level`` as (h, w, 3) uint8 RGB (edge tiles are smaller), or None."""
        if not 0 <= level < self.slide.level_count:
            return None
        w, h = self.slide.level_dimensions[level]
        x0, y0 = tx * TILE_SIZE, ty * TILE_SIZE
        if tx < 0 or ty < 0 or x0 >= w or y0 >= h:
            return None
        dx, dy = self.slide.level_downsamples[level]
        size = (min(TILE_SIZE, w - x0), min(TILE_SIZE, h - y0))
        return self.slide.read_region((round(x0 * dx), round(y0 * dy)), level, size)

    @property
    def memory_bytes(self) -> int:
        """Bytes of decoded pixels this layer holds (0 when tiles are read from disk)."""
        return self.slide.memory_bytes

    def close(self) -> None:
        self.slide.close()


def _image_pyramid(rgb: np.ndarray, path: Path) -> Slide:
    """An in-memory 2x pyramid of a heatmap image, down to about one tile."""
    from .slide import ArraySlide

    n_levels = 1 + max(0, math.ceil(math.log2(max(rgb.shape[:2]) / TILE_SIZE)))
    return ArraySlide(rgb, mpp=None, n_levels=n_levels, level_factor=2, path=path)


def open_heatmap_layer(
    path: Path, l0_size: tuple[int, int], l0_box: tuple[int, int, int, int] | None = None
) -> Layer:
    """The heatmap at ``path`` as a layer over a slide of level-0 size ``l0_size``.

    A TIFF that OpenSlide opens (the pyramidal heatmap) is read tile by tile; any other image
    (the production JPEG/PNG) is decoded once. The image covers ``l0_box`` (the ROI) or the
    whole slide; its scale on level 0 follows from the two sizes.
    """
    from .slide import open_slide

    slide: Slide | None = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            slide = open_slide(path)
        except SlideError:
            slide = None  # a plain (non-tiled) TIFF: decode it below
    if slide is None:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SlideError(path, "heatmap image cannot be decoded", "rerun its heatmap stage")
        slide = _image_pyramid(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), path)
    x1, y1, x2, y2 = l0_box if l0_box is not None else (0, 0, *l0_size)
    width, height = slide.dimensions
    return Layer(
        slide, (float(x1), float(y1)), ((x2 - x1) / width, (y2 - y1) / height), format="png"
    )


# ---------------------------------------------------------------------------------- server


@dataclass
class _Opened:
    slide: Layer
    heatmap: Layer | None
    heatmap_error: str | None

    @property
    def memory_bytes(self) -> int:
        return self.slide.memory_bytes + (self.heatmap.memory_bytes if self.heatmap else 0)


class ViewerServer:
    """The viewer's HTTP server over a fixed list of entries (bind ``port=0`` for any free port).

    :meth:`serve_forever` serves in this thread (the CLI); as a context manager it serves from a
    background thread until the block ends (tests, notebooks).
    """

    def __init__(
        self,
        entries: list[ViewerEntry],
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        title: str = "clam-heat",
        run_hint: str = "clam-heat run CONFIG",
    ) -> None:
        self.entries = {e.slide_id: e for e in entries}
        self.order = [e.slide_id for e in entries]
        self.title = title
        self.run_hint = run_hint
        self._opened: OrderedDict[str, _Opened] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        try:
            self.httpd = ThreadingHTTPServer((host, port), _Handler)
        except OSError as err:
            raise OutputError(
                f"cannot listen on {host}:{port} ({err.strerror or err}); "
                "pass --port 0 for any free port"
            ) from err
        self.httpd.daemon_threads = True
        self.httpd.viewer = self  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{_url_host(host)}:{port}/"

    @property
    def allowed_hosts(self) -> frozenset[str] | None:
        """``Host`` header values accepted (lower case, with the port); None: any, when bound
        to all interfaces (0.0.0.0 / ::), whose names this server cannot know."""
        host, port = self.httpd.server_address[:2]
        if host in ("0.0.0.0", "::"):
            return None
        names = {host}
        if ipaddress.ip_address(host).is_loopback:
            names |= {"localhost", "127.0.0.1", "::1"}
        else:
            names |= {socket.gethostname(), socket.getfqdn()}
        return frozenset(f"{_url_host(n).lower()}:{port}" for n in names)

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> ViewerServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        with self._lock:
            for opened in self._opened.values():
                _close(opened)
            self._opened.clear()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slides ------------------------------------------------------------------------------

    def opened(self, slide_id: str) -> _Opened:
        """The slide's two layers, opened once and kept for the last few slides viewed."""
        with self._lock:
            if slide_id in self._opened:
                self._opened.move_to_end(slide_id)
                return self._opened[slide_id]
        opened = self._open(self.entries[slide_id])
        with self._lock:
            if slide_id in self._opened:  # another request opened it meanwhile
                _close(opened)
                return self._opened[slide_id]
            self._opened[slide_id] = opened
            while len(self._opened) > 1 and (
                len(self._opened) > OPEN_SLIDES
                or sum(o.memory_bytes for o in self._opened.values()) > OPEN_IMAGE_BYTES
            ):
                _close(self._opened.popitem(last=False)[1])
            return opened

    def _open(self, entry: ViewerEntry) -> _Opened:
        from .slide import open_slide

        slide = Layer(open_slide(entry.slide_path))
        if entry.heatmap_path is None:
            return _Opened(
                slide,
                None,
                f"no heatmap yet for {entry.slide_id} (row status: {entry.status}); "
                f"run `{self.run_hint}` to draw {entry.expected_heatmap.name}",
            )
        try:
            heat = open_heatmap_layer(entry.heatmap_path, slide.slide.dimensions, entry.l0_box)
        except ClamHeatError as err:
            return _Opened(slide, None, str(err))
        return _Opened(slide, heat, None)

    def slide_info(self, slide_id: str) -> dict[str, Any]:
        entry = self.entries[slide_id]
        info: dict[str, Any] = {
            "slide_id": slide_id,
            "label": entry.label,
            "status": entry.status,
            "details": entry.details,
            "heatmap_file": entry.heatmap_path.name if entry.heatmap_path else None,
        }
        try:
            opened = self.opened(slide_id)
        except ClamHeatError as err:
            info.update(slide=None, heatmap=None, error=str(err))
            return info
        info.update(
            slide=opened.slide.info(),
            mpp=getattr(opened.slide.slide, "mpp", None),
            heatmap=opened.heatmap.info() if opened.heatmap else None,
            error=opened.heatmap_error,
        )
        return info


def _close(opened: _Opened) -> None:
    opened.slide.close()
    if opened.heatmap is not None:
        opened.heatmap.close()


_TILE_PATH = re.compile(r"^/tiles/([^/]+)/(slide|heatmap)/(\d+)/(\d+)_(\d+)\.(jpg|png)$")


class _Handler(BaseHTTPRequestHandler):
    server_version = "clam-heat-viewer"

    @property
    def viewer(self) -> ViewerServer:
        return self.server.viewer  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("viewer %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = unquote(self.path.split("?", 1)[0])
        if not self._host_ok():
            return
        try:
            if path == "/":
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", _index_page(self.viewer))
            elif path == "/api/slides":
                self._json([self._summary(sid) for sid in self.viewer.order])
            elif path.startswith("/api/slides/"):
                slide_id = self._known(path.removeprefix("/api/slides/"))
                if slide_id is not None:
                    self._json(self.viewer.slide_info(slide_id))
            elif path.startswith("/view/"):
                slide_id = self._known(path.removeprefix("/view/"))
                if slide_id is not None:
                    page = _viewer_page(self.viewer, slide_id)
                    self._send(HTTPStatus.OK, "text/html; charset=utf-8", page)
            elif match := _TILE_PATH.match(path):
                self._tile(*match.groups())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser moved on and dropped the request
        except Exception as err:  # one bad file must not take the server down
            log.exception("viewer request %s failed", path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(err).splitlines()[0])

    def _host_ok(self) -> bool:
        """Refuse a request whose ``Host`` is not an address this server answers to: a page
        on another site that rebinds its DNS name to 127.0.0.1 must not read the slides."""
        host = self.headers.get("Host")
        allowed = self.viewer.allowed_hosts
        if host is None:
            status, why = HTTPStatus.BAD_REQUEST, "no Host header"
        elif allowed is None or host.lower() in allowed:
            return True
        else:
            status, why = HTTPStatus.MISDIRECTED_REQUEST, f"Host {host!r} is not this server"
        log.warning(
            "viewer: refused %s from %s: %s (serving %s)",
            self.path[:200], self.address_string(), why, self.viewer.url,
        )  # fmt: skip
        self._error(status, f"{why}; open {self.viewer.url}")
        return False

    def _known(self, slide_id: str) -> str | None:
        if slide_id in self.viewer.entries:
            return slide_id
        self._error(HTTPStatus.NOT_FOUND, f"no slide {slide_id!r} in this run's process list")
        return None

    def _summary(self, slide_id: str) -> dict[str, Any]:
        entry = self.viewer.entries[slide_id]
        return {
            "slide_id": slide_id,
            "label": entry.label,
            "status": entry.status,
            "heatmap": entry.heatmap_path is not None,
            "details": entry.details,
        }

    def _tile(self, slide_id: str, kind: str, level: str, tx: str, ty: str, ext: str) -> None:
        if self._known(slide_id) is None:
            return
        try:
            opened = self.viewer.opened(slide_id)
        except ClamHeatError as err:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(err))
            return
        layer = opened.slide if kind == "slide" else opened.heatmap
        found = layer is not None and layer.format == ext
        rgb = layer.tile(int(level), int(tx), int(ty)) if found else None
        if rgb is None:
            name = f"{level}/{tx}_{ty}.{ext}"
            self._error(HTTPStatus.NOT_FOUND, f"no {kind} tile {name} for {slide_id}")
            return
        params = (
            [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
            if ext == "jpg"
            else [cv2.IMWRITE_PNG_COMPRESSION, 1]
        )
        ok, data = cv2.imencode(f".{ext}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
            raise RuntimeError(f"{ext} encoding failed")
        ctype = "image/jpeg" if ext == "jpg" else "image/png"
        self._send(HTTPStatus.OK, ctype, data.tobytes(), cache=True)

    def _json(self, value: Any) -> None:
        self._send(HTTPStatus.OK, "application/json", json.dumps(value).encode())

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, "text/plain; charset=utf-8", message.encode())

    def _send(self, status: HTTPStatus, ctype: str, body: bytes | str, cache: bool = False) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------------------------- pages


def _page_template() -> str:
    return resources.files("clam_heat").joinpath("viewer.html").read_text(encoding="utf-8")


def _viewer_page(viewer: ViewerServer, slide_id: str) -> str:
    index = viewer.order.index(slide_id)
    neighbours = {
        "prev": viewer.order[index - 1] if index > 0 else None,
        "next": viewer.order[index + 1] if index + 1 < len(viewer.order) else None,
    }
    config = json.dumps({"slide_id": slide_id, **neighbours}).replace("</", "<\\/")
    return (
        _page_template()
        .replace("{{TITLE}}", html.escape(f"{slide_id} - {viewer.title}"))
        .replace("{{CONFIG}}", config)
    )


def _index_page(viewer: ViewerServer) -> str:
    detail_keys: list[str] = []
    for entry in viewer.entries.values():
        detail_keys += [k for k in entry.details if k not in detail_keys and k != "error"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["slide", "label", "status", *detail_keys])
    rows = []
    for slide_id in viewer.order:
        entry = viewer.entries[slide_id]
        link = f'<a href="/view/{quote(slide_id)}">{html.escape(slide_id)}</a>'
        cells = [link, html.escape(entry.label), html.escape(entry.status)]
        cells += [html.escape(entry.details.get(k, "")) for k in detail_keys]
        error = entry.details.get("error")
        title = f' title="{html.escape(error)}"' if error else ""
        rows.append(f"<tr{title}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(viewer.title)}</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}"
        "</style></head><body>"
        f"<h1>{html.escape(viewer.title)}</h1><p>{len(rows)} slides: click one to open the "
        "slide and its attention heatmap side by side.</p>"
        f"<table id='slides'><tr>{head}</tr>{''.join(rows)}</table></body></html>"
    )


def _url_host(host: str) -> str:
    """``host`` as written in a URL or ``Host`` header (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host
