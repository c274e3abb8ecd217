"""The live viewer: entries and maps, tile server, safety, review notes, concurrency, CLI, and
the page in a real headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import h5py
import numpy as np
import pytest

from clam_heat.config import load_config
from clam_heat.errors import OutputError
from clam_heat.heatmap.region import RegionView, ScoreIndex, patch_paint
from clam_heat.runner import run_pipeline
from clam_heat.slide import ArraySlide, open_slide
from clam_heat.viewer import ViewerApp, ViewerServer, pair_entry, run_app, viewer_entries
from clam_heat.viewer.review import ReviewNotes, review_path
from clam_heat.viewer.tiles import OpenSlides

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def viewed_run(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """A finished demo run (config path) whose demo_000 blockmap has two planted scores: the
    lowest of all at patch LOW and a distinctive highest (123.456) at patch HIGH."""
    folder = tmp_path_factory.mktemp("viewer") / "demo"
    shutil.copytree(demo_source, folder)
    config = folder / "config.yaml"
    assert run_pipeline(load_config(config)).ok
    entry = viewer_entries(load_config(config))[0]
    with h5py.File(entry.maps[0].path, "r+") as h5:
        scores = h5["attention_scores"][:].reshape(-1)
        low, high = _planted(entry)
        scores[low] = scores.min() - 5.0
        scores[high] = 123.456
        h5["attention_scores"][...] = scores.reshape(h5["attention_scores"].shape)
    return config


def _planted(entry: Any) -> tuple[int, int]:
    """Two patches of demo_000 whose whole square is tissue (so a painted patch is visible)."""
    with h5py.File(entry.maps[0].path, "r") as h5:
        coords = h5["coords"][:]
        size = int(h5["coords"].attrs["patch_size_level0"])
    from clam_heat.tissue import load_geojson

    index = ScoreIndex(coords, np.arange(len(coords), dtype=float), size)
    view = RegionView(
        index,
        patch_paint(np.ones(len(coords)), 0.0),
        (1.0, 1.0),
        (4096, 3072),
        tissue=load_geojson(entry.tissue),
    )
    inside = [
        k for k, (x, y) in enumerate(coords) if view.rgba((x, y, x + size, y + size))[..., 3].all()
    ]
    return inside[0], inside[len(inside) // 2]


def _get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, data=data, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _raw_get(port: int, host: str | None, path: str = "/") -> tuple[int, bytes]:
    """A GET with exactly this Host header (or none) and path, no client-side normalising."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host else "")
        sock.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    code = cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(img, code)


def _app(config: Path, **changes: Any) -> ViewerApp:
    cfg = load_config(config)
    return run_app(cfg, viewer_entries(cfg), str(config), **changes)


# ------------------------------------------------------------------------ entries, tiles


def test_maps_are_discovered_by_file_pattern(viewed_run: Path) -> None:
    cfg = load_config(viewed_run)
    first = viewer_entries(cfg)[0]
    raw = first.maps[0].path.parent
    shutil.copy(first.maps[0].path, raw / "demo_000_ig_blockmap.h5")
    shutil.copy(first.maps[0].path, raw / "demo_000_class_tumour_blockmap.h5")
    try:
        entry = viewer_entries(cfg)[0]
        assert [m.name for m in entry.maps] == ["attention", "class tumour", "ig"]
        assert entry.tissue is not None and entry.tissue.is_file()
    finally:
        (raw / "demo_000_ig_blockmap.h5").unlink()
        (raw / "demo_000_class_tumour_blockmap.h5").unlink()


def test_slide_and_map_tiles_are_the_slides_pixels_and_the_renderers(viewed_run: Path) -> None:
    app = _app(viewed_run)
    with ViewerServer(app, port=0) as server:
        # top level (12 for a 4096 px slide) is level 0: tile (1, 2) is pixels 256.. / 512..
        status, data = _get(server.url + "tiles/demo_000/slide/12/1_2.jpg")
        assert status == 200
        entry = app.entries["demo_000"]
        with open_slide(entry.slide_path) as slide:
            want = slide.read_region((256, 512), 0, (256, 256))
        assert np.abs(_decode(data).astype(int) - want).mean() < 3  # JPEG
        url = server.url + "tiles/demo_000/map/0/8/0_0.png?cmap=viridis&th=0.2"
        status, data = _get(url)
        assert status == 200
        got = _decode(data)
        # level 8 of 12: downsample 16, the slide is 256 x 192 there
        assert got.shape == (192, 256, 4)
        index = app.index("demo_000", 0)
        from clam_heat.tissue import load_geojson

        view = RegionView(
            index,
            patch_paint(index.percentiles / 100, 0.2),
            (16.0, 16.0),
            (256, 192),
            cmap="viridis",
            tissue=load_geojson(entry.tissue),
        )
        assert (got == view.rgba((0, 0, 256, 192))).all()
        assert got[..., 3].any() and not got[..., 3].all()  # tissue painted, background clear


def test_bad_requests_get_4xx_and_one_bad_slide_fails_alone(
    viewed_run: Path, tmp_path: Path
) -> None:
    cfg = load_config(viewed_run)
    entries = viewer_entries(cfg)
    entries[2] = replace(entries[2], slide_path=tmp_path / "x.svs")
    app = run_app(cfg, entries, str(viewed_run))
    with ViewerServer(app, port=0) as server:
        u = server.url
        status, body = _get(u + "api/slide/nope")
        assert (status, body.decode()) == (404, "no slide 'nope' in this run's process list")
        assert _get(u + "tiles/demo_000/slide/13/0_0.jpg")[0] == 404
        assert _get(u + "tiles/demo_000/slide/12/99_0.jpg")[0] == 404
        assert _get(u + "tiles/demo_000/other/0/0_0.jpg")[0] == 404
        assert _get(u + "tiles/demo_000/map/7/8/0_0.png")[0] == 404
        status, body = _get(u + "tiles/demo_000/slide/12/" + "9" * 5000 + "_0.jpg")
        assert status == 400 and body.decode().startswith("malformed number")
        assert _get(u + "tiles/demo_000/slide/x/0_0.jpg")[0] == 400
        for query in ("cmap=nope", "th=2", "th=abc", "blur=yes", "scale=log"):
            status, body = _get(u + f"tiles/demo_000/map/0/8/0_0.png?{query}")
            assert status == 400 and b"\n" not in body, query
        info = json.loads(_get(u + "api/slide/demo_002")[1])
        assert info["width"] is None and str(tmp_path / "x.svs") in info["error"]
        assert "\n" not in info["error"]
        assert _get(u + "tiles/demo_002/slide/0/0_0.jpg")[0] == 500
        assert _get(u + "tiles/demo_000/slide/0/0_0.jpg")[0] == 200  # still serving


def test_rows_without_scores_say_what_to_run(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    cfg.process_list_path.unlink()  # the demo ships its list; a real project may not have one
    with pytest.raises(OutputError, match="no process list yet; run `clam-heat run CONFIG`"):
        viewer_entries(cfg)
    assert run_pipeline(cfg, stages=("segment",)).ok
    entries = viewer_entries(cfg)
    assert all(not e.maps for e in entries)
    app = run_app(cfg, entries, "demo.yaml")
    with ViewerServer(app, port=0) as server:
        info = json.loads(_get(server.url + "api/slide/demo_000")[1])
        assert info["width"] == 4096 and info["maps"] == []
        assert info["error"].startswith("no scores yet for demo_000 (row status: ")
        assert info["error"].endswith("run `clam-heat run demo.yaml` first")


def test_busy_port_is_one_clear_error(viewed_run: Path) -> None:
    with ViewerServer(_app(viewed_run), port=0) as first:
        port = int(first.url.rsplit(":", 1)[1].strip("/"))
        with pytest.raises(OutputError, match=rf"cannot listen on 127.0.0.1:{port} .*--port 0"):
            ViewerServer(_app(viewed_run), port=port)


def test_cohort_lists_every_row_with_prediction_and_statistics(
    viewed_run: Path, tmp_path: Path
) -> None:
    cfg = load_config(viewed_run)
    app = _app(viewed_run)
    app.compute_stats()
    rows = {r["id"]: r for r in app.cohort()["rows"]}
    assert list(rows) == [f"demo_{k:03d}" for k in range(5)]
    entry = app.entries["demo_001"]
    row = rows["demo_001"]
    assert row["pred"] == entry.details["Pred_0"] and row["prob"] == float(entry.details["p_0"])
    assert row["correct"] is (entry.details["Pred_0"] == entry.label)
    # top-10 % share from an independent softmax of the blockmap
    with h5py.File(entry.maps[0].path, "r") as h5:
        s = h5["attention_scores"][:].reshape(-1).astype(float)
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    assert row["top10"] == pytest.approx(np.sort(w)[::-1][: -(-len(w) // 10)].sum())
    # thumbnails are cached under the run's output root, never in the source tree
    from clam_heat.rows import output_roots

    assert app.cache_dir == output_roots(cfg)[1] / ".viewer"
    app.cache_dir = tmp_path / "cache"  # this test's own cache (other tests share the run)
    first = app.thumbnail("demo_001")
    cached = list((app.cache_dir / "thumbs").glob("*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    assert app.thumbnail("demo_001") == first


def test_cli_serves_until_stopped_and_checks_the_slide(viewed_run: Path) -> None:
    cli = [str(Path(sys.executable).with_name("clam-heat"))]  # the installed console script
    bad = subprocess.run(
        [*cli, "view", str(viewed_run), "--slide", "demo_999", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: --slide 'demo_999' is not a row (process == 1)")
    proc = subprocess.Popen(
        [*cli, "view", str(viewed_run), "--slide", "demo_001", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.match(
            r"viewer: (http://127\.0\.0\.1:\d+/)view/demo_001 \(5 slides, 5 with", line
        )
        assert match, line
        status, page = _get(match.group(1) + "view/demo_001")
        assert status == 200 and b'"slide_id": "demo_001"' in page
        info = json.loads(_get(match.group(1) + "api/slide/demo_001")[1])
        assert (info["prev"], info["next"]) == ("demo_000", "demo_002")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_view_and_render_never_import_torch(viewed_run: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from clam_heat.cli import app\n"
        "from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(app, ['render', {str(viewed_run)!r}, '--slide', 'demo_000',"
        f" '--out', {str(tmp_path / 'a.png')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "from clam_heat.config import load_config\n"
        "from clam_heat.viewer import run_app, viewer_entries\n"
        f"cfg = load_config({str(viewed_run)!r})\n"
        "app = run_app(cfg, viewer_entries(cfg), 'c')\n"
        "app.compute_stats(); app.cohort(); app.slide_info('demo_000'); app.thumbnail('demo_000')\n"
        "from clam_heat.viewer.maps import Style\n"
        "assert app.map_tile('demo_000', 0, Style(blur=True), 10, 0, 0)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_slide_ids_with_spaces_and_hashes_are_quoted(viewed_run: Path) -> None:
    cfg = load_config(viewed_run)
    odd = "case 1#A%2"
    entries = [replace(viewer_entries(cfg)[0], slide_id=odd)]
    with ViewerServer(run_app(cfg, entries, "c"), port=0) as server:
        status, body = _get(server.url + "view/" + quote(odd))
        assert status == 200 and json.dumps(odd) in body.decode()
        info = json.loads(_get(server.url + "api/slide/" + quote(odd))[1])
        assert info["slide_id"] == odd and info["error"] is None
        assert _get(server.url + f"tiles/{quote(odd)}/slide/0/0_0.jpg")[0] == 200


# ------------------------------------------------------------------------------ safety


def test_foreign_host_and_path_traversal_are_refused(viewed_run: Path) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not read the run's slides; no
    URL path reaches the filesystem."""
    with ViewerServer(_app(viewed_run), port=0) as server:
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
            assert _raw_get(port, good)[0] == 200, good
        status, body = _raw_get(port, f"evil.example:{port}", "/api/slide/demo_000")
        assert status == 421 and b"tumour" not in body
        assert body.decode() == f"Host 'evil.example:{port}' is not this server; open {server.url}"
        assert _raw_get(port, f"127.0.0.1:{port + 1}")[0] == 421  # another port
        assert _raw_get(port, None)[0] == 400
        host = f"127.0.0.1:{port}"
        secret = viewed_run.read_bytes()
        for path in (
            "/static/../app.py",
            "/static/..%2fapp.py",
            "/static/%2e%2e/%2e%2e/config.yaml",
            "/static//etc/passwd",
            "/thumb/..%2f..%2fconfig.yaml.jpg",
            "/view/..%2f..%2fconfig.yaml",
            "/tiles/..%2fdemo_000/slide/12/0_0.jpg",
            "/../../../../etc/passwd",
        ):
            status, body = _raw_get(port, host, path)
            assert status == 404 and secret not in body and b"root:" not in body, path
        status, body = _raw_get(port, host, "/static/openseadragon/LICENSE.txt")
        assert status == 200 and b"Redistribution and use" in body


# ------------------------------------------------------------------------------ review notes


def test_review_notes_save_atomically_and_refuse_bad_requests(viewed_run: Path) -> None:
    app = _app(viewed_run)
    path = app.notes.path
    assert path == review_path(load_config(viewed_run).results_csv_path, Path("x/demo.csv"))
    with ViewerServer(app, port=0) as server:
        u = server.url + "api/review/"
        status, body = _get(u + "demo_001", json.dumps({"verdict": "agree", "note": "ok"}).encode())
        assert status == 200 and json.loads(body)["verdict"] == "agree"
        before = path.read_bytes()
        for sid, payload in [
            ("nope", {"verdict": "agree", "note": ""}),
            ("demo_001", {"verdict": "maybe", "note": ""}),
            ("demo_001", {"verdict": "agree", "note": "x" * 5000}),
            ("demo_001", {"verdict": 3}),
        ]:
            status, _ = _get(u + quote(sid), json.dumps(payload).encode())
            assert 400 <= status < 500, (sid, payload)
        assert _get(u + "demo_001", b"not json")[0] == 400
        assert _get(u + "demo_001", b"{" * (20 * 1024))[0] == 413
        assert path.read_bytes() == before
    lines = path.read_text().splitlines()
    assert lines[0] == "slide_id,verdict,note,updated_at" and lines[1].startswith(
        "demo_001,agree,ok,"
    )


def test_two_writers_saving_at_once_lose_no_note(tmp_path: Path) -> None:
    ids = {f"s{k}" for k in range(40)}
    path = tmp_path / "results" / "list_review.csv"
    # two independent note objects (two tabs / two servers) on one file
    a, b = ReviewNotes(path, ids), ReviewNotes(path, ids)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: (a if k % 2 else b).save(f"s{k}", "unsure", f"n{k}"), range(40)))
    notes = ReviewNotes(path, ids).read()
    assert {sid: n["note"] for sid, n in notes.items()} == {f"s{k}": f"n{k}" for k in range(40)}


# ------------------------------------------------------------------------------ concurrency


class _Tracked(ArraySlide):
    """An in-memory slide that records being closed, and being closed during a read (the
    OpenSlide abort seen under concurrent use)."""

    closed_while_held: list[str] = []
    closed: list[str] = []

    def __init__(self, name: str) -> None:
        super().__init__(np.zeros((64, 64, 3), np.uint8), mpp=None, n_levels=1, path=Path(name))
        self.readers = 0
        self.tag = name

    def read_region(self, l0_xy: Any, level: int, size: Any) -> np.ndarray:
        self.readers += 1
        time.sleep(0.002)
        self.readers -= 1
        return super().read_region(l0_xy, level, size)

    def close(self) -> None:
        _Tracked.closed.append(self.tag)
        if self.readers:
            _Tracked.closed_while_held.append(self.tag)
        super().close()


def test_an_evicted_slide_is_closed_only_after_its_last_reader() -> None:
    slides = OpenSlides(limit=2)
    opened: dict[str, _Tracked] = {}

    def opener(path: Path) -> _Tracked:
        opened[str(path)] = _Tracked(str(path))
        return opened[str(path)]

    _Tracked.closed.clear()
    with slides.hold("a", Path("a"), opener) as a:
        for other in ("b", "c", "d"):  # evicts a while held
            with slides.hold(other, Path(other), opener):
                pass
        assert "a" not in slides.held and "a" not in _Tracked.closed
        a.read_region((0, 0), 0, (8, 8))  # still readable
    assert "a" in _Tracked.closed  # closed by its last holder
    _Tracked.closed_while_held.clear()

    def read(k: int) -> None:
        name = f"s{k % 20}"
        with slides.hold(name, Path(name), opener) as s:
            s.read_region((0, 0), 0, (8, 8))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(read, range(400)))
    assert _Tracked.closed_while_held == []


def test_server_survives_200_concurrent_requests_across_20_slides(viewed_run: Path) -> None:
    cfg = load_config(viewed_run)
    base = viewer_entries(cfg)
    entries = [replace(base[k % 5], slide_id=f"s{k:02d}") for k in range(20)]
    with ViewerServer(run_app(cfg, entries, "c"), port=0) as server:
        urls = [
            server.url + f"tiles/s{k % 20:02d}/slide/{10 + k % 3}/{k % 2}_0.jpg"
            if k % 2
            else server.url + f"tiles/s{k % 20:02d}/map/0/{9 + k % 3}/0_{k % 2}.png?th=0.{k % 9}"
            for k in range(200)
        ]
        start = threading.Barrier(50)

        def fetch(url: str) -> int:
            with contextlib.suppress(threading.BrokenBarrierError):
                start.wait(timeout=10)
            return _get(url)[0]

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(fetch, urls))
        assert statuses == [200] * 200
        assert len(server.app.slides.held) <= 8
        assert _get(server.url + "api/cohort")[0] == 200  # still up


# ------------------------------------------------------------------------------ pair mode


def test_pair_mode_reads_the_colormap_from_the_image(viewed_run: Path, tmp_path: Path) -> None:
    from clam_heat.rows import production_heatmap_path

    app = _app(viewed_run)
    slide_path = app.entries["demo_001"].slide_path
    cfg = load_config(viewed_run)
    from clam_heat.process_list import read_process_list
    from clam_heat.rows import build_contexts

    ctx = build_contexts(cfg, read_process_list(cfg.process_list_path))[1]
    image = production_heatmap_path(ctx)  # written by the run, carrying its colormap
    entry = pair_entry(slide_path, image)
    assert entry.image_meta["cmap"] == cfg.heatmap_arguments.cmap
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), np.zeros((12, 16, 3), np.uint8))
    assert pair_entry(slide_path, plain).image_meta["cmap"] == "jet"
    assert pair_entry(slide_path, plain, "plasma").image_meta["cmap"] == "plasma"
    with pytest.raises(OutputError, match=r"--heatmap .*nope.png: no such file"):
        pair_entry(slide_path, tmp_path / "nope.png")
    cli = [str(Path(sys.executable).with_name("clam-heat"))]
    proc = subprocess.Popen(
        [*cli, "view", "--slide", str(slide_path), "--heatmap", str(image), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.match(
            r"viewer: (http://127\.0\.0\.1:\d+/)view/demo_001 \(1 slides, 1 with", line
        )
        assert match, line
        info = json.loads(_get(match.group(1) + "api/slide/demo_001")[1])
        assert info["error"] is None and info["image"]["cmap"] == cfg.heatmap_arguments.cmap
        assert _get(match.group(1) + "tiles/demo_001/image/0/0_0.png")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ real browser


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no headless Chromium binary (looked for " + ", ".join(BROWSERS) + "); install it with "
        "`apt-get install -y chromium-headless-shell` to run the browser tests"
    )


class _DevTools:
    """The few Chrome DevTools Protocol calls the browser tests need, over one page socket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(0.3)
        self.wait_idle()

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate("!!(window.clamHeat && window.clamHeat.idle())"):
                return
            time.sleep(0.1)
        raise AssertionError(f"page not idle: {self.evaluate('document.body.innerText')}")

    def settle(self) -> None:
        """Let the page start the requests an action caused, then wait for them."""
        time.sleep(0.5)
        self.wait_idle()

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), 1), cv2.COLOR_BGR2RGB)

    def rect(self, selector: str) -> tuple[int, int, int, int]:
        r = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()"
        )
        return tuple(round(v) for v in r)  # type: ignore[return-value]

    def crop(self, image: np.ndarray, selector: str) -> np.ndarray:
        x, y, w, h = self.rect(selector)
        return image[y : y + h, x : x + w]

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def select(self, selector: str, value: str) -> None:
        self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            f"e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change')); }})()"
        )


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[_DevTools]:
    proc = subprocess.Popen(
        [
            _browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--window-size=1200,700",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'profile'}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its renderer and GPU processes share this process group
    )
    try:
        port = None
        for line in proc.stderr:
            if match := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = match.group(1)
                break
        assert port, "Chromium did not start its DevTools server"
        pages = json.loads(_get(f"http://127.0.0.1:{port}/json/list")[1])
        page = next(p for p in pages if p["type"] == "page")
        tools = _DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        yield tools
        tools.ws.close()
    finally:
        # kill the whole group: killing only the browser leaves its renderer and GPU processes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _views(browser: _DevTools) -> list[dict[str, float]]:
    return browser.evaluate(
        "clamHeat.viewers.map(v => { const c = v.viewport.getCenter(true);"
        " return {x: c.x, y: c.y, zoom: v.viewport.getZoom(true)}; })"
    )


def _synced(browser: _DevTools) -> None:
    a, b = _views(browser)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_browser_panes_stay_synced_under_pan_and_zoom(viewed_run: Path, browser: _DevTools) -> None:
    with ViewerServer(_app(viewed_run), port=0) as server:
        browser.open(server.url + "view/demo_000")
        _synced(browser)
        start = browser.evaluate("clamHeat.view()")
        x, y, w, h = browser.rect("#pane-slide")
        cx, cy = x + w / 2, y + h / 2
        for _ in range(4):  # zoom the slide pane in (1.2x a wheel step)
            browser.mouse("mouseWheel", cx, cy, deltaX=0, deltaY=-120)
            time.sleep(0.1)
        browser.mouse("mousePressed", cx, cy, button="left", clickCount=1)  # drag it
        for step in range(1, 11):
            browser.mouse("mouseMoved", cx - 12 * step, cy - 7 * step, button="left")
        browser.mouse("mouseReleased", cx - 120, cy - 70, button="left", clickCount=1)
        browser.settle()
        moved = browser.evaluate("clamHeat.view()")
        assert moved["ds"] < start["ds"] / 1.5 and moved["x"] != pytest.approx(start["x"])
        _synced(browser)
        browser.evaluate("clamHeat.setView(2000, 1500, 2, 1)")  # and the other way round
        browser.settle()
        _synced(browser)
        # the cursor over one pane is a cross at the same level-0 point in the other
        sx, sy = browser.evaluate("clamHeat.toScreen(2100, 1450, 0)")
        browser.mouse("mouseMoved", sx, sy)
        want = browser.evaluate("clamHeat.toScreen(2100, 1450, 1)")
        got = browser.evaluate(
            "(() => { const c = document.querySelector('#pane-map .cross');"
            " const r = c.getBoundingClientRect(); return c.hidden ? null :"
            " [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        assert got == pytest.approx(want, abs=1.5)


def test_browser_colormap_switch_changes_pixels_and_colour_bar(
    viewed_run: Path, browser: _DevTools
) -> None:
    with ViewerServer(_app(viewed_run), port=0) as server:
        browser.open(server.url + "view/demo_000")
        browser.evaluate("clamHeat.setView(2048, 1536, 8, 1)")
        browser.settle()
        before = browser.screenshot()
        browser.select("#cmap", "viridis")
        browser.settle()
        after = browser.screenshot()
        diff = np.abs(after.astype(int) - before.astype(int)).sum(axis=2) > 30
        redrawn = browser.crop(diff, "#pane-map").mean()
        assert redrawn > 0.02  # the map is redrawn
        assert browser.crop(diff, "#pane-slide").mean() < redrawn / 5  # the slide is not
        assert browser.evaluate("document.querySelector('#legend-bar').dataset.cmap") == "viridis"
        bar = browser.crop(after, "#legend-bar")
        mid = bar[bar.shape[0] // 2]
        # the bar's ends are viridis' own colours (dark purple -> yellow), not jet's
        from clam_heat.heatmap import apply_colormap

        want = apply_colormap(np.array([0.0, 1.0]), "viridis").astype(int)
        assert np.abs(mid[2].astype(int) - want[0]).max() <= 12
        assert np.abs(mid[-3].astype(int) - want[1]).max() <= 12


def _patch(config: Path, which: int) -> tuple[int, int, int]:
    entry = viewer_entries(load_config(config))[0]
    with h5py.File(entry.maps[0].path, "r") as h5:
        x, y = (int(v) for v in h5["coords"][_planted(entry)[which]])
        return x, y, int(h5["coords"].attrs["patch_size_level0"])


def test_browser_threshold_hides_the_planted_low_patch(
    viewed_run: Path, browser: _DevTools
) -> None:
    x, y, size = _patch(viewed_run, 0)
    with ViewerServer(_app(viewed_run), port=0) as server:
        browser.open(server.url + "view/demo_000")
        browser.evaluate(f"clamHeat.setView({x + size / 2}, {y + size / 2}, 1, 1)")
        browser.settle()

        def centre(shot: np.ndarray, pane: str) -> np.ndarray:
            px, py, pw, ph = browser.rect(pane)
            return shot[
                py + ph // 2 - 20 : py + ph // 2 + 20, px + pw // 2 - 20 : px + pw // 2 + 20
            ]

        shot = browser.screenshot()
        shown = np.abs(centre(shot, "#pane-map").astype(int) - centre(shot, "#pane-slide")).mean()
        assert shown > 10  # the low patch is painted (jet's dark blue over the tissue)
        browser.evaluate(
            "(() => { const t = document.querySelector('#threshold'); t.value = 0.5;"
            " t.dispatchEvent(new Event('change')); })()"
        )
        browser.settle()
        shot = browser.screenshot()
        hidden = np.abs(centre(shot, "#pane-map").astype(int) - centre(shot, "#pane-slide")).mean()
        assert hidden < 2  # below the threshold: the slide shows through untouched
        assert "below 0.5 hidden" in browser.evaluate("document.querySelector('#legend').innerText")


def test_browser_hover_shows_the_planted_score_and_click_opens_the_patch(
    viewed_run: Path, browser: _DevTools
) -> None:
    x, y, size = _patch(viewed_run, 1)
    with ViewerServer(_app(viewed_run), port=0) as server:
        browser.open(server.url + "view/demo_000")
        browser.evaluate(f"clamHeat.setView({x + size / 2}, {y + size / 2}, 2, 1)")
        browser.settle()
        sx, sy = browser.evaluate(f"clamHeat.toScreen({x + size / 2}, {y + size / 2}, 1)")
        browser.mouse("mouseMoved", sx, sy)
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline and "123.5" not in text:
            time.sleep(0.2)
            text = browser.evaluate("document.querySelector('#hover').textContent")
        assert "score 123.5" in text and "rank 1 of" in text and f"({x}, {y})" in text
        browser.mouse("mousePressed", sx, sy, button="left", clickCount=1)
        browser.mouse("mouseReleased", sx, sy, button="left", clickCount=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not browser.evaluate(
            "!!(document.querySelector('#patch-image') && "
            "document.querySelector('#patch-image').naturalWidth)"
        ):
            time.sleep(0.2)
        assert browser.evaluate("document.querySelector('#patch-image').naturalWidth") == size
        href = browser.evaluate("document.querySelector('#patch-save').getAttribute('href')")
        status, data = _get(server.url.rstrip("/") + href)
        with open_slide(viewer_entries(load_config(viewed_run))[0].slide_path) as slide:
            want = slide.read_region((x, y), 0, (size, size))
        assert status == 200 and np.abs(_decode(data).astype(int) - want).mean() < 3


def test_browser_cohort_page_sorts_and_filters(viewed_run: Path, browser: _DevTools) -> None:
    cfg = load_config(viewed_run)
    entries = viewer_entries(cfg)
    wrong = replace(entries[3], details={**entries[3].details, "Pred_0": "other", "p_0": "0.51"})
    entries[3] = wrong
    entries[1] = replace(
        entries[1], status="failed", details={**entries[1].details, "error": "boom"}
    )
    with ViewerServer(run_app(cfg, entries, "c"), port=0) as server:
        browser.open(server.url)

        def ids() -> list[str]:
            return browser.evaluate(
                "[...document.querySelectorAll('#rows tbody tr')].map(r => r.dataset.id)"
            )

        assert ids() == [e.slide_id for e in entries]
        browser.evaluate("document.querySelector('th[data-key=prob]').click()")
        probs = {e.slide_id: float(e.details["p_0"]) for e in entries}
        assert ids() == sorted(probs, key=probs.get)
        browser.evaluate("document.querySelector('th[data-key=prob]').click()")
        assert ids() == sorted(probs, key=probs.get, reverse=True)
        browser.evaluate("document.querySelector('#f-wrong').click()")
        assert ids() == [wrong.slide_id]
        browser.evaluate("document.querySelector('#f-wrong').click()")
        browser.evaluate("document.querySelector('#f-failed').click()")
        assert ids() == ["demo_001"]
        browser.evaluate("document.querySelector('#f-failed').click()")
        browser.select("#f-label", "normal")
        assert set(ids()) == {e.slide_id for e in entries if e.label == "normal"}
        browser.select("#f-label", "")
        browser.evaluate(
            "(() => { const s = document.querySelector('#f-text'); s.value = 'demo_004';"
            " s.dispatchEvent(new Event('input')); })()"
        )
        assert ids() == ["demo_004"]
        order = json.loads(browser.evaluate("sessionStorage.getItem('clamHeatOrder')"))
        assert order == ["demo_004"]  # the slide page walks the filtered order


def test_browser_review_note_survives_reload_and_restart(
    viewed_run: Path, tmp_path: Path, browser: _DevTools
) -> None:
    cfg = load_config(viewed_run)
    review = tmp_path / "results" / "demo_review.csv"

    def app() -> ViewerApp:
        entries = viewer_entries(cfg)
        return ViewerApp(entries, title="t", review=review)

    with ViewerServer(app(), port=0) as server:
        browser.open(server.url + "view/demo_002")
        browser.select("#verdict", "artifact")
        browser.evaluate("document.querySelector('#note').value = 'pen mark, \"top\" left'")
        browser.evaluate("document.querySelector('#save').click()")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "saved" not in browser.evaluate(
            "document.querySelector('#review-status').textContent"
        ):
            time.sleep(0.1)
        browser.open(server.url + "view/demo_002")
        assert browser.evaluate("document.querySelector('#verdict').value") == "artifact"
    with ViewerServer(app(), port=0) as server:  # a new server on the same notes file
        browser.open(server.url + "view/demo_002")
        assert browser.evaluate("document.querySelector('#verdict').value") == "artifact"
        assert browser.evaluate("document.querySelector('#note').value") == 'pen mark, "top" left'
        browser.open(server.url)
        row = browser.evaluate(
            "document.querySelector('#rows tr[data-id=demo_002] td.verdict').textContent"
        )
        assert row == "artifact"


def test_compare_mode_adds_b_and_the_percentile_difference(
    viewed_run: Path, tmp_path: Path
) -> None:
    from clam_heat.compare import percentile_difference
    from clam_heat.viewer import compare_entries

    other = tmp_path / "b"
    shutil.copytree(viewed_run.parent, other)
    config_b = other / "config.yaml"
    b_entry = viewer_entries(load_config(config_b))[0]
    with h5py.File(b_entry.maps[0].path, "r+") as h5:  # B ranks demo_000's patches in reverse
        h5["attention_scores"][...] = -h5["attention_scores"][...]
    entries = compare_entries(viewer_entries(load_config(viewed_run)), viewed_run, config_b)
    assert [m.name for m in entries[0].maps] == ["attention", "B attention", "A \u2212 B"]
    app = run_app(load_config(viewed_run), entries, "c")
    diff = app.index("demo_000", 2)
    with h5py.File(entries[0].maps[0].path, "r") as h5:
        a = h5["attention_scores"][:].reshape(-1)
    assert np.allclose(diff.scores, percentile_difference(a, -a))
    info = app.slide_info("demo_000")
    assert info["maps"][2]["cmap"] == "RdBu_r" and info["maps"][2]["scale"] == "raw"
    with ViewerServer(app, port=0) as server:
        assert _get(server.url + "tiles/demo_000/map/2/9/0_0.png?scale=raw&cmap=RdBu_r")[0] == 200


def test_browser_overlay_mode_has_one_opacity_per_map(viewed_run: Path, browser: _DevTools) -> None:
    cfg = load_config(viewed_run)
    first = viewer_entries(cfg)[0]
    raw = first.maps[0].path.parent
    shutil.copy(first.maps[0].path, raw / "demo_000_gradients_blockmap.h5")
    try:
        with ViewerServer(run_app(cfg, viewer_entries(cfg), "c"), port=0) as server:
            browser.open(server.url + "view/demo_000")
            browser.evaluate("document.querySelector('#overlay').click()")
            browser.settle()
            assert browser.evaluate("document.querySelector('#pane-slide').offsetWidth") == 0
            sliders = browser.evaluate(
                "[...document.querySelectorAll('#opacities input')]"
                ".map(s => [s.dataset.map, s.value])"
            )
            assert sliders == [["0", "0.4"], ["1", "0"]]  # the run's alpha on the selected map
            browser.evaluate(
                "(() => { const s = document.querySelector('#opacities input[data-map=\"1\"]');"
                " s.value = 0.8; s.dispatchEvent(new Event('input')); })()"
            )
            opacities = browser.evaluate(
                "clamHeat.viewers[1].world._items.map(i => [i.clamTag, i.getOpacity()])"
            )
            assert sorted(opacities) == [["map:0", 0.4], ["map:1", 0.8], ["slide", 1]]
    finally:
        (raw / "demo_000_gradients_blockmap.h5").unlink()


def test_concurrent_requests_for_one_map_index_it_once(
    viewed_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clam_heat.viewer.app as app_module

    app = _app(viewed_run)
    calls: list[str] = []
    real = app_module.load_index

    def counting(source: Any) -> Any:
        calls.append(str(source.path))
        time.sleep(0.2)  # a slow read, so the requests overlap
        return real(source)

    monkeypatch.setattr(app_module, "load_index", counting)
    with ThreadPoolExecutor(8) as pool:
        tiles = list(
            pool.map(lambda k: app.map_tile("demo_000", 0, app.base_style, 9, k % 2, 0), range(8))
        )
    assert len(calls) == 1 and all(t is not None for t in tiles)
