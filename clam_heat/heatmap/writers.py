"""The sinks a rendered heatmap is pushed to (JPEG, PNG, TIFF, pyramidal TIFF) and the
attention GeoJSON writer. Writers hold no CLAM rule: they receive finished pixels."""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import OutputError
from .maths import to_percentiles

__all__ = ["write_attention_geojson"]

#: TIFF tile side of the pyramidal overlay (and of plain .tiff outputs).
TIFF_TILE = 256
#: Largest image side libjpeg can encode.
JPEG_MAX_SIDE = 65500
#: JPEG quality of the pyramidal overlay's tiles.
PYRAMID_JPEG_QUALITY = 90


def _atomic_target(path: Path) -> Path:
    """A unique temp name beside ``path`` that keeps its extension (``.name.tmp-XXXX.jpg``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    except OSError as err:
        raise OutputError(f"{path}: cannot write here ({err.strerror or err})") from None
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot move the finished file into place ({err})") from None


def _write_bytes(path: Path, data: bytes | memoryview | np.ndarray) -> None:
    tmp = _atomic_target(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: writing failed ({err.strerror or err})") from None
    _commit(tmp, path)


def _image_format(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext in ("jpg", "jpeg", "png", "tif", "tiff"):
        return ext
    raise OutputError(f"{path}: unsupported image extension (use jpg, jpeg, png, tif or tiff)")


def _encode(img: np.ndarray, fmt: str) -> bytes:
    """Encode like CLAM's PIL save: ``jpg`` → quality 100, ``jpeg`` → PIL's default 75 (both
    4:2:0, byte-identical to PIL's libjpeg output), ``png`` → zlib level 6."""
    import imagecodecs

    if fmt == "jpg":
        return bytes(imagecodecs.jpeg8_encode(img, level=100))
    if fmt == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(img, level=75))
    return bytes(imagecodecs.png_encode(img, level=6))


class _Sink:
    """Receives the saved image strip by strip (rows in order)."""

    def push(self, y0: int, strip: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> Path | None:  # pragma: no cover - interface
        raise NotImplementedError

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Drop partial output after a failure."""


class _ArraySink(_Sink):
    """Holds the whole image (JPEG/PNG need it); optionally encodes it to ``path``."""

    def __init__(self, width: int, height: int, path: Path | None, fmt: str = "") -> None:
        self.image = np.empty((height, width, 3), dtype=np.uint8)
        self.path, self.fmt = path, fmt

    def strip_view(self, y0: int, y1: int) -> np.ndarray:
        return self.image[y0:y1]

    def push(self, y0: int, strip: np.ndarray) -> None:
        view = self.image[y0 : y0 + strip.shape[0]]
        if not np.shares_memory(view, strip):
            view[...] = strip

    def close(self) -> Path | None:
        if self.path is None:
            return None
        _write_bytes(self.path, _encode(self.image, self.fmt))
        return self.path


class _TiffSink(_Sink):
    """Streams strips into a tiled TIFF on a writer thread; with ``pyramid`` also writes
    reduced levels (2x block means, separate pages with subfiletype=1, not SubIFDs).

    Memory stays at a few tile rows: each reduced level is spooled to a raw temp file while
    the level above is written, then streamed back for its own page.
    """

    def __init__(
        self, path: Path, width: int, height: int, *, mpp: float | None, pyramid: bool
    ) -> None:
        self.path, self.width, self.height = path, width, height
        self.mpp, self.pyramid = mpp, pyramid
        self.tmp = _atomic_target(path)
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
        _commit(self.tmp, self.path)
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
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.level-")
        os.close(fd)
        spool = Path(name)
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
        tw.write(tiles, **kwargs)


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


def _make_sinks(
    out_path: Path | None,
    pyramid_tiff_path: Path | None,
    width: int,
    height: int,
    out_mpp: float | None,
    keep_image: bool,
) -> list[_Sink]:
    sinks: list[_Sink] = []
    fmt = _image_format(out_path) if out_path is not None else ""
    if fmt in ("jpg", "jpeg") and max(width, height) > JPEG_MAX_SIDE:
        raise OutputError(
            f"{out_path}: a {width}x{height} px image is too large for JPEG (max "
            f"{JPEG_MAX_SIDE} px a side); use save_ext png or tiff, a coarser vis_level or "
            "custom_downsample"
        )
    if keep_image or fmt in ("jpg", "jpeg", "png"):
        path = out_path if fmt in ("jpg", "jpeg", "png") else None
        sinks.append(_ArraySink(width, height, path, fmt))
    try:
        if fmt in ("tif", "tiff"):
            assert out_path is not None
            sinks.append(_TiffSink(out_path, width, height, mpp=out_mpp, pyramid=False))
        if pyramid_tiff_path is not None:
            sinks.append(_TiffSink(pyramid_tiff_path, width, height, mpp=out_mpp, pyramid=True))
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
    tmp = _atomic_target(out)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"type": "FeatureCollection", "features": [\n')
            for start in range(0, len(coords), chunk):  # chunks of patches, not single ones
                c = coords[start : start + chunk]
                x0, y0 = _json_numbers(c[:, 0]), _json_numbers(c[:, 1])
                x1, y1 = _json_numbers(c[:, 0] + pw), _json_numbers(c[:, 1] + ph)
                s = _json_numbers(flat[start : start + chunk])
                p = _json_numbers(pct[start : start + chunk])
                ring = (
                    "[["
                    + x0
                    + ", "
                    + y0
                    + "], ["
                    + x1
                    + ", "
                    + y0
                    + "], ["
                    + x1
                    + ", "
                    + y1
                    + "], ["
                    + x0
                    + ", "
                    + y1
                    + "], ["
                    + x0
                    + ", "
                    + y0
                    + "]]"
                )
                feats = (
                    '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": ['
                    + ring
                    + ']}, "properties": {"objectType": "tile", "measurements": {"attention": '
                    + s
                    + ', "percentile": '
                    + p
                    + "}}}"
                )
                if start:
                    fh.write(",\n")
                fh.write(",\n".join(feats.tolist()))
            fh.write("\n]}\n")
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: writing failed ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, out)
    return out
