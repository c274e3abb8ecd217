"""The viewer's two pages (the cohort table and one slide) and the static files they load.

The HTML is a thin shell: the pages are drawn by ``static/cohort.js`` and ``static/viewer.js``
from the JSON calls of :mod:`.server`. OpenSeadragon is vendored under
``static/openseadragon/`` with its licence (``docs/viewer.md`` says how to update it); nothing
is fetched from a CDN.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Callable
from importlib import resources

__all__ = ["STATIC", "cohort_page", "slide_page"]

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


def _static_table() -> dict[str, tuple[str, Callable[[], bytes]]]:
    """Every file under ``static/`` by its relative name, listed once at import: a URL can
    only name one of these (no URL path reaches the filesystem)."""
    root = resources.files("clam_heat.viewer").joinpath("static")
    table: dict[str, tuple[str, Callable[[], bytes]]] = {}

    def walk(node: object, prefix: str) -> None:
        for child in node.iterdir():  # type: ignore[attr-defined]
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
                continue
            ext = "." + child.name.rsplit(".", 1)[-1]
            if ext in _TYPES:
                table[name] = (_TYPES[ext], functools.cache(child.read_bytes))

    walk(root, "")
    return table


STATIC = _static_table()


def _shell(title: str, body_class: str, config: dict[str, object], scripts: list[str]) -> str:
    data = json.dumps(config).replace("</", "<\\/")
    tags = "".join(f'<script src="/static/{s}"></script>' for s in scripts)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
        "<link rel='stylesheet' href='/static/viewer.css'></head>"
        f"<body class='{body_class}'><div id='app'></div>"
        f"<script>window.CLAM_HEAT = {data};</script>{tags}</body></html>"
    )


def cohort_page(title: str) -> str:
    """The index: one row per slide (drawn by ``cohort.js`` from ``/api/cohort``)."""
    return _shell(title, "cohort", {"title": title}, ["cohort.js"])


@functools.cache
def _cmaps() -> list[str]:
    import matplotlib

    return sorted(matplotlib.colormaps, key=str.lower)


def slide_page(title: str, slide_id: str) -> str:
    """One slide: panes, live controls, hover, patch and review (``viewer.js``)."""
    config = {"title": title, "slide_id": slide_id, "cmaps": _cmaps()}
    return _shell(
        f"{slide_id} - {title}",
        "slide",
        config,
        ["openseadragon/openseadragon.min.js", "viewer.js"],
    )
