"""Deterministic demo data: pyramidal H&E-like TIFFs, TRIDENT features and a CLAM checkpoint.

Everything is generated from a seed, so tests, ``clam-heat demo`` and benchmarks get the same
files every time without shipping scanner data. The slide's content is *analytic*: tissue and
tumour are the zero super-level sets of smooth fields defined in level-0 pixels
(:mod:`.shapes`), which gives

* streaming generation (:mod:`.slides`): every tile of every level is rendered from the fields
  evaluated at that tile's own level-0 coordinates, so a 40000x30000 slide never exists in
  memory as a whole;
* ground truth for free: :meth:`DemoSlide.tissue_mask` and :meth:`DemoSlide.tumour_mask`
  rasterise the same fields on any downsample grid, and features (:mod:`.features`) know which
  patches are tumour.

:mod:`.checkpoint` trains the CLAM_SB the demo config uses, :mod:`.project` writes the whole
folder. Coordinate frames follow :mod:`clam_heat.slide`: ``l0_`` values are level-0 pixels,
``l_`` values are pixels of the level being written.
"""

from __future__ import annotations

from .checkpoint import MAX_TRAIN_BAG, STEPS_PER_SECOND, train_demo_checkpoint
from .features import FEATURE_RANK, TUMOUR_SHIFT, DemoBag, level0_magnification, make_demo_features
from .project import DEMO_FORMAT_VERSION, DEMO_SIZES, DemoProject, make_demo_project
from .shapes import LEVEL_DOWNSAMPLES, DemoSlide
from .slides import make_demo_slide

__all__ = [
    "DEMO_FORMAT_VERSION",
    "DEMO_SIZES",
    "FEATURE_RANK",
    "LEVEL_DOWNSAMPLES",
    "MAX_TRAIN_BAG",
    "STEPS_PER_SECOND",
    "TUMOUR_SHIFT",
    "DemoBag",
    "DemoProject",
    "DemoSlide",
    "level0_magnification",
    "make_demo_features",
    "make_demo_project",
    "make_demo_slide",
    "train_demo_checkpoint",
]
