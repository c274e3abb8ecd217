"""The CPU-thread budget of this process, for the stages that run their own small thread pools.

A lone process may use two helper threads (tile rendering, patch reading); each of N local
workers is limited to its share of the cores (:mod:`clam_heat.executors` sets OpenCV's thread
count, with torch's and the BLAS variables, to ``cores // N``), so N workers never run 2N helper
threads on N cores. OpenCV's count is read because it is set in every worker and in a plain
process defaults to the number of cores.
"""

from __future__ import annotations

import cv2

__all__ = ["helper_threads"]


def helper_threads(most: int = 2) -> int:
    """Threads a stage may use for its own pool: at most ``most``, at least 1.

    >>> 1 <= helper_threads() <= 2
    True
    """
    return min(most, max(1, cv2.getNumThreads()))
