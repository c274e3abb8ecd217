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

Two more modes: ``clam-heat view --slide SLIDE --heatmap IMAGE`` pairs any slide OpenSlide reads
with any heatmap image (PNG, JPEG, TIFF, our pyramid), placed by size over the whole slide
(:func:`pair_entry`); ``clam-heat view CONFIG_A --compare CONFIG_B`` adds B's heatmap and the
A - B percentile difference as more panes (:func:`compare_entries`). Every page has a colour bar
per colormap shown and an overlay toggle (heatmap over the slide, opacity slider).

Nothing here draws a production heatmap: the viewer shows the files the ``heatmap`` stage wrote
(only the comparison's difference map is computed, from the two runs' blockmaps).
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

from ..errors import ClamHeatError, OutputError
from .tiles_old import Layer, open_heatmap_layer

if TYPE_CHECKING:
    from ..config import HeatmapConfig

__all__ = [
    "ViewerEntry",
    "open_viewer",
    "ViewerServer",
    "compare_entries",
    "pair_entry",
    "viewer_entries",
]

log = logging.getLogger(__name__)

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
    #: compare mode: run B's heatmap, and the two runs' outputs the difference is drawn from
    compare_path: Path | None = None
    outputs: tuple[Any, Any] | None = None


def pair_entry(slide_path: Path, heatmap_path: Path) -> ViewerEntry:
    """One slide and one heatmap image, no run: the image is placed by size over the slide."""
    slide_path, heatmap_path = Path(slide_path), Path(heatmap_path)
    for flag, path in (("--slide", slide_path), ("--heatmap", heatmap_path)):
        if not path.is_file():
            raise OutputError(f"{flag} {path}: no such file; pass the {flag[2:]} file to view")
    return ViewerEntry(
        slide_id=slide_path.stem,
        label="",
        slide_path=slide_path,
        heatmap_path=heatmap_path,
        expected_heatmap=heatmap_path,
        l0_box=None,
        status="pair",
        details={"heatmap": heatmap_path.name},
    )


def compare_entries(
    entries: list[ViewerEntry], cfg_b: HeatmapConfig, config_a: Path, config_b: Path
) -> list[ViewerEntry]:
    """Run A's entries with run B's heatmap and both runs' outputs (for the difference pane);
    slides B has not drawn keep an empty B pane."""
    from dataclasses import replace

    from ..compare import run_outputs

    by_id = {e.slide_id: e for e in viewer_entries(cfg_b)}
    outs_a, outs_b = run_outputs(config_a), run_outputs(config_b)
    return [
        replace(
            e,
            compare_path=by_id[e.slide_id].heatmap_path if e.slide_id in by_id else None,
            outputs=(outs_a[e.slide_id], outs_b[e.slide_id])
            if e.slide_id in outs_a and e.slide_id in outs_b
            else None,
        )
        for e in entries
    ]


#: Run columns shown in a row's details, besides the prediction columns (bag_size, Pred_c, p_c).
_DETAIL_COLUMNS = ("stage", "error")


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def viewer_entries(cfg: HeatmapConfig) -> list[ViewerEntry]:
    """The rows of ``cfg``'s process list (``process == 1``), in list order, for the viewer."""
    from ..process_list import PREDICTION_COLUMN, read_process_list
    from ..rows import build_contexts, production_heatmap_path, pyramid_heatmap_path

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


# ---------------------------------------------------------------------------------- server


@dataclass
class _Opened:
    slide: Layer
    heatmap: Layer | None
    heatmap_error: str | None
    compare: Layer | None = None
    difference: Layer | None = None

    def layers(self) -> list[Layer]:
        return [x for x in (self.slide, self.heatmap, self.compare, self.difference) if x]

    @property
    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes for layer in self.layers())


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
        legends: list[dict[str, Any]] | None = None,
        alpha: float = 0.4,
        compare: bool = False,
    ) -> None:
        self.entries = {e.slide_id: e for e in entries}
        self.order = [e.slide_id for e in entries]
        self.title = title
        self.run_hint = run_hint
        self.legends = legends or []
        self.alpha = alpha
        self.compare = compare
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
        return f"http://{host}:{port}/"

    @property
    def allowed_hosts(self) -> frozenset[str] | None:
        """``Host`` header values accepted (lower case, with the port); None: any, when bound
        to all interfaces (0.0.0.0), whose names this server cannot know (IPv4 server)."""
        host, port = self.httpd.server_address[:2]
        if host == "0.0.0.0":
            return None
        names = {host}
        if ipaddress.ip_address(host).is_loopback:
            names |= {"localhost", "127.0.0.1"}
        else:
            names |= {socket.gethostname(), socket.getfqdn()}
        return frozenset(f"{n.lower()}:{port}" for n in names)

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
        from ..slide import open_slide

        slide = Layer(open_slide(entry.slide_path))
        opened = self._open_heatmap(entry, slide)
        if self.compare:
            opened.compare, opened.difference = self._open_comparison(entry, slide)
        return opened

    def _open_comparison(self, entry: ViewerEntry, slide: Layer) -> tuple[Any, Any]:
        """Run B's heatmap layer and the difference layer (None where B has none)."""
        from ..compare import DIFF_CMAP, compare_slide
        from .tiles_old import difference_layer

        size = slide.slide.dimensions
        try:
            other = open_heatmap_layer(entry.compare_path, size) if entry.compare_path else None
        except ClamHeatError:
            other = None
        diff = None
        if entry.outputs is not None:
            arrays = compare_slide(*entry.outputs)[1]
            if len(arrays["a"]):
                diff = difference_layer(arrays, size, DIFF_CMAP)
        return other, diff

    def _open_heatmap(self, entry: ViewerEntry, slide: Layer) -> _Opened:
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
            "legends": self.legends,
            "alpha": self.alpha,
            "compare_mode": self.compare,
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
            compare=opened.compare.info() if opened.compare else None,
            difference=opened.difference.info() if opened.difference else None,
            error=opened.heatmap_error,
        )
        return info


def _close(opened: _Opened) -> None:
    for layer in opened.layers():
        layer.close()


_TILE_PATH = re.compile(
    r"^/tiles/([^/]+)/(slide|heatmap|compare|difference)/(\d+)/(\d+)_(\d+)\.(jpg|png)$"
)


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
        layer = getattr(opened, kind)
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


def open_viewer(
    config: str | None,
    *,
    slide: str | None,
    heatmap: Path | None,
    cmap: str,
    compare: str | None,
    host: str,
    port: int,
    load: Any,
    save_exp_code: str | None = None,
    sets: list[str] | None = None,
) -> tuple[ViewerServer, str | None, list[ViewerEntry]]:
    """``clam-heat view``'s three modes -> (server, slide id to open first, entries).

    A run (``config``), a pair (``slide`` file + ``heatmap`` image, no config) or two runs
    (``config`` + ``compare``). ``load(name, save_exp_code, sets)`` loads a config as the CLI
    does (overrides included).
    """
    from ..errors import ProcessListError
    from .tiles_old import legend

    if heatmap is not None or config is None:
        if heatmap is None or slide is None or config is not None:
            raise ProcessListError(
                "view: pass a run's CONFIG, or --slide SLIDE_FILE --heatmap IMAGE (not both)"
            )
        entries = [pair_entry(Path(slide), heatmap)]
        server = ViewerServer(
            entries, host=host, port=port, title=heatmap.name, run_hint="clam-heat quick",
            legends=[legend(cmap, "attention", "low", "high")],
        )  # fmt: skip
        return server, entries[0].slide_id, entries
    cfg = load(config, save_exp_code, sets)
    entries = viewer_entries(cfg)
    if slide is not None and slide not in {e.slide_id for e in entries}:
        raise ProcessListError(
            f"--slide {slide!r} is not a row (process == 1) of {cfg.process_list_path}"
        )
    heat = cfg.heatmap_arguments
    legends = [legend(heat.cmap, "attention percentile", "0", "100")]
    if compare is not None:
        from ..compare import DIFF_CMAP
        from ..config import find_config

        entries = compare_entries(entries, load(compare), find_config(config), find_config(compare))
        legends.append(legend(DIFF_CMAP, "A \u2212 B percentile", "-100", "+100"))
    server = ViewerServer(
        entries, host=host, port=port, title=cfg.exp_arguments.save_exp_code,
        run_hint=f"clam-heat run {config}", legends=legends, alpha=heat.alpha,
        compare=compare is not None,
    )  # fmt: skip
    return server, slide, entries


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
