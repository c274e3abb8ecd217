"""What a heatmap file shows, written into the file itself: the colormap, the score scale and
its range, as JSON text in a PNG ``tEXt`` chunk, a JPEG ``COM`` segment or the TIFF
``ImageDescription`` (the sinks of :mod:`~clam_heat.heatmap.writers` embed it), so that a viewer
draws the right colour bar for an image it is only given (``clam-heat view --heatmap IMG``).
Pixels are never changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "META_KEY",
    "embed",
    "embed_in_file",
    "image_meta",
    "read_embedded",
    "read_meta",
    "vips_with_comment",
]

#: The key of the metadata text (PNG ``tEXt`` keyword).
META_KEY = "clam-heat"


def embed(data: bytes, text: str) -> bytes:
    """``data`` (an encoded PNG or JPEG) with ``text`` embedded: a PNG ``tEXt`` chunk keyed
    :data:`META_KEY` after ``IHDR``, or a JPEG ``COM`` segment after ``SOI``; pixels unchanged.

    >>> read_embedded(embed(b"\\xff\\xd8\\xff\\xd9", '{"cmap": "jet"}'))
    '{"cmap": "jet"}'
    """
    import zlib

    raw = text.encode("latin-1", errors="replace")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        body = META_KEY.encode() + b"\0" + raw
        chunk = b"tEXt" + body
        packed = len(body).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
        end = 8 + 8 + int.from_bytes(data[8:12], "big") + 4  # after IHDR
        return data[:end] + packed + data[end:]
    if data[:2] == b"\xff\xd8" and len(raw) < 65000:
        return data[:2] + b"\xff\xfe" + (len(raw) + 2).to_bytes(2, "big") + raw + data[2:]
    return data


def image_meta(
    cmap: str,
    *,
    map_name: str = "attention",
    scale: str = "percentile",
    low: float = 0.0,
    high: float = 100.0,
    threshold: float | None = None,
) -> str:
    """The JSON text a heatmap file carries: what its colours mean, so a viewer draws the right
    colour bar without being told (``clam-heat view --slide S --heatmap IMG``).

    >>> image_meta("plasma")
    '{"cmap": "plasma", "high": 100.0, "low": 0.0, "map": "attention", "scale": "percentile"}'
    """
    import json

    meta: dict[str, object] = {"cmap": cmap, "map": map_name, "scale": scale}
    meta.update(low=float(low), high=float(high))
    if threshold:
        meta["threshold"] = float(threshold)
    return json.dumps(meta, sort_keys=True)


def read_meta(path: Path) -> dict[str, object] | None:
    """The :func:`image_meta` of a heatmap file (PNG, JPEG or TIFF), or None when it has none."""
    import json

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                text = tif.pages[0].description  # type: ignore[union-attr]
        else:
            with open(path, "rb") as fh:
                text = read_embedded(fh.read(1 << 20))
        meta = json.loads(text) if text else None
    except (OSError, ValueError, IndexError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("cmap"), str) else None


def read_embedded(data: bytes) -> str | None:
    """The text :func:`embed` wrote (PNG ``tEXt`` / JPEG ``COM``), or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while pos + 8 <= len(data):
            n = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8]
            if kind in (b"tEXt", b"zTXt"):
                key, _, value = data[pos + 8 : pos + 8 + n].partition(b"\0")
                if key == META_KEY.encode() and kind == b"tEXt":
                    return value.decode("latin-1")
                if key == META_KEY.encode() and kind == b"zTXt":  # libvips compresses
                    import zlib

                    return zlib.decompress(value[1:]).decode("latin-1")
            pos += 12 + n
        return None
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker, n = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == 0xFE:
                return data[pos + 4 : pos + 2 + n].decode("latin-1")
            if marker == 0xDA:
                return None
            pos += 2 + n
    return None


def embed_in_file(path: Path, text: str) -> None:
    """:func:`embed` into a written JPEG (libvips writes no comment), copied in chunks."""
    from ..atomic import temp_path_for

    tmp = temp_path_for(path)
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(embed(src.read(2), text))
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, path)


def vips_with_comment(image: Any, text: str) -> Any:
    """A libvips image that ``pngsave(keep="other")`` writes with ``text`` (as ``zTXt``)."""
    import pyvips

    image = image.copy()
    image.set_type(pyvips.GValue.gstr_type, f"png-comment-0-{META_KEY}", text)
    return image
