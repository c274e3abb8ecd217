"""Compatibility face: tissue segmentation lives in :mod:`clam_heat.tissue`.

Kept so ``from clam_heat.segmentation import ...`` (bench scripts, older code) keeps working;
new code imports :mod:`clam_heat.tissue`.
"""

from __future__ import annotations

from .tissue import *  # noqa: F403 - the same public names, one definition
from .tissue import __all__  # noqa: F401
