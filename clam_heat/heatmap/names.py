"""CLAM's heatmap file names (spec §6.8).

On-disk names; they will move to :mod:`clam_heat.rows` (the one home of every output name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["blockmap_name", "orig_name", "production_heatmap_name"]


def production_heatmap_name(slide_id: str, heatmap_args: Mapping[str, Any], overlap: float) -> str:
    """CLAM's production heatmap file name.

    >>> args = dict(use_roi=False, blur=False, use_ref_scores=True, blank_canvas=False,
    ...             alpha=0.4, vis_level=1, binarize=False, binary_thresh=-1, save_ext="jpg")
    >>> production_heatmap_name("C3L-01663-21", args, 0.5)
    'C3L-01663-21_0.5_roi_0_blur_0_rs_1_bc_0_a_0.4_l_1_bi_0_-1.0.jpg'
    """
    keys = (
        "use_roi",
        "blur",
        "use_ref_scores",
        "blank_canvas",
        "alpha",
        "vis_level",
        "binarize",
        "binary_thresh",
        "save_ext",
    )
    missing = [k for k in keys if k not in heatmap_args]
    if missing:
        raise ValueError(f"heatmap_arguments lacks {', '.join(missing)} (needed for the file name)")
    a = heatmap_args
    return (
        f"{slide_id}_{float(overlap)}_roi_{int(a['use_roi'])}_blur_{int(a['blur'])}"
        f"_rs_{int(a['use_ref_scores'])}_bc_{int(a['blank_canvas'])}_a_{float(a['alpha'])}"
        f"_l_{int(a['vis_level'])}_bi_{int(a['binarize'])}_{float(a['binary_thresh'])}"
        f".{a['save_ext']}"
    )


def blockmap_name(slide_id: str) -> str:
    """The coarse heatmap's file name (in the raw results folder).

    >>> blockmap_name("s1")
    's1_blockmap.png'
    """
    return f"{slide_id}_blockmap.png"


def orig_name(slide_id: str, level: int, ext: str) -> str:
    """The plain slide image's file name.

    >>> orig_name("s1", 2, "jpg")
    's1_orig_2.jpg'
    """
    return f"{slide_id}_orig_{int(level)}.{ext}"
