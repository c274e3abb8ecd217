"""Colormaps as uint8 lookup tables: the common ones from a data file, any other from matplotlib.

A heatmap colours each score through a colormap's table (N colours, then under, over and bad),
exactly as CLAM's ``(cmap(v) * 255).astype(uint8)`` does. Importing matplotlib to build that
table costs ~0.15 CPU s in every process that draws, more than drawing a small slide's map, so
the tables of :data:`SHIPPED_CMAPS` are stored in ``colormaps.json`` beside this module: made
from matplotlib by ``python -m clam_heat.colormaps`` and compared with matplotlib by the tests.
Any other matplotlib name is built from matplotlib on first use. This module imports nothing
heavy, so the config can validate a name without loading matplotlib.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SHIPPED_CMAPS", "colormap_lut", "matplotlib_lut"]

#: Colormaps whose tables ship with clam-heat (CLAM's ``jet`` and the usual diverging and
#: perceptual ones); every matplotlib release has them.
SHIPPED_CMAPS: frozenset[str] = frozenset(
    {"jet", "coolwarm", "viridis", "plasma", "inferno", "magma", "RdBu_r", "bwr", "hot", "gray"}
)

#: ``{name: hex of the (N + 3, 3) uint8 table}`` for each of :data:`SHIPPED_CMAPS`.
SHIPPED_FILE = Path(__file__).with_name("colormaps.json")


@functools.lru_cache(maxsize=32)
def colormap_lut(cmap: str) -> np.ndarray:
    """A colormap as a read-only (N + 3, 3) uint8 RGB table: N colours, under, over, bad.

    Entries are ``uint8(rgba * 255)`` (truncation, as CLAM's ``(cmap(v) * 255).astype(uint8)``);
    shipped names come from ``colormaps.json``, others from matplotlib (:func:`matplotlib_lut`).

    >>> lut = colormap_lut("gray")
    >>> lut.shape, lut[0].tolist(), lut[255].tolist()
    ((259, 3), [0, 0, 0], [255, 255, 255])
    """
    if cmap not in SHIPPED_CMAPS:
        return matplotlib_lut(cmap)
    import numpy as np

    lut = np.frombuffer(bytes.fromhex(_shipped()[cmap]), dtype=np.uint8).reshape(-1, 3)
    return lut  # frombuffer over bytes: already read-only


@functools.cache
def _shipped() -> dict[str, str]:
    return json.loads(SHIPPED_FILE.read_text(encoding="utf-8"))


def matplotlib_lut(cmap: str) -> np.ndarray:
    """:func:`colormap_lut` built from matplotlib; an unknown name is a ValueError."""
    import matplotlib
    import numpy as np

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap name") from None
    n = int(cm.N)
    rgba = np.concatenate(
        [cm(np.arange(n)), [cm.get_under()], [cm.get_over()], [cm.get_bad()]], axis=0
    )
    lut = (np.asarray(rgba, dtype=np.float64) * 255)[:, :3].astype(np.uint8)
    lut.flags.writeable = False
    return lut


def write_shipped(path: Path = SHIPPED_FILE) -> Path:
    """(Re)make ``colormaps.json`` from the installed matplotlib."""
    tables = {name: matplotlib_lut(name).tobytes().hex() for name in sorted(SHIPPED_CMAPS)}
    path.write_text(json.dumps(tables, indent=0) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_shipped())
