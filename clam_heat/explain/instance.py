"""``instance``: per-patch logits of models that score each patch alone (CLAM's MIL_fc and
MIL_fc_mc, any model declaring ``instance_logits``): the class logit a patch gets by itself."""

from __future__ import annotations

import numpy as np
import torch

from .bag import Attribution, Bag, ExplainOptions


@torch.no_grad()
def attribute(bag: Bag, target: int, options: ExplainOptions, method: str) -> Attribution:
    logits = bag.spec.instance_logits(bag.model, bag.features)  # type: ignore[union-attr]
    return Attribution(logits[:, target].float().cpu().numpy().astype(np.float32), target)
