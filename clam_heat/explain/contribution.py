"""``contribution``: exact signed per-patch shares of a class logit, for linear heads.

When the bag logit is ``W_c . concat_k(sum_i a_ki h_i) + b_c`` (softmax attention ``a``,
pooled embeddings ``h``: CLAM_SB, CLAM_MB, ABMIL, any model declaring ``linear_head``), patch
i contributes ``sum_k a_ki (W_c,k . h_i)``, and the contributions sum to the logit minus the
bias exactly (Additive MIL's decomposition). Computed in float64; the relative error of that
sum is stored with the map (``sum_error``).
"""

from __future__ import annotations

import numpy as np
import torch

from .bag import Attribution, Bag, ExplainOptions


@torch.no_grad()
def contributions(bag: Bag, target: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N,) float64 contributions to logit ``target``, that class's bias (float64), and the
    logit pooled the model's way (pooled features, then the head) from the same pass."""
    head = bag.spec.linear_head  # type: ignore[union-attr]
    raw, embedded, w, b = head(bag.model, bag.features)
    weights = torch.softmax(raw.double(), dim=1)  # (K, N)
    k = weights.shape[0]
    w_c = w[target].double().reshape(k, -1)  # (K, E)
    per_patch = (embedded.double() @ w_c.T) * weights.T  # (N, K)
    pooled = torch.softmax(raw, dim=1) @ embedded  # (K, E) in the model's dtype
    logit = float((pooled.reshape(-1) * w[target]).sum() + b[target])
    return per_patch.sum(dim=1), b[target].double(), logit


@torch.no_grad()
def attribute(bag: Bag, target: int, options: ExplainOptions, method: str) -> Attribution:
    scores, bias, logit = contributions(bag, target)
    total = float(scores.sum())
    error = abs(total - (logit - float(bias))) / max(abs(logit - float(bias)), 1e-12)
    return Attribution(
        scores.float().cpu().numpy().astype(np.float32),
        target,
        {"bias": float(bias), "logit": logit, "sum_error": error},
    )
