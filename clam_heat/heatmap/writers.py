"""Where a rendered heatmap goes: sinks for JPEG, PNG, TIFF and pyramidal TIFF, and the
attention GeoJSON writer.

The renderer (:mod:`clam_heat.heatmap.render`) pushes finished strips of the saved image, top
to bottom, to :class:`Sink` objects and knows no file format; :func:`open_sinks` picks the sink
class for an output path from :data:`SINKS`, keyed by extension and built from
:data:`clam_heat.formats.IMAGE_FORMATS`. A new format is a row in that table and, for a new
kind, a :class:`Sink` subclass and one line in :data:`SINK_KINDS`. Writers hold no CLAM drawing
rule: they receive finished pixels. Every file goes through :mod:`clam_heat.atomic` (a temp name
beside the target, renamed into place when complete, not fsync'd: the stage's outputs are synced
together before its ledger entry says done); the pyramid's spool files carry the ``spool`` tag,
so the start-up sweep removes any that a killed run left behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..atomic import atomic_path, commit, temp_path_for, write_bytes_atomic
from ..errors import OutputError, os_error_advice
from ..formats import IMAGE_FORMATS
from .maths import to_percentiles
from .meta import embed, embed_in_file, vips_with_comment

log = logging.getLogger(__name__)

__all__ = [
    "JPEG_MAX_SIDE",
    "SINKS",
    "STREAM_MIN_PIXELS",
    "TIFF_TILE",
    "ArraySink",
    "EncodedSink",
    "JpegSink",
    "PngSink",
    "EXPORTS",
    "Export",
    "Sink",
    "StreamedSink",
    "TiffSink",
    "open_sinks",
    "write_attention_geojson",
]

#: TIFF tile side of the pyramidal overlay (and of plain .tiff outputs).
TIFF_TILE = 256
#: Largest image side libjpeg can encode.
JPEG_MAX_SIDE = 65500
#: JPEG quality of the pyramidal overlay's tiles.
PYRAMID_JPEG_QUALITY = 90
#: JPEG / PNG outputs of more pixels than this are streamed through a raw TIFF spool and
#: encoded by libvips row by row (:class:`StreamedSink`: memory a few strips, whatever the
#: size); smaller ones are encoded from memory (faster for small images; demo bytes unchanged).
STREAM_MIN_PIXELS = 32 * 2**20
#: zlib level of PNG outputs (PIL's default).
PNG_LEVEL = 6


class Sink:
    """Receives the saved image strip by strip, rows in order; then :meth:`close` or
    :meth:`abort`.

    ``image`` is the whole (h, w, 3) uint8 image when the sink holds one in memory: the renderer
    then draws straight into it (:meth:`push` sees its own rows) and keeps square tiles.
    """

    image: np.ndarray | None = None
    #: preferred height of the strips pushed (0: any); the renderer uses the largest
    strip_rows: int = 0
    #: what the image shows (colormap, score range) as JSON text (:mod:`.meta`)
    meta: str | None = None

    def push(self, y0: int, strip: np.ndarray) -> None:  # pragma: no cover - interface
        """Take rows ``y0 .. y0 + len(strip)`` of the saved image, (rows, w, 3) uint8 RGB."""
        raise NotImplementedError

    def close(self) -> Path | None:  # pragma: no cover - interface
        """Finish the output; returns the file written (None: nothing written)."""
        raise NotImplementedError

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Drop partial output after a failure."""


class ArraySink(Sink):
    """The whole image in memory (for callers that want the array; writes no file)."""

    def __init__(self, width: int, height: int) -> None:
        self.image = np.empty((height, width, 3), dtype=np.uint8)

    def push(self, y0: int, strip: np.ndarray) -> None:
        assert self.image is not None
        view = self.image[y0 : y0 + strip.shape[0]]
        if not np.shares_memory(view, strip):
            view[...] = strip

    def close(self) -> Path | None:
        return None


class EncodedSink(ArraySink):
    """A whole-image format (its encoder takes the whole image): held in memory, encoded and
    written atomically on :meth:`close`."""

    def __init__(
        self, path: Path, width: int, height: int, *, mpp: float | None, meta: str | None = None
    ) -> None:
        self.path, self.meta = path, meta
        super().__init__(width, height)

    def encode(self, image: np.ndarray) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> Path:
        assert self.image is not None
        data = self.encode(self.image)
        if self.meta is not None:
            data = embed(data, self.meta)
        write_bytes_atomic(self.path, data, durable=False)
        return self.path


class JpegSink(EncodedSink):
    """JPEG as PIL's ``save`` writes it (4:2:0, byte-identical to PIL's libjpeg output) at
    ``quality`` (100 for ``.jpg``, PIL's default 75 for ``.jpeg``, as CLAM's outputs)."""

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        *,
        mpp: float | None,
        quality: int = 100,
        meta: str | None = None,
    ) -> None:
        if max(width, height) > JPEG_MAX_SIDE:
            raise OutputError(
                f"{path}: a {width}x{height} px image is too large for JPEG (max "
                f"{JPEG_MAX_SIDE} px a side); use save_ext png or tiff, a coarser vis_level or "
                "custom_downsample"
            )
        self.quality = quality
        super().__init__(path, width, height, mpp=mpp, meta=meta)

    def encode(self, image: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpeg8_encode(image, level=self.quality))


class PngSink(EncodedSink):
    """PNG at zlib level 6 (PIL's default)."""

    def encode(self, image: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.png_encode(image, level=PNG_LEVEL))


class TiffSink(Sink):
    """Streams strips into a tiled TIFF on a writer thread; with ``pyramid`` also writes
    reduced levels (2x block means, separate pages with subfiletype=1, not SubIFDs) as JPEG
    tiles with the MPP of each level (OpenSlide and QuPath open it).

    Memory stays at a few tile rows: each reduced level is spooled to a raw temp file (named by
    :func:`~clam_heat.atomic.temp_path_for` with the ``spool`` tag) while the level above is
    written, then streamed back for its own page.
    """

    strip_rows = TIFF_TILE

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        *,
        mpp: float | None,
        pyramid: bool = False,
        meta: str | None = None,
    ) -> None:
        self.path, self.width, self.height, self.meta = path, width, height, meta
        self.mpp, self.pyramid = mpp, pyramid
        self.tmp = temp_path_for(path)
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.spools: list[Path] = []
        self.thread = threading.Thread(target=self._run, name=f"tiff-{path.name}", daemon=True)
        self.thread.start()

    def push(self, y0: int, strip: np.ndarray) -> None:
        while True:
            if self.error is not None or not self.thread.is_alive():
                self._raise()
            try:
                self.queue.put(strip, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> Path:
        while self.thread.is_alive():  # the writer may already be done with level 0's rows
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()
        if self.error is not None:
            self._raise()
        commit(self.tmp, self.path, durable=False)
        return self.path

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)
            self.thread.join(timeout=10)
        self.tmp.unlink(missing_ok=True)
        for spool in self.spools:
            spool.unlink(missing_ok=True)

    def _raise(self) -> None:
        err = self.error
        self.abort()
        if isinstance(err, OutputError):
            raise err
        raise OutputError(f"{self.path}: TIFF writing failed ({err})") from err

    # writer thread ---------------------------------------------------------------------------

    def _strips_from_queue(self) -> Iterator[np.ndarray]:
        while True:
            strip = self.queue.get()
            if strip is None:
                return
            if self.error is not None:
                raise RuntimeError("aborted")
            yield strip

    def _run(self) -> None:
        import tifffile

        try:
            w, h = self.width, self.height
            bigtiff = w * h * 3 * (4 / 3 if self.pyramid else 1) > 2**31
            with tifffile.TiffWriter(self.tmp, bigtiff=bigtiff) as tw:
                source: Iterator[np.ndarray] = self._strips_from_queue()
                level = 0
                while True:
                    last = not self.pyramid or max(w, h) <= TIFF_TILE or min(w, h) < 2
                    spool = None if last else self._new_spool()
                    tiles = _tiff_tiles(source, w, h, spool)
                    self._write_page(tw, tiles, w, h, level)
                    # tifffile stops pulling after the last tile: close the generators so the
                    # spool is flushed (and a read-back spool deleted) before the next page
                    tiles.close()
                    if level:
                        source.close()  # type: ignore[attr-defined]
                    if spool is None:
                        break
                    w, h, level = w // 2, h // 2, level + 1
                    source = _read_spool(spool, w, h)
        except BaseException as err:  # noqa: BLE001 - reported to the producer
            self.error = err
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _new_spool(self) -> Path:
        spool = temp_path_for(self.path, tag="spool")
        self.spools.append(spool)
        return spool

    def _write_page(self, tw: Any, tiles: Iterator[np.ndarray], w: int, h: int, level: int) -> None:
        kwargs: dict[str, Any] = {
            "shape": (h, w, 3),
            "dtype": np.uint8,
            "tile": (TIFF_TILE, TIFF_TILE),
            "photometric": "rgb",
            "metadata": None,
        }
        if self.pyramid:
            kwargs.update(
                compression="jpeg",
                compressionargs={"level": PYRAMID_JPEG_QUALITY, "outcolorspace": "rgb"},
                subsampling=(1, 1),
                subfiletype=0 if level == 0 else 1,
            )
        if self.mpp:
            per_cm = 1e4 / (self.mpp * 2**level)
            kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        if level == 0:
            kwargs["software"] = "clam-heat"
            if self.meta is not None:
                kwargs["description"] = self.meta
        tw.write(tiles, **kwargs)


class StreamedSink(Sink):
    """JPEG or PNG of any size in flat memory: strips stream into an uncompressed tiled TIFF
    spool (a :class:`TiffSink` writing a ``spool``-tagged temp file), which libvips then reads
    sequentially and encodes row by row (``jpegsave`` / ``pngsave``) into the output's temp file.

    Peak memory is a few strips plus libvips' row buffers; the spool needs the raw image's size
    on disk (width x height x 3 bytes) beside the output until the encode ends. Pixels equal the
    in-memory encoders': PNG is lossless, and libvips' JPEG (libjpeg-turbo, 4:2:0 forced as
    PIL's, same quality) decodes to the same pixels as :class:`JpegSink`'s, though the bytes
    differ (header fields).
    """

    strip_rows = TIFF_TILE

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        *,
        mpp: float | None,
        kind: str,
        quality: int,
        meta: str | None = None,
    ) -> None:
        self.path, self.kind, self.quality, self.meta = path, kind, quality, meta
        self.spool = temp_path_for(path, tag="spool")
        self.writer = TiffSink(self.spool, width, height, mpp=None)

    def push(self, y0: int, strip: np.ndarray) -> None:
        self.writer.push(y0, strip)

    def close(self) -> Path:
        import pyvips

        try:
            self.writer.close()
            image = pyvips.Image.new_from_file(str(self.spool), access="sequential")
            if self.meta is not None and self.kind == "png":
                image = vips_with_comment(image, self.meta)
            with atomic_path(self.path, durable=False) as tmp:
                if self.kind == "jpeg":
                    image.jpegsave(str(tmp), Q=self.quality, subsample_mode="on", keep="none")
                    if self.meta is not None:
                        embed_in_file(tmp, self.meta)
                else:
                    keep = "other" if self.meta is not None else "none"
                    image.pngsave(str(tmp), compression=PNG_LEVEL, keep=keep)
        except pyvips.Error as err:
            why = " ".join(str(err).split())
            raise OutputError(f"{self.path}: encoding failed ({why})") from None
        finally:
            self.spool.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self.writer.abort()
        self.spool.unlink(missing_ok=True)


def _streaming_available() -> bool:
    """Whether libvips loads (pyvips + pyvips-binary); without it large images use memory."""
    try:
        import pyvips  # noqa: F401
    except (ImportError, OSError) as err:
        log.warning("pyvips unavailable (%s): large JPEG/PNG heatmaps are encoded in memory", err)
        return False
    return True


def jpeg_sink(
    path: Path,
    width: int,
    height: int,
    *,
    mpp: float | None,
    quality: int = 100,
    meta: str | None = None,
) -> Sink:
    """JPEG at ``quality``: encoded from memory up to :data:`STREAM_MIN_PIXELS`, streamed
    through libvips above (:class:`StreamedSink`)."""
    big = width * height > STREAM_MIN_PIXELS and max(width, height) <= JPEG_MAX_SIDE
    if big and _streaming_available():
        return StreamedSink(path, width, height, mpp=mpp, kind="jpeg", quality=quality, meta=meta)
    return JpegSink(path, width, height, mpp=mpp, quality=quality, meta=meta)


def png_sink(
    path: Path, width: int, height: int, *, mpp: float | None, meta: str | None = None
) -> Sink:
    """PNG: encoded from memory up to :data:`STREAM_MIN_PIXELS`, streamed above."""
    if width * height > STREAM_MIN_PIXELS and _streaming_available():
        return StreamedSink(path, width, height, mpp=mpp, kind="png", quality=0, meta=meta)
    return PngSink(path, width, height, mpp=mpp, meta=meta)


def _tiff_tiles(
    strips: Iterator[np.ndarray], width: int, height: int, spool: Path | None
) -> Iterator[np.ndarray]:
    """Re-chunk row strips into TIFF tiles (row-major, zero-padded); spool 2x reductions."""
    t = TIFF_TILE
    carry = np.zeros((0, width, 3), dtype=np.uint8)
    rows_done = 0
    fh = open(spool, "wb") if spool is not None else None  # noqa: SIM115 - closed below
    try:

        def emit(block: np.ndarray) -> Iterator[np.ndarray]:
            if fh is not None:
                even_h, even_w = block.shape[0] // 2 * 2, width // 2 * 2
                if even_h:
                    small = cv2.resize(
                        np.ascontiguousarray(block[:even_h, :even_w]),
                        (even_w // 2, even_h // 2),
                        interpolation=cv2.INTER_AREA,
                    )
                    fh.write(np.ascontiguousarray(small).tobytes())
            for x in range(0, width, t):
                tile = block[:, x : x + t]
                if tile.shape[0] != t or tile.shape[1] != t:
                    padded = np.zeros((t, t, 3), dtype=np.uint8)
                    padded[: tile.shape[0], : tile.shape[1]] = tile
                    tile = padded
                yield np.ascontiguousarray(tile)

        for strip in strips:
            carry = np.concatenate([carry, strip], axis=0) if len(carry) else strip
            while len(carry) >= t:
                yield from emit(carry[:t])
                rows_done += t
                carry = carry[t:]
        if rows_done + len(carry) != height:
            raise RuntimeError(f"got {rows_done + len(carry)} rows for a {height}-row page")
        if len(carry):
            yield from emit(carry)
    finally:
        if fh is not None:
            fh.close()


def _read_spool(spool: Path, width: int, height: int) -> Iterator[np.ndarray]:
    """Stream a spooled level back in TIFF-tile-row strips, deleting the file at the end."""
    row_bytes = width * 3
    try:
        with open(spool, "rb") as fh:
            done = 0
            while done < height:
                n = min(TIFF_TILE, height - done)
                data = fh.read(n * row_bytes)
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, width, 3)
                done += n
    finally:
        spool.unlink(missing_ok=True)


#: A sink factory: ``(path, width, height, *, mpp, meta) -> Sink``; ``mpp`` is the saved image's
#: microns per pixel (None: unknown), for formats that record it; ``meta`` the text embedded.
SinkFactory = Callable[..., Sink]

#: Sink factories by format kind (:class:`clam_heat.formats.ImageFormat`'s ``kind``).
SINK_KINDS: dict[str, SinkFactory] = {"jpeg": jpeg_sink, "png": png_sink, "tiff": TiffSink}

#: Output formats by file extension (lower case, no dot), built from the one table of formats,
#: :data:`clam_heat.formats.IMAGE_FORMATS` (which the config's ``save_ext`` check also reads).
SINKS: dict[str, SinkFactory] = {
    ext: functools.partial(SINK_KINDS[fmt.kind], **fmt.options)
    for ext, fmt in IMAGE_FORMATS.items()
}


def sink_factory(path: Path) -> SinkFactory:
    """The :data:`SINKS` entry for ``path``'s extension (OutputError naming the known ones)."""
    factory = SINKS.get(path.suffix.lower().lstrip("."))
    if factory is None:
        known = list(SINKS)
        raise OutputError(
            f"{path}: unsupported image extension (use {', '.join(known[:-1])} or {known[-1]})"
        )
    return factory


def open_sinks(
    out_path: Path | None,
    width: int,
    height: int,
    *,
    mpp: float | None,
    exports: Mapping[Path, SinkFactory] | None = None,
    keep_image: bool = False,
    meta: str | None = None,
) -> list[Sink]:
    """The sinks for one saved image of ``width`` x ``height`` px, in the order their files are
    reported: the image held in memory (when ``keep_image`` and no output holds it anyway),
    ``out_path`` in its extension's format, then each of ``exports`` (path -> the sink factory
    of an image :class:`Export`, e.g. the pyramidal TIFF); every file carries ``meta``."""
    factory = sink_factory(out_path) if out_path is not None else None
    sinks: list[Sink] = []
    try:
        if out_path is not None and factory is not None:
            sinks.append(factory(out_path, width, height, mpp=mpp, meta=meta))
        if keep_image and not any(s.image is not None for s in sinks):
            sinks.insert(0, ArraySink(width, height))
        for path, export in (exports or {}).items():
            sinks.append(export(path, width, height, mpp=mpp, meta=meta))
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return sinks


# ============================================================================================
# GeoJSON for QuPath
# ============================================================================================


def _json_numbers(values: np.ndarray) -> np.ndarray:
    """Shortest round-trip decimal strings (vectorised, StringDType); NaN/inf → null."""
    arr = np.asarray(values)
    out = arr.astype(np.dtypes.StringDType())
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            out[bad] = "null"
    return out


def write_attention_geojson(
    l0_coords: np.ndarray,
    scores: np.ndarray,
    patch_size_l0: int | Sequence[int],
    path: str | os.PathLike[str],
    *,
    chunk: int = 100_000,
) -> Path:
    """Write patch squares with their attention as a GeoJSON FeatureCollection for QuPath.

    One Feature per patch: a closed level-0 Polygon and properties
    ``{"objectType": "tile", "measurements": {"attention": s, "percentile": p}}`` (p = CLAM
    rank percentile, 0-100), which QuPath shows as measurement maps. Text is built with numpy
    string operations in chunks and written atomically.
    """
    coords = np.asarray(l0_coords, dtype=np.int64).reshape(-1, 2)
    flat = np.asarray(scores).reshape(-1)
    if len(flat) != len(coords):
        raise ValueError(f"{len(flat)} scores for {len(coords)} coords; they must pair up")
    pw, ph = (int(v) for v in np.broadcast_to(np.asarray(patch_size_l0), (2,)))
    pct = to_percentiles(flat) if len(flat) and not np.isnan(flat).any() else flat * np.nan
    out = Path(path)
    with atomic_path(out, durable=False) as tmp:
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write('{"type": "FeatureCollection", "features": [\n')
                for start in range(0, len(coords), chunk):  # chunks of patches, not single ones
                    if start:
                        fh.write(",\n")
                    end = start + chunk
                    fh.write(_features(coords[start:end], flat[start:end], pct[start:end], pw, ph))
                fh.write("\n]}\n")
        except OSError as err:
            raise OutputError(f"{out}: cannot write; {os_error_advice(out, err)}") from None
    return out


def _features(c: np.ndarray, s: np.ndarray, p: np.ndarray, pw: int, ph: int) -> str:
    """GeoJSON Features of patches ``c`` (level-0 corners) with attention ``s`` and percentile
    ``p``, joined by ``,\\n``, built with numpy string operations."""
    x0, y0 = _json_numbers(c[:, 0]), _json_numbers(c[:, 1])
    x1, y1 = _json_numbers(c[:, 0] + pw), _json_numbers(c[:, 1] + ph)
    points = [
        "[" + x + ", " + y + "]" for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))
    ]
    ring = "[" + functools.reduce(lambda a, b: a + ", " + b, points) + "]"
    feats = (
        '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": ['
        + ring
        + ']}, "properties": {"objectType": "tile", "measurements": {"attention": '
        + _json_numbers(s)
        + ', "percentile": '
        + _json_numbers(p)
        + "}}}"
    )
    return ",\n".join(feats.tolist())


# ============================================================================================
# Exports: files beside the production heatmap
# ============================================================================================


@dataclass(frozen=True)
class Export:
    """A file written beside the saved heatmap, from the same render or the same scores.

    ``sink`` receives the saved image's strips as the render streams them (a pyramid: no
    second render); ``write(l0_coords, scores, patch_size_l0, path)`` gets the drawn patches
    (an annotation file). Exactly one of the two is set.
    """

    sink: SinkFactory | None = None
    write: Callable[[np.ndarray, np.ndarray, int, Path], Path] | None = None


#: Exports by name (the heatmap stage switches each on from ``runner_arguments``, see
#: :mod:`clam_heat.stages.exports`): a new export (say attention to Zarr) is a writer and one
#: line here.
EXPORTS: dict[str, Export] = {
    "pyramid_tiff": Export(sink=functools.partial(TiffSink, pyramid=True)),
    "geojson": Export(write=write_attention_geojson),
}
