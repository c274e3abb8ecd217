"""The viewer's HTTP server: URLs to :class:`~clam_heat.viewer.app.ViewerApp` calls, nothing
else.

Safety: it listens on 127.0.0.1 unless told otherwise; a request whose ``Host`` is not this
server is refused (DNS rebinding); no part of a URL reaches the filesystem (slide ids and map
numbers are looked up in the run's entries, static files in a fixed table); request lines,
query strings and bodies are bounded; tile numbers are at most 9 digits (else 400); at most
:data:`RENDER_SLOTS` tiles are drawn at once, whatever the number of connections.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ClamHeatError, OutputError
from .app import BadRequest, ViewerApp
from .maps import SCALES, Style
from .pages import STATIC, cohort_page, slide_page
from .review import ReviewError

__all__ = ["MAX_BODY", "RENDER_SLOTS", "ViewerServer"]

log = logging.getLogger(__name__)

#: Largest request body accepted (a review note), bytes.
MAX_BODY = 16 * 1024
#: Longest query string accepted.
MAX_QUERY = 2048
#: Tiles drawn at the same time (the others wait): bounds memory under any load.
RENDER_SLOTS = 8

_NUMBER = re.compile(r"^[0-9]{1,9}$")
_TILE = re.compile(r"^([^_/]+)_([^_/.]+)\.(jpg|png)$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    viewer: ViewerServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that drops a keep-alive connection is not an error worth a traceback."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        log.exception("viewer: request from %s failed", client_address[0])


class ViewerServer:
    """The HTTP server over one :class:`ViewerApp` (bind ``port=0`` for any free port).

    :meth:`serve_forever` serves in this thread (the CLI); as a context manager it serves from
    a background thread until the block ends (tests, notebooks).
    """

    def __init__(self, app: ViewerApp, *, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.app = app
        self.slots = threading.BoundedSemaphore(RENDER_SLOTS)
        self._thread: threading.Thread | None = None
        try:
            self.httpd = _Server((host, port), _Handler)
        except OSError as err:
            raise OutputError(
                f"cannot listen on {host}:{port} ({err.strerror or err}); "
                "pass --port 0 for any free port"
            ) from err
        self.httpd.viewer = self
        self._stats = threading.Thread(target=self._compute_stats, daemon=True)
        self._stats.start()

    def _compute_stats(self) -> None:
        try:
            self.app.compute_stats()
        except Exception:  # noqa: BLE001 - statistics are optional; the page shows blanks
            log.exception("viewer: attention statistics failed")

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def allowed_hosts(self) -> frozenset[str] | None:
        """``Host`` header values accepted (lower case, with the port); None: any, when bound
        to all interfaces (0.0.0.0), whose names this server cannot know."""
        host, port = self.httpd.server_address[:2]
        if host == "0.0.0.0":
            return None
        names = {str(host)}
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
        self.app.close()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _number(text: str) -> int:
    if not _NUMBER.match(text):
        raise BadRequest(f"malformed number {text[:20]!r} (at most 9 digits)")
    return int(text)


def _style(query: dict[str, list[str]], base: Style) -> Style:
    """The live controls of a map tile URL, checked (400 on anything else)."""

    def one(key: str) -> str | None:
        values = query.get(key)
        return values[0] if values else None

    changes: dict[str, Any] = {}
    if (cmap := one("cmap")) is not None:
        changes["cmap"] = cmap
    if (th := one("th")) is not None:
        try:
            changes["threshold"] = float(th)
        except ValueError:
            raise BadRequest(f"th={th[:20]!r}: a number in [0, 1]") from None
    for key, name in (("blur", "blur"), ("bin", "binarize"), ("seg", "segment")):
        if (flag := one(key)) is not None:
            if flag not in ("0", "1"):
                raise BadRequest(f"{key}={flag[:20]!r}: 0 or 1")
            changes[name] = flag == "1"
    if (scale := one("scale")) is not None:
        if scale not in SCALES:
            raise BadRequest(f"scale={scale[:20]!r}: one of {', '.join(SCALES)}")
        changes["scale"] = scale
    from dataclasses import replace

    try:
        return replace(base, **changes).checked()
    except OutputError as err:
        raise BadRequest(str(err)) from None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    #: an idle keep-alive connection is closed after this many seconds (bounds threads)
    timeout = 30

    @property
    def viewer(self) -> ViewerServer:
        return self.server.viewer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("viewer: " + format, *args)

    # -- routing -------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._answer(self._post)

    def _answer(self, route: Any) -> None:
        if not self._host_ok():
            return
        parts = urlsplit(self.path)
        if len(parts.query) > MAX_QUERY:
            self._error(HTTPStatus.REQUEST_URI_TOO_LONG, "query string too long")
            return
        try:
            route(parts.path, parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser moved on and dropped the request
        except BadRequest as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
        except ReviewError as err:
            status = HTTPStatus.NOT_FOUND if "no slide" in str(err) else HTTPStatus.BAD_REQUEST
            self._error(status, str(err))
        except KeyError as err:
            self._error(HTTPStatus.NOT_FOUND, str(err.args[0]) if err.args else "not found")
        except ClamHeatError as err:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(err).splitlines()[0])
        except Exception as err:  # one bad file must not take the server down
            log.exception("viewer request %s failed", self.path[:200])
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(err).splitlines()[0][:300])

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        app = self.viewer.app
        seg = path.split("/")[1:]
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", cohort_page(app.title))
        elif seg[0] == "view" and len(seg) == 2:
            sid = unquote(seg[1])
            app.entry(sid)
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", slide_page(app.title, sid))
        elif seg[0] == "static" and "/".join(seg[1:]) in STATIC:
            ctype, data = STATIC["/".join(seg[1:])]
            self._send(HTTPStatus.OK, ctype, data(), cache=True)
        elif seg[0] == "api" and len(seg) >= 2:
            self._api(seg[1:], query)
        elif seg[0] == "tiles" and len(seg) in (5, 6):
            self._tile(seg[1:], query)
        elif seg[0] == "patch" and len(seg) == 4:
            sid, no = unquote(seg[1]), _number(seg[2])
            x, y = self._pair(seg[3], "jpg")
            data = app.patch_image(sid, no, x, y)
            self._image(data, "jpg", f"no patch of {sid!r} at ({x}, {y})")
        elif seg[0] == "thumb" and len(seg) == 2 and seg[1].endswith(".jpg"):
            self._send(HTTPStatus.OK, "image/jpeg", app.thumbnail(unquote(seg[1][:-4])))
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path[:200]}")

    def _api(self, seg: list[str], query: dict[str, list[str]]) -> None:
        app = self.viewer.app
        q = {k: v[0] for k, v in query.items()}
        if seg == ["cohort"]:
            self._json(app.cohort())
        elif seg[0] == "slide" and len(seg) == 2:
            self._json(app.slide_info(unquote(seg[1])))
        elif seg == ["legend"]:
            sid = q.get("slide")
            no = _number(q.get("map", "0"))
            self._json(app.legend(q.get("cmap", "jet"), q.get("scale", "percentile"), sid, no))
        elif seg[0] == "patch" and len(seg) == 2:
            try:
                x, y = float(q.get("x", "")), float(q.get("y", ""))
            except ValueError:
                raise BadRequest("patch: x and y must be numbers") from None
            found = app.patch_info(
                unquote(seg[1]), _number(q.get("map", "0")), q.get("scale", "percentile"), x, y
            )
            self._json(found)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such call: /api/{'/'.join(seg)[:100]}")

    def _post(self, path: str, query: dict[str, list[str]]) -> None:
        seg = path.split("/")[1:]
        if not (len(seg) == 3 and seg[:2] == ["api", "review"]):
            self._error(HTTPStatus.NOT_FOUND, f"no such call: {path[:200]}")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        self._json(self.viewer.app.save_review(unquote(seg[2]), body))

    def _pair(self, name: str, ext: str) -> tuple[int, int]:
        match = _TILE.match(name)
        if match is None or match.group(3) != ext:
            raise BadRequest(f"malformed tile name {name[:40]!r} (want X_Y.{ext})")
        return _number(match.group(1)), _number(match.group(2))

    def _tile(self, seg: list[str], query: dict[str, list[str]]) -> None:
        app = self.viewer.app
        sid, kind = unquote(seg[0]), seg[1]
        app.entry(sid)
        with self.viewer.slots:
            if kind == "slide" and len(seg) == 4:
                level, (tx, ty) = _number(seg[2]), self._pair(seg[3], "jpg")
                data, ext = app.slide_tile(sid, level, tx, ty), "jpg"
            elif kind == "image" and len(seg) == 4:
                level, (tx, ty) = _number(seg[2]), self._pair(seg[3], "png")
                data, ext = app.image_tile(sid, level, tx, ty), "png"
            elif kind == "map" and len(seg) == 5:
                no, level = _number(seg[2]), _number(seg[3])
                tx, ty = self._pair(seg[4], "png")
                style = _style(query, app.base_style)
                data, ext = app.map_tile(sid, no, style, level, tx, ty), "png"
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such tile kind {kind[:20]!r}")
                return
        self._image(data, ext, f"no {kind} tile {'/'.join(seg[2:])[:60]} for {sid!r}")

    # -- answers -------------------------------------------------------------------------

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
            status, why = HTTPStatus.MISDIRECTED_REQUEST, f"Host {host[:100]!r} is not this server"
        log.warning(
            "viewer: refused %s from %s: %s (serving %s)",
            self.path[:200],
            self.address_string(),
            why,
            self.viewer.url,
        )
        self._error(status, f"{why}; open {self.viewer.url}")
        return False

    def _image(self, data: bytes | None, ext: str, missing: str) -> None:
        if data is None:
            self._error(HTTPStatus.NOT_FOUND, missing)
        else:
            self._send(HTTPStatus.OK, "image/jpeg" if ext == "jpg" else "image/png", data, True)

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
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)
