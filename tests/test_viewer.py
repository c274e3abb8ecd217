"""The side-by-side viewer: entries, tile server, CLI, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clam_heat.config import load_config
from clam_heat.errors import OutputError
from clam_heat.runner import run_pipeline
from clam_heat.slide import open_slide
from clam_heat.viewer import (
    TILE_SIZE,
    ViewerServer,
    open_heatmap_layer,
    viewer_entries,
)

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def viewed_run(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """A finished demo run (config path); shared by this module's tests, which only read it."""
    folder = tmp_path_factory.mktemp("viewer") / "demo"
    shutil.copytree(demo_source, folder)
    config = folder / "config.yaml"
    assert run_pipeline(load_config(config)).ok
    return config


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _decode(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _blur(image: np.ndarray) -> np.ndarray:
    """Screenshots are compared blurred: JPEG and browser resampling differ pixel by pixel."""
    return cv2.GaussianBlur(image, (0, 0), 3)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# ------------------------------------------------------------------------------ entries, tiles


def test_entries_point_at_the_runs_heatmaps(viewed_run: Path) -> None:
    entries = viewer_entries(load_config(viewed_run))
    assert [e.slide_id for e in entries] == [f"demo_00{i}" for i in range(5)]
    for entry in entries:
        assert entry.status == "done" and entry.slide_path.is_file()
        assert entry.heatmap_path == entry.expected_heatmap
        assert entry.heatmap_path.name.startswith(f"{entry.slide_id}_0.0_roi_0_")
        assert entry.details["Pred_0"] in ("tumour", "normal")


def test_pyramid_tiff_is_preferred_and_streamed(demo_project: Path) -> None:
    cfg = load_config(demo_project, overrides=["runner_arguments.write_pyramid_tiff=true"])
    assert run_pipeline(cfg).ok
    entry = viewer_entries(cfg)[0]
    assert entry.heatmap_path.name == f"{entry.slide_id}_heatmap_pyramid.tiff"
    with open_slide(entry.slide_path) as slide:
        layer = open_heatmap_layer(entry.heatmap_path, slide.dimensions)
    production = cv2.cvtColor(cv2.imread(str(entry.expected_heatmap)), cv2.COLOR_BGR2RGB)
    assert type(layer.slide).__name__ == "OpenSlideSlide"  # tiles come from disk
    tile = layer.tile(0, 0, 0)
    h, w = tile.shape[:2]
    assert _mad(tile, production[:h, :w]) < 4  # both are JPEG encodings of one rendering
    layer.close()


def test_slide_and_heatmap_tiles_are_the_files_pixels(viewed_run: Path) -> None:
    entries = viewer_entries(load_config(viewed_run))
    entry = entries[0]
    with ViewerServer(entries, port=0) as server, open_slide(entry.slide_path) as slide:
        info = json.loads(_get(server.url + f"api/slides/{entry.slide_id}")[1])
        assert info["error"] is None and info["heatmap_file"] == entry.heatmap_path.name
        levels = info["slide"]["levels"]
        assert [lv["width"] for lv in levels] == [d[0] for d in slide.level_dimensions]
        # level 1, tile (1, 0): level pixels 512.. of the slide
        status, data = _get(server.url + f"tiles/{entry.slide_id}/slide/1/1_0.jpg")
        assert status == 200
        ds = slide.level_downsamples[1][0]
        expected = slide.read_region((round(TILE_SIZE * ds), 0), 1, (TILE_SIZE, TILE_SIZE))
        got = _decode(data)
        assert got.shape == expected.shape and _mad(got, expected) < 4
        # the heatmap image (128 x 96 at 32x) is one tile; it covers the whole slide
        heat = info["heatmap"]
        production = cv2.cvtColor(cv2.imread(str(entry.heatmap_path)), cv2.COLOR_BGR2RGB)
        assert heat["levels"][0]["width"] == production.shape[1]
        assert heat["levels"][0]["downsample"][0] == pytest.approx(
            slide.dimensions[0] / production.shape[1]
        )
        got = _decode(_get(server.url + f"tiles/{entry.slide_id}/heatmap/0/0_0.png")[1])
        assert got.shape == production.shape and np.array_equal(got, production)  # lossless
        assert _get(server.url + f"tiles/{entry.slide_id}/heatmap/0/0_0.jpg")[0] == 404


def test_heatmap_layer_sits_on_the_roi_and_scales_by_image_size(tmp_path: Path) -> None:
    image = np.zeros((300, 1100, 3), np.uint8)
    image[:, 550:] = 255
    path = tmp_path / "heat.png"
    cv2.imwrite(str(path), image)
    layer = open_heatmap_layer(path, (40000, 30000), l0_box=(1000, 2000, 12000, 5000))
    info = layer.info()
    assert info["origin"] == [1000.0, 2000.0]
    assert [lv["width"] for lv in info["levels"]] == [1100, 550, 275]  # 2x pyramid to ~1 tile
    assert info["levels"][0]["downsample"] == [10.0, 10.0]  # 11000 l0 px / 1100 image px
    assert info["levels"][2]["downsample"] == [40.0, 40.0]
    assert layer.tile(0, 1, 0)[0, 0].tolist() == [0, 0, 0]  # image x 512: still black
    assert layer.tile(0, 2, 0).shape == (300, 1100 - 1024, 3)  # edge tile is smaller
    assert layer.tile(0, 3, 0) is None and layer.tile(3, 0, 0) is None


def test_bad_requests_and_files_get_one_line_answers(viewed_run: Path, tmp_path: Path) -> None:
    entries = viewer_entries(load_config(viewed_run))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    entries[1] = entries[1].__class__(**{**entries[1].__dict__, "heatmap_path": broken})
    entries[2] = entries[2].__class__(**{**entries[2].__dict__, "slide_path": tmp_path / "x.svs"})
    with ViewerServer(entries, port=0) as server:
        status, body = _get(server.url + "api/slides/nope")
        assert (status, body.decode()) == (404, "no slide 'nope' in this run's process list")
        assert _get(server.url + "tiles/demo_000/slide/9/0_0.jpg")[0] == 404
        assert _get(server.url + "tiles/demo_000/slide/0/99_0.jpg")[0] == 404
        assert _get(server.url + "tiles/demo_000/other/0/0_0.jpg")[0] == 404
        info = json.loads(_get(server.url + "api/slides/demo_001")[1])
        assert info["heatmap"] is None and info["slide"] is not None
        assert (
            info["error"] == f"{broken}: heatmap image cannot be decoded (rerun its heatmap stage)"
        )
        info = json.loads(_get(server.url + "api/slides/demo_002")[1])
        assert info["slide"] is None and str(tmp_path / "x.svs") in info["error"]
        assert "\n" not in info["error"]
        assert _get(server.url + "tiles/demo_002/slide/0/0_0.jpg")[0] == 500
        assert _get(server.url + "tiles/demo_000/slide/0/0_0.jpg")[0] == 200  # still serving


def test_rows_without_heatmaps_say_what_to_run(demo_project: Path) -> None:
    cfg = load_config(demo_project)
    cfg.process_list_path.unlink()  # the demo ships its list; a real project may not have one
    with pytest.raises(OutputError, match="no process list yet; run `clam-heat run CONFIG`"):
        viewer_entries(cfg)
    assert run_pipeline(cfg, stages=("segment",)).ok
    entries = viewer_entries(cfg)
    assert all(e.heatmap_path is None for e in entries)
    with ViewerServer(entries, port=0, run_hint="clam-heat run demo.yaml") as server:
        info = json.loads(_get(server.url + "api/slides/demo_000")[1])
        assert info["heatmap"] is None and info["slide"] is not None
        assert info["error"].startswith("no heatmap yet for demo_000 (row status: ")
        assert info["error"].endswith(
            f"run `clam-heat run demo.yaml` to draw {entries[0].expected_heatmap.name}"
        )


def test_busy_port_is_one_clear_error(viewed_run: Path) -> None:
    entries = viewer_entries(load_config(viewed_run))
    with ViewerServer(entries, port=0) as first:
        port = int(first.url.rsplit(":", 1)[1].strip("/"))
        with pytest.raises(OutputError, match=rf"cannot listen on 127.0.0.1:{port} .*--port 0"):
            ViewerServer(entries, port=port)


def test_index_lists_every_row_with_its_prediction(viewed_run: Path) -> None:
    entries = viewer_entries(load_config(viewed_run))
    with ViewerServer(entries, port=0) as server:
        page = _get(server.url)[1].decode()
        for entry in entries:
            assert f'href="/view/{entry.slide_id}"' in page
            assert f"<td>{entry.details['p_0']}</td>" in page
        listing = json.loads(_get(server.url + "api/slides")[1])
        assert [row["slide_id"] for row in listing] == [e.slide_id for e in entries]


def test_cli_serves_until_stopped_and_checks_the_slide(viewed_run: Path) -> None:
    cli = [str(Path(sys.executable).with_name("clam-heat"))]  # the installed console script
    bad = subprocess.run(
        [*cli, "view", str(viewed_run), "--slide", "demo_999", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: --slide 'demo_999' is not a row (process == 1)")
    proc = subprocess.Popen(
        [*cli, "view", str(viewed_run), "--slide", "demo_001", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.match(
            r"viewer: (http://127\.0\.0\.1:\d+/)view/demo_001 \(5 slides, 5 with", line
        )
        assert match, line
        status, page = _get(match.group(1) + "view/demo_001")
        assert status == 200 and b'"slide_id": "demo_001"' in page and b'"prev": "demo_000"' in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ real browser


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    message = (
        "no headless Chromium: install it with "
        "`apt-get install -y chromium-headless-shell` (the README's test command does)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class _DevTools:
    """The few Chrome DevTools Protocol calls the browser test needs, over one page socket."""

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
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate("!!(window.clamHeat && window.clamHeat.idle())"):
                return
            time.sleep(0.1)
        raise AssertionError(f"page not idle: {self.evaluate('document.body.innerText')}")

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), 1), cv2.COLOR_BGR2RGB)

    def pane_rects(self) -> list[tuple[int, int, int, int]]:
        """(x, y, w, h) of the slide pane and the heatmap pane, in screenshot pixels."""
        rects = self.evaluate(
            "[...document.querySelectorAll('.pane')].map(p => {"
            "const r = p.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })"
        )
        return [tuple(round(v) for v in r) for r in rects]

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[_DevTools]:
    proc = subprocess.Popen(
        [
            _browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--remote-debugging-port=0", "--window-size=1000,500", "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'profile'}", "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its renderer and GPU processes share this process group
    )  # fmt: skip
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
        # kill the whole group: killing only the browser process leaves its renderer and GPU
        # processes spinning as orphans
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "Chromium processes outlived the test"


def _group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _expected_pane(
    source: np.ndarray, origin: tuple[float, float], downsample: float, view: dict, size: tuple
) -> np.ndarray:
    """What a pane of ``size`` (w, h) should show of ``source`` (part of one pyramid level whose
    top-left is level-0 ``origin``, ``downsample`` level-0 px per pixel) for ``view``."""
    w, h = size
    scale = downsample / view["ds"]
    x0, y0 = view["x"] - w / 2 * view["ds"], view["y"] - h / 2 * view["ds"]
    shift = ((origin[0] - x0) / view["ds"], (origin[1] - y0) / view["ds"])
    if scale >= 1:  # magnified: each source pixel is a sharp square, as the page draws it
        cols = np.floor((np.arange(w) + 0.5 - shift[0]) / scale).astype(int)
        rows = np.floor((np.arange(h) + 0.5 - shift[1]) / scale).astype(int)
        out = np.full((h, w, 3), 244, np.uint8)
        ok_c = (cols >= 0) & (cols < source.shape[1])
        ok_r = (rows >= 0) & (rows < source.shape[0])
        out[np.ix_(ok_r, ok_c)] = source[np.ix_(rows[ok_r], cols[ok_c])]
        return out
    matrix = np.float32([[scale, 0, shift[0]], [0, scale, shift[1]]])
    return cv2.warpAffine(
        source, matrix, (w, h), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(244, 244, 244),
    )  # fmt: skip


def _slide_pane(slide_path: Path, view: dict, size: tuple[int, int]) -> np.ndarray:
    """The slide pane for ``view``, from the level the page picks (the coarsest not coarser
    than a screen pixel), read with OpenSlide."""
    w, h = size
    with open_slide(slide_path) as slide:
        downsamples = [d[0] for d in slide.level_downsamples]
        level = max(i for i, d in enumerate(downsamples) if d <= view["ds"] * 1.01 or i == 0)
        ds = downsamples[level]
        x0 = max(0, int(view["x"] - w / 2 * view["ds"]))
        y0 = max(0, int(view["y"] - h / 2 * view["ds"]))
        region = (int(w * view["ds"] / ds) + 2, int(h * view["ds"] / ds) + 2)
        source = slide.read_region((x0, y0), level, region)
        # outside the slide the pane shows its background, not the reader's fill
        lw, lh = slide.level_dimensions[level]
        source[:, max(0, lw - int(x0 / ds)) :] = 244
        source[max(0, lh - int(y0 / ds)) :, :] = 244
    return _expected_pane(source, (x0, y0), ds, view, size)


def test_browser_panes_pan_and_zoom_together(viewed_run: Path, browser: _DevTools) -> None:
    """Drag the slide pane, wheel-zoom the heatmap pane: both panes always show the same place."""
    entries = viewer_entries(load_config(viewed_run))
    entry = entries[0]
    heat = cv2.cvtColor(cv2.imread(str(entry.heatmap_path)), cv2.COLOR_BGR2RGB)
    with open_slide(entry.slide_path) as slide:
        heat_ds = slide.dimensions[0] / heat.shape[1]

    with ViewerServer(entries, port=0) as server:
        browser.call("Page.navigate", url=server.url + f"view/{entry.slide_id}")
        browser.wait_idle()
        assert browser.evaluate("window.clamHeat.failed()") == 0
        (lx, ly, w, h), (rx, ry, rw, rh) = browser.pane_rects()
        assert (w, h) == (rw, rh) and rx > lx

        def panes() -> tuple[np.ndarray, np.ndarray, dict]:
            shot = browser.screenshot()
            view = browser.evaluate("({...window.clamHeat.view})")
            return shot[ly : ly + h, lx : lx + w], shot[ry : ry + h, rx : rx + w], view

        def check(left: np.ndarray, right: np.ndarray, view: dict) -> None:
            want_left = _blur(_slide_pane(entry.slide_path, view, (w, h)))
            want_right = _blur(_expected_pane(heat, (0, 0), heat_ds, view, (w, h)))
            for got, want in ((_blur(left), want_left), (_blur(right), want_right)):
                off = min(
                    _mad(got, np.roll(want, shift, axis)) for shift in (-40, 40) for axis in (0, 1)
                )
                assert _mad(got, want) < 6
                # and the check can tell: the picture 40 px off is much further from the pane
                assert off > 2 * _mad(got, want)

        left, right, view = panes()
        check(left, right, view)

        # drag the slide pane 150 px left and 60 px up: the view moves by that much level-0
        before = dict(view)
        browser.mouse("mousePressed", lx + 300, ly + 300, button="left", clickCount=1)
        browser.mouse("mouseMoved", lx + 225, ly + 270, button="left", buttons=1)
        browser.mouse("mouseMoved", lx + 150, ly + 240, button="left", buttons=1)
        browser.mouse("mouseReleased", lx + 150, ly + 240, button="left", clickCount=1)
        browser.wait_idle()
        left, right, view = panes()
        assert view["x"] == pytest.approx(before["x"] + 150 * before["ds"])
        assert view["y"] == pytest.approx(before["y"] + 60 * before["ds"])
        check(left, right, view)

        # zoom in on the heatmap pane where the heatmap changes most: the level-0 point under
        # the cursor stays put, and both panes follow
        contrast = cv2.Laplacian(_blur(right).mean(axis=2).astype(np.float32), cv2.CV_32F, ksize=5)
        inner = np.abs(contrast)[120 : h - 120, 120 : w - 120]
        cy, cx = np.unravel_index(np.argmax(inner), inner.shape)
        cx, cy = int(cx) + 120, int(cy) + 120
        point = (view["x"] + (cx - w / 2) * view["ds"], view["y"] + (cy - h / 2) * view["ds"])
        for _ in range(5):
            browser.mouse("mouseWheel", rx + cx, ry + cy, deltaX=0, deltaY=-250)
        browser.wait_idle()
        left, right, view = panes()
        assert view["ds"] < 1.0  # past level 0: the slide pane now draws level-0 tiles
        after = (view["x"] + (cx - w / 2) * view["ds"], view["y"] + (cy - h / 2) * view["ds"])
        assert after == pytest.approx(point, abs=1.0)
        check(left, right, view)
        assert re.fullmatch(r"#x=\d+&y=\d+&ds=[\d.]+", browser.evaluate("location.hash"))
        # the scale bar (demo MPP 0.5): a round length, drawn at the view's microns per pixel
        text, width = browser.evaluate(
            "[document.querySelector('.scale span').textContent,"
            " document.querySelector('.scale').getBoundingClientRect().width]"
        )
        number, unit = text.split()
        microns = float(number) * (1000 if unit == "mm" else 1)
        assert unit in ("\u00b5m", "mm") and re.fullmatch(r"[125]0*(\.0*)?|0\.0*[125]", number)
        assert width == pytest.approx(microns / (view["ds"] * 0.5) + 4, abs=1)  # + 2 borders
        assert 48 <= width <= 124


def test_open_slides_are_bounded_by_count_and_decoded_bytes(
    viewed_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clam_heat.viewer.server as viewer

    entries = viewer_entries(load_config(viewed_run))
    with ViewerServer(entries, port=0) as server:
        for entry in entries:
            server.opened(entry.slide_id)
        assert list(server._opened) == [e.slide_id for e in entries[-viewer.OPEN_SLIDES :]]
        heat_bytes = server.opened(entries[-1].slide_id).memory_bytes
        assert heat_bytes == 128 * 96 * 3  # the decoded 128 x 96 heatmap (one tile: one level)
        monkeypatch.setattr(viewer, "OPEN_IMAGE_BYTES", 2 * heat_bytes)
        server.opened(entries[0].slide_id)
        assert list(server._opened) == [entries[-1].slide_id, entries[0].slide_id]
        monkeypatch.setattr(viewer, "OPEN_IMAGE_BYTES", 1)
        server.opened(entries[1].slide_id)
        assert list(server._opened) == [entries[1].slide_id]  # the newest is always kept


def test_slide_ids_with_spaces_and_hashes_are_quoted(viewed_run: Path) -> None:
    from urllib.parse import quote

    entries = viewer_entries(load_config(viewed_run))[:1]
    odd = "case 1#A%2"
    entries = [entries[0].__class__(**{**entries[0].__dict__, "slide_id": odd})]
    with ViewerServer(entries, port=0) as server:
        page = _get(server.url)[1].decode()
        href = re.search(r'href="(/view/[^"]+)"', page).group(1)
        assert href == "/view/" + quote(odd)
        status, body = _get(server.url.rstrip("/") + href)
        assert status == 200 and json.dumps(odd) in body.decode()
        info = json.loads(_get(server.url + "api/slides/" + quote(odd))[1])
        assert info["slide_id"] == odd and info["error"] is None
        assert _get(server.url + f"tiles/{quote(odd)}/slide/0/0_0.jpg")[0] == 200


def test_browser_asks_again_for_a_tile_that_failed(
    viewed_run: Path, browser: _DevTools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile request that fails once (e.g. its slide was evicted mid-read) is retried once."""
    from clam_heat import viewer

    entry = viewer_entries(load_config(viewed_run))[0]
    real_tile, failed_once = viewer.Layer.tile, set()

    def flaky_tile(self: viewer.Layer, level: int, tx: int, ty: int) -> np.ndarray | None:
        key = (self.format, level, tx, ty)
        if key not in failed_once:
            failed_once.add(key)
            raise RuntimeError("injected read failure")
        return real_tile(self, level, tx, ty)

    monkeypatch.setattr(viewer.Layer, "tile", flaky_tile)
    with ViewerServer([entry], port=0) as server:
        browser.call("Page.navigate", url=server.url + f"view/{entry.slide_id}")
        browser.wait_idle()
        time.sleep(1.5)  # the page asks again after a second
        browser.wait_idle()
        assert browser.evaluate("window.clamHeat.failed()") == len(failed_once) > 0
        x, y, w, h = browser.pane_rects()[0]
        view = browser.evaluate("({...window.clamHeat.view})")
        shown = _blur(browser.screenshot()[y : y + h, x : x + w])
        want = _blur(_slide_pane(entry.slide_path, view, (w, h)))
        assert _mad(shown, want) < 6  # every tile arrived on the second request


def _raw_get(port: int, host_header: str | None) -> tuple[int, bytes]:
    """GET / with exactly this Host header (None: none at all), as a rebinding page sends it."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", "/api/slides", skip_host=True)
        if host_header is not None:
            conn.putheader("Host", host_header)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_foreign_host_header_is_refused(viewed_run: Path) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not read the run's slides."""
    import logging

    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("clam_heat")  # the viewer's records reach it, whatever the CLI did
    logger.addHandler(catcher)
    entries = viewer_entries(load_config(viewed_run))
    with ViewerServer(entries, port=0) as server:
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
            assert _raw_get(port, good)[0] == 200, good
        try:
            status, body = _raw_get(port, f"evil.example:{port}")
            assert status == 421 and b"demo_000" not in body
            assert (
                body.decode() == f"Host 'evil.example:{port}' is not this server; open {server.url}"
            )
            assert _raw_get(port, f"127.0.0.1:{port + 1}")[0] == 421  # another port
            assert _raw_get(port, None)[0] == 400
        finally:
            logger.removeHandler(catcher)
        refused = [r.getMessage() for r in records if "refused" in r.getMessage()]
        assert len(refused) == 3 and all("\n" not in line for line in refused)
        assert "evil.example" in refused[0]


# ------------------------------------------------------------------------------ pair viewer


def _jet_ramp(path: Path, size: tuple[int, int] = (160, 120), cmap: str = "plasma") -> np.ndarray:
    """A heatmap-like image (colormap ramp left to right) written to ``path``; returns its RGB."""
    from clam_heat.heatmap import apply_colormap

    w, h = size
    rgb = apply_colormap(np.tile(np.linspace(0, 1, w), (h, 1)), cmap)
    rgb[: h // 3] = apply_colormap(np.full((h // 3, w), 0.9), cmap)  # a band of high values
    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    else:
        import tifffile

        tifffile.imwrite(path, rgb)
    return rgb


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tiff"])
def test_pair_entry_places_any_image_by_size(
    demo_source: Path, tmp_path: Path, suffix: str
) -> None:
    from clam_heat.viewer import pair_entry

    slide_path = demo_source / "slides" / "demo_000.tiff"
    image = tmp_path / f"demo_000_heatmap{suffix}"
    rgb = _jet_ramp(image)
    entry = pair_entry(slide_path, image)
    assert (entry.slide_id, entry.heatmap_path, entry.l0_box) == ("demo_000", image, None)
    with open_slide(slide_path) as slide:
        layer = open_heatmap_layer(image, slide.dimensions)
        assert layer.info()["levels"][0]["downsample"] == pytest.approx(
            [slide.dimensions[0] / 160, slide.dimensions[1] / 120]
        )
    tile = layer.tile(0, 0, 0)
    assert tile.shape == rgb.shape and _mad(tile, rgb) < (4 if suffix == ".jpg" else 0.01)
    with pytest.raises(OutputError, match=r"--heatmap .*nope.png: no such file"):
        pair_entry(slide_path, tmp_path / "nope.png")


def test_cli_pair_mode_runs_verbatim(demo_source: Path, tmp_path: Path) -> None:
    """`clam-heat view --slide SLIDE --heatmap IMAGE`, MIL-Lab's view_heatmap_sync.py line."""
    cli = [str(Path(sys.executable).with_name("clam-heat"))]
    image = tmp_path / "demo_001_heatmap.png"
    _jet_ramp(image)
    slide_path = demo_source / "slides" / "demo_001.tiff"
    bad = subprocess.run([*cli, "view", "--heatmap", str(image), "--port", "0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "--slide SLIDE_FILE --heatmap IMAGE" in bad.stderr
    proc = subprocess.Popen(
        [*cli, "view", "--slide", str(slide_path), "--heatmap", str(image), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.match(
            r"viewer: (http://127\.0\.0\.1:\d+/)view/demo_001 \(1 slides, 1 with", line
        )
        assert match, line
        info = json.loads(_get(match.group(1) + "api/slides/demo_001")[1])
        assert info["error"] is None and info["heatmap_file"] == image.name
        assert info["legends"][0]["cmap"] == "jet" and len(info["legends"][0]["colors"]) == 256
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_browser_pair_mode_legend_and_overlay(
    demo_source: Path, tmp_path: Path, browser: _DevTools
) -> None:
    """The colour bar shows the colormap's own colours; the overlay toggle turns the slide pane
    into (1 - a) * slide + a * heatmap at the slider's opacity."""
    from clam_heat.heatmap import apply_colormap
    from clam_heat.viewer import legend, pair_entry

    image = tmp_path / "demo_002_heatmap.png"
    _jet_ramp(image)
    entry = pair_entry(demo_source / "slides" / "demo_002.tiff", image)
    bar = legend("plasma", "attention", "low", "high")
    with ViewerServer([entry], port=0, legends=[bar], alpha=0.4) as server:
        browser.call("Page.navigate", url=server.url + "view/demo_002")
        browser.wait_idle()
        assert browser.evaluate("window.clamHeat.failed()") == 0
        # the colour bar: title, ends, and its pixels are the colormap's, low to high
        text = browser.evaluate("document.querySelector('.legend').innerText")
        assert "attention (plasma)" in text and "low" in text and "high" in text
        x, y, w, h = (round(v) for v in browser.evaluate(
            "(() => { const r = document.querySelector('.legend canvas').getBoundingClientRect();"
            " return [r.left, r.top, r.width, r.height]; })()"
        ))  # fmt: skip
        shot = browser.screenshot()
        strip = shot[y + h // 2, x : x + w].astype(np.float32)
        want = apply_colormap((np.arange(w) + 0.5) / w, "plasma").astype(np.float32)
        assert np.abs(strip - want).mean() < 3
        jet = apply_colormap((np.arange(w) + 0.5) / w, "jet").astype(np.float32)
        assert np.abs(strip - jet).mean() > 30  # the check can tell colormaps apart
        assert browser.evaluate("document.getElementById('opacity').value") == "40"

        (lx, ly, pw, ph), (rx, ry, _, _) = browser.pane_rects()
        # the panes' pixels without their labels: title (top), scale bar and colour bar (bottom)
        top, bottom = ly + 32, ly + ph - 90
        shot = browser.screenshot()
        slide_only, heat = shot[top:bottom, lx : lx + pw], shot[top:bottom, rx : rx + pw]
        browser.evaluate("window.clamHeat.setOverlay(true, 0.5)")
        browser.wait_idle()
        blended = browser.screenshot()[top:bottom, lx : lx + pw]
        want = 0.5 * slide_only.astype(np.float32) + 0.5 * heat.astype(np.float32)
        assert _mad(blended, want) < 2
        assert _mad(blended, slide_only) > 10  # the toggle visibly changed the pane
        browser.evaluate("window.clamHeat.setOverlay(true, 0.2)")
        browser.wait_idle()
        light = browser.screenshot()[top:bottom, lx : lx + pw]
        assert _mad(light, 0.8 * slide_only.astype(np.float32) + 0.2 * heat) < 2
        browser.evaluate("window.clamHeat.setOverlay(false)")
        browser.wait_idle()
        assert _mad(browser.screenshot()[top:bottom, lx : lx + pw], slide_only) < 0.5


# ------------------------------------------------------------------------------ compare pane


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """The demo run again with the attention head negated: a planted, total disagreement."""
    import torch

    folder = tmp_path_factory.mktemp("viewer_b") / "demo"
    shutil.copytree(demo_source, folder)
    ckpt = folder / "ckpts" / "s_0_checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    for key in [k for k in state if "attention_c" in k]:
        state[key] = -state[key]
    torch.save(state, ckpt)
    config = folder / "config.yaml"
    assert run_pipeline(load_config(config)).ok
    return config


def test_browser_compare_mode_shows_a_b_and_the_difference(
    viewed_run: Path, run_b: Path, browser: _DevTools
) -> None:
    from clam_heat.compare import DIFF_CMAP, run_outputs
    from clam_heat.h5io import read_scores
    from clam_heat.heatmap import apply_colormap, to_percentiles
    from clam_heat.viewer import compare_entries, legend

    entries = compare_entries(
        viewer_entries(load_config(viewed_run)), load_config(run_b), viewed_run, run_b
    )
    entry = entries[0]
    assert entry.compare_path is not None and entry.compare_path.is_file()
    legends = [legend("jet", "attention percentile", "0", "100"),
               legend(DIFF_CMAP, "A - B percentile", "-100", "+100")]  # fmt: skip
    with ViewerServer(entries, port=0, legends=legends, compare=True) as server:
        layer = server.opened(entry.slide_id).difference
        # the difference layer, checked against the blockmaps: a patch's colour is
        # RdBu_r((pct_A - pct_B) / 100 / 2 + 1/2); negated attention ranks every patch oppositely
        scores_a, coords, size = read_scores(run_outputs(viewed_run)[entry.slide_id].blockmap)
        scores_b, _, _ = read_scores(run_outputs(run_b)[entry.slide_id].blockmap)
        diff = (to_percentiles(scores_a) - to_percentiles(scores_b)) / 100.0
        assert np.abs(diff).mean() > 0.3
        ds = layer.info()["levels"][0]["downsample"][0]
        image = layer.slide.read_region((0, 0), 0, layer.slide.dimensions)
        for i in (int(np.argmax(diff)), int(np.argmin(diff))):
            cx, cy = ((coords[i] + size / 2) / ds).astype(int)
            want = apply_colormap(np.array([(diff[i] + 1) / 2]), DIFF_CMAP)[0]
            assert np.abs(image[cy, cx].astype(int) - want).max() <= 2

        browser.call("Page.navigate", url=server.url + f"view/{entry.slide_id}")
        browser.wait_idle()
        assert browser.evaluate("window.clamHeat.failed()") == 0
        titles = browser.evaluate(
            "[...document.querySelectorAll('.pane .title')].map(t => t.textContent)"
        )
        assert titles == [
            "slide",
            "A: attention heatmap",
            "B: attention heatmap",
            "A \u2212 B (percentile)",
        ]
        assert browser.evaluate("document.querySelectorAll('.legend').length") == 2
        rects = browser.pane_rects()
        assert len(rects) == 4
        x, y, w, h = rects[3]
        view = browser.evaluate("({...window.clamHeat.view})")
        # the pane's pixels between its title and the colour bars
        shown = _blur(browser.screenshot()[y : y + h, x : x + w])[32:-130]
        want = _blur(_expected_pane(image, (0, 0), ds, view, (w, h)))[32:-130]
        assert _mad(shown, want) < 4
        assert _mad(shown, np.roll(want, 20, axis=1)) > 2 * _mad(shown, want)
