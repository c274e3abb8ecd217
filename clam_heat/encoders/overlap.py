"""CLAM's overlapping pass (``calc_heatmap``) for every registered attention model.

:func:`overlap_scores` scores the overlapping grid with the model's own reduction
(:func:`clam_heat.models.inference.attention_logits`), optionally as percentiles of the
blockmap's scores (``use_ref_scores``). Models whose patch scores depend on that patch alone
(CLAM, ABMIL) are scored batch by batch, so the pass never holds all features at once; the
others (TransMIL, DSMIL, ILRA, RRT, Transformer) see the whole bag, as in their forward pass.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import FeatureError
from ..heatmap.maths import percentile_of_scores
from ..models.inference import attention_logits, needs_whole_bag
from .build import Encoder
from .dataset import encode_patches


def overlap_scores(
    slide_path: str | Path,
    coords_l0: np.ndarray,
    *,
    encoder: Encoder,
    model: nn.Module,
    branch: int | None,
    reference_scores: np.ndarray | None,
    patch_level: int,
    patch_size: int,
    custom_downsample: float = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """CLAM's overlapping pass: encode + raw attention per patch; returns (N,) float32.

    The patch-reading options (``patch_level`` ... ``device``) are
    :func:`~.dataset.encode_patches`' own, passed on as they are (``device`` None: the
    encoder's). Features are scored batch by batch and dropped, so memory stays O(batch). With
    ``reference_scores`` (the blockmap's raw attention, any shape) each score becomes its
    percentile (0..100) among them, CLAM's ``use_ref_scores``; without, the raw logits are kept.
    Whole-bag models rank the overlap bag's scores among themselves instead (their scores are
    only comparable within one bag).
    """
    encode = functools.partial(
        encode_patches,
        slide_path,
        coords_l0,
        encoder=encoder,
        patch_level=patch_level,
        patch_size=patch_size,
        custom_downsample=custom_downsample,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        device=device,
    )
    if reference_scores is not None and np.asarray(reference_scores).size == 0:
        raise FeatureError("reference_scores is empty (the blockmap has no patches)")
    if needs_whole_bag(model):
        features = encode()
        scores = attention_logits(model, features, branch=branch)
        if reference_scores is not None:
            # A whole-bag model's scores depend on the bag, and the overlapping grid is another
            # (larger) bag than the blockmap's: its scores are not on the blockmap's scale, so
            # rank them within their own bag instead (CLAM's rule applied to this bag).
            return percentile_of_scores(scores, scores).astype(np.float32)
    else:
        head = functools.partial(attention_logits, model, branch=branch)
        scores = encode(head=head)
    if reference_scores is not None:
        reference = np.asarray(reference_scores)
        scores = percentile_of_scores(scores, reference).astype(np.float32)
    return scores
