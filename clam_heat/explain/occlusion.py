"""``occlusion``: how much the class logit drops when a patch (or a spatial group of patches)
is left out of the bag, through Captum's feature ablation.

The ablated input is a keep-mask over the patches (1 = in the bag), its baseline 0 = left out,
and the feature mask gives each patch, or each ``occlusion_group`` x ``occlusion_group`` block
of the patch grid for bags above ``occlusion_exact_limit`` patches, its own group; a group's
score is ``logit(bag) - logit(bag without the group)``, shared by its patches. Leaving patches
out is :meth:`~clam_heat.explain.bag.Bag.masked_logits`: exact reruns, or the closed form for
linear heads, many subsets per pass.
"""

from __future__ import annotations

import numpy as np
import torch

from .bag import Attribution, Bag, ExplainOptions
from .gradients import _captum


def patch_groups(
    coords: np.ndarray | None, patch_size: int | None, n: int, group: int
) -> np.ndarray:
    """(N,) int64 group id of each patch: its ``group`` x ``group`` block of the patch grid
    (numbered in first-seen order), or one group per patch when ``group`` is 1 or no
    coordinates are known.

    >>> patch_groups(np.array([[0, 0], [256, 0], [512, 0], [0, 256]]), 256, 4, 2)
    array([0, 0, 1, 0])
    """
    if group <= 1 or coords is None or not patch_size:
        return np.arange(n, dtype=np.int64)
    cells = np.asarray(coords, dtype=np.int64) // (int(patch_size) * group)
    _, first, inverse = np.unique(cells, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first, kind="stable"), kind="stable")  # ids by first patch
    return order[inverse.reshape(-1)].astype(np.int64)


def attribute(bag: Bag, target: int, options: ExplainOptions, method: str) -> Attribution:
    attr = _captum()
    group = 1 if bag.n <= options.occlusion_exact_limit else options.occlusion_group
    groups = patch_groups(bag.coords, bag.patch_size, bag.n, group)
    keep = torch.ones(1, bag.n, dtype=bag.features.dtype, device=bag.features.device)
    mask = torch.from_numpy(groups).to(bag.features.device).unsqueeze(0)
    with torch.no_grad():
        result = attr.FeatureAblation(bag.masked_logits).attribute(
            keep,
            baselines=0.0,
            target=target,
            feature_mask=mask,
            perturbations_per_eval=max(1, options.batch),
        )
    scores = result[0].detach().float().cpu().numpy().astype(np.float32)
    return Attribution(scores, target, {"occlusion_group": group, "groups": int(groups.max()) + 1})
