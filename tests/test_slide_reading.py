"""Pixels read through OpenSlide: clam-heat's raw-buffer read equals openslide-python's own.

``OpenSlideSlide.read_region`` fills a uint32 buffer with ``openslide_read_region`` and unpacks
it with numpy (``argb_to_rgb``) instead of going through openslide-python's PIL image; the
oracle here is openslide-python itself: its C converter for every (alpha, channel) pair, and
its ``read_region`` on real files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from openslide import _convert

from clam_heat import slide as slide_module
from clam_heat.errors import SlideError
from clam_heat.slide import OpenSlideSlide, argb_to_rgb


def test_argb_to_rgb_equals_openslides_converter_for_every_alpha_and_channel_value() -> None:
    # catches: channels swapped, un-premultiplying rounded instead of truncated, alpha-0 pixels
    # zeroed or alpha-255 pixels divided (each changes some of these 65,536 pixels)
    alpha = np.repeat(np.arange(256, dtype=np.uint32), 256)
    value = np.tile(np.arange(256, dtype=np.uint32), 256)
    argb = (alpha << 24) | (value << 16) | (((value * 7) % 256) << 8) | (255 - value)
    expected = argb.copy()
    _convert.argb2rgba(expected)  # in place, to RGBA bytes
    rgba = expected.view(np.uint8).reshape(-1, 4)
    np.testing.assert_array_equal(argb_to_rgb(argb), rgba[:, :3])


def _openslide_rgb(
    path: Path, xy: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        return np.asarray(osr.read_region(xy, level, size))[..., :3]


@pytest.mark.parametrize(
    ("name", "xy", "level", "size"),
    [
        ("real", (700, 900), 0, (256, 256)),
        ("real", (2100, 2900), 0, (300, 200)),  # runs off the right and bottom: transparent
        ("real", (-50, -30), 0, (120, 90)),  # starts before the slide
        ("small.svs", (10, 20), 0, (64, 48)),
        ("boxes.tiff", (0, 0), 1, (60, 60)),
    ],
)
def test_read_region_equals_openslide_python_on_real_files(
    name: str,
    xy: tuple[int, int],
    level: int,
    size: tuple[int, int],
    real_slide: Path,
    openslide_fixtures: Path,
) -> None:
    # catches: a wrong buffer shape (w and h swapped), reading the wrong level or offset
    path = real_slide if name == "real" else openslide_fixtures / name
    with OpenSlideSlide(path) as slide:
        got = slide.read_region(xy, level, size)
    assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _openslide_rgb(path, xy, level, size))


def test_without_the_raw_reader_the_public_path_gives_the_same_pixels(
    real_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fallback for an openslide-python without _read_region (or a big-endian host)
    with OpenSlideSlide(real_slide) as slide:
        fast = slide.read_region((2100, 2900), 0, (300, 200))
        monkeypatch.setattr(slide_module, "_argb_reader", lambda: (None, None))
        public = slide.read_region((2100, 2900), 0, (300, 200))
    np.testing.assert_array_equal(fast, public)
    assert (fast[-1, -1] == 0).all() and fast[0, 0].any()  # off the slide is black


def test_a_failed_raw_read_is_a_one_line_slide_error(openslide_fixtures: Path) -> None:
    # OpenSlide's own unreadable fixture: the header opens, the tile data is corrupt
    with (
        OpenSlideSlide(openslide_fixtures / "unreadable.svs") as slide,
        pytest.raises(SlideError, match="reading pixels failed at level 0") as err,
    ):
        slide.read_region((0, 0), 0, (16, 16))
    assert "\n" not in str(err.value) and "unreadable.svs" in str(err.value)
