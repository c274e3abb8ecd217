"""Giving freed memory back to the operating system.

glibc keeps the memory of freed buffers for reuse instead of returning it, and after a large
buffer is freed it raises its own threshold so that later buffers of that size come from the
heap too. A heatmap stage at vis_level 0 frees hundreds of MB of tiles and rows that way, and
the process then carried them through every later stage and row as resident memory nobody used.
:func:`release_freed_memory` asks glibc to return them (``malloc_trim``); elsewhere it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS; True when the C library did (glibc only).

    >>> isinstance(release_freed_memory(), bool)
    True
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
