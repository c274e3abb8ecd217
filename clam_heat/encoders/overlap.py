"""CLAM's overlapping pass (``calc_heatmap``): encode patches and score them batch by batch.

:func:`attention_logits` gives a CLAM model's raw per-patch attention (``attention_only``);
:func:`overlap_scores` runs it over the overlapping grid, optionally as percentiles of the
blockmap's scores (``use_ref_scores``), so the pass never holds all features at once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, FeatureError
from ..heatmap import percentile_of_scores
from .build import Encoder
from .dataset import encode_patches


def attention_logits(
    model: nn.Module, features: np.ndarray | torch.Tensor, *, branch: int | None
) -> np.ndarray:
    """Raw per-patch attention (N,) float32 of a CLAM model, no softmax (``attention_only``).

    ``features`` (N, E). The model returns (K, N); K == 1 (CLAM_SB) gives row 0, K > 1 (CLAM_MB)
    needs ``branch`` (the predicted class, as CLAM draws ``A[Y_hat]``). A patch's logit does not
    depend on the other patches, so batches can be scored separately.
    """
    first = next(model.parameters(), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if features.ndim != 2:
        raise FeatureError(f"features must be 2-D (N, E), got shape {tuple(features.shape)}")
    embed_dim = getattr(model, "embed_dim", None)
    if embed_dim is not None and features.shape[1] != embed_dim:
        raise FeatureError(
            f"feature width {features.shape[1]} does not match model_arguments.embed_dim "
            f"{embed_dim} (the encoder differs from the one the checkpoint was trained on)"
        )
    with torch.inference_mode():
        h = features.to(model_device, dtype=torch.float32)
        try:
            raw = model(h, attention_only=True)
        except TypeError:
            raise CheckpointError(
                f"{type(model).__name__} has no per-patch attention (attention_only); "
                "overlap heatmaps need a CLAM model (model_type clam_sb or clam_mb)"
            ) from None
        raw = raw.reshape(-1, h.shape[0])
        if raw.shape[0] == 1:
            row = raw[0]
        elif branch is None or not 0 <= branch < raw.shape[0]:
            raise CheckpointError(
                f"model has {raw.shape[0]} attention branches; branch must be the predicted "
                f"class in 0..{raw.shape[0] - 1}, got {branch}"
            )
        else:
            row = raw[branch]
        return row.float().cpu().numpy().astype(np.float32)


def overlap_scores(
    slide_path: str | Path,
    coords_l0: np.ndarray,
    *,
    encoder: Encoder,
    model: nn.Module,
    branch: int | None,
    reference_scores: np.ndarray | None,
    **read: Any,
) -> np.ndarray:
    """CLAM's overlapping pass: encode + raw attention per patch; returns (N,) float32.

    ``read`` holds :func:`~.dataset.encode_patches`' patch-reading options (``patch_level``,
    ``patch_size`` required; ``custom_downsample``, ``batch_size``, ``num_workers``, ``device``,
    ``amp``, ``mp_context``, ``progress``), passed on as they are. Features are scored batch by
    batch and dropped, so memory stays O(batch). With ``reference_scores`` (the blockmap's raw
    attention, any shape) each score becomes its percentile (0..100) among them, CLAM's
    ``use_ref_scores``; without, the raw logits are kept.
    """
    if reference_scores is not None and np.asarray(reference_scores).size == 0:
        raise FeatureError("reference_scores is empty (the blockmap has no patches)")
    head = functools.partial(attention_logits, model, branch=branch)
    scores = encode_patches(slide_path, coords_l0, encoder=encoder, head=head, **read)
    if reference_scores is not None:
        reference = np.asarray(reference_scores)
        scores = percentile_of_scores(scores, reference).astype(np.float32)
    return scores
