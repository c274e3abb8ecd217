"""``gradient_x_input`` and ``integrated_gradients`` through Captum, summed over features.

Both methods want one number per patch: the feature-summed attribution. Captum attributes a
per-patch gate ``g`` (N,) instead of the (N, D) features: the model sees
``baseline + g[:, None] * (features - baseline)``, so by the chain rule
``d logit / d g_i = sum_d (x_id - b_id) * d logit / d z_id``. At ``g = 1`` with a zero baseline
that is gradient x input summed over features; integrated along ``g = alpha * 1`` (baseline
``g = 0``) it is integrated gradients on the same straight path from the baseline bag,
summed over features. The answers are equal to attributing the features and summing, but
Captum's bookkeeping (scaled inputs, gradients, their running sum and the product with the
input difference) is (N,) instead of (N, D): at 100,000 x 1,024 that is four bag-sized
tensors fewer, and each step costs one forward and one backward of the model.

One step per forward (``internal_batch_size=1``): memory stays that of one bag and its
gradient. The completeness gap (sum of attributions minus the logit difference) is stored
with the map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .bag import Attribution, Bag, ExplainOptions


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError:  # pragma: no cover - captum is a declared dependency of the extra
        raise ConfigError(
            "heatmap_arguments.method: gradient methods and occlusion need Captum "
            "(pip install 'clam-heat[explain]')"
        ) from None
    return captum.attr


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradients for the weights while attributing: only the input's are needed, which
    skips one weight-gradient matmul per layer in every backward pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _GatedBag:
    """The bag's class logits as a function of per-patch gates (see the module docstring)."""

    def __init__(self, bag: Bag, baseline: torch.Tensor | None) -> None:
        self.bag = bag
        self.baseline = baseline  # (1, D) or None for zeros
        features = bag.features.detach()
        self.difference = features if baseline is None else features - baseline

    def __call__(self, gates: torch.Tensor) -> torch.Tensor:
        """(B, C) logits for B gate vectors (B, N), one forward each."""
        return torch.stack([self.bag.logits(self.bag_at(g)) for g in gates])

    def bag_at(self, gates: torch.Tensor) -> torch.Tensor:
        """``baseline + gates[:, None] * (features - baseline)``, (N, D)."""
        column = gates.unsqueeze(1)
        if self.baseline is None:
            return column * self.difference
        return torch.addcmul(self.baseline, column, self.difference)


def baseline_row(features: torch.Tensor, kind: str) -> torch.Tensor | None:
    """The baseline patch (1, D) every patch starts from: None for zeros, else the bag's mean."""
    return features.mean(dim=0, keepdim=True) if kind == "mean" else None


def attribute(bag: Bag, target: int, options: ExplainOptions, method: str) -> Attribution:
    attr = _captum()
    features = bag.features.detach()
    ones = torch.ones((1, bag.n), dtype=features.dtype, device=features.device)
    with torch.enable_grad(), _frozen(bag.model):
        if method == "gradient_x_input":
            gated = _GatedBag(bag, None)
            result = attr.InputXGradient(gated).attribute(ones.requires_grad_(), target=target)
            return Attribution(_numpy(result[0]), target)
        gated = _GatedBag(bag, baseline_row(features, options.ig_baseline))
        result = attr.IntegratedGradients(gated).attribute(
            ones,
            baselines=0.0,
            target=target,
            n_steps=options.ig_steps,
            method="riemann_middle",  # midpoints: robust to the kinks of ReLU and max
            internal_batch_size=1,
        )
    scores = result[0]
    with torch.no_grad():
        difference = float(gated(ones)[0, target] - gated(torch.zeros_like(ones))[0, target])
    gap = float(scores.double().sum()) - difference
    return Attribution(
        _numpy(scores),
        target,
        {
            "ig_steps": options.ig_steps,
            "ig_baseline": options.ig_baseline,
            "completeness_delta": gap,
            "completeness_error": abs(gap) / max(abs(difference), 1e-12),
            "logit_difference": difference,
        },
    )


def _numpy(scores: torch.Tensor) -> np.ndarray:
    return scores.detach().float().cpu().numpy().astype(np.float32)
