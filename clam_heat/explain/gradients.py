"""``gradient_x_input`` and ``integrated_gradients`` through Captum, summed over features.

The bag is one Captum input of shape (1, N, D) and the forward runs the model once per bag of
a batch, so any model works unchanged. Integrated gradients integrate the class logit's
gradient along the straight path from a baseline bag (zeros, or every patch set to the bag's
mean feature) with ``ig_steps`` midpoint steps, one step per forward (memory stays that
of one bag and its gradient); Captum's completeness delta (sum of attributions minus the logit
difference) is stored with the map.
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


def baseline_of(features: torch.Tensor, kind: str) -> torch.Tensor:
    """The integrated-gradients baseline bag: zeros, or every patch at the bag's mean."""
    if kind == "mean":
        return features.mean(dim=0, keepdim=True).expand_as(features).contiguous()
    return torch.zeros_like(features)


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


def attribute(bag: Bag, target: int, options: ExplainOptions, method: str) -> Attribution:
    attr = _captum()
    inputs = bag.features.detach().unsqueeze(0).requires_grad_()
    with torch.enable_grad(), _frozen(bag.model):
        if method == "gradient_x_input":
            result = attr.InputXGradient(bag.batch_logits).attribute(inputs, target=target)
            scores = result[0].sum(dim=1)
            return Attribution(_numpy(scores), target)
        # zeros as a scalar baseline: one bag-sized copy fewer while Captum runs
        zeros = options.ig_baseline == "zeros"
        baseline = None if zeros else baseline_of(bag.features.detach(), options.ig_baseline)
        result, delta = attr.IntegratedGradients(bag.batch_logits).attribute(
            inputs,
            baselines=0.0 if baseline is None else baseline.unsqueeze(0),
            target=target,
            n_steps=options.ig_steps,
            method="riemann_middle",  # midpoints: robust to the kinks of ReLU and max
            internal_batch_size=1,
            return_convergence_delta=True,
        )
    scores = result[0].sum(dim=1)
    del result
    with torch.no_grad():
        if baseline is None:
            baseline = baseline_of(bag.features, "zeros")
        difference = float(bag.logits(bag.features)[target] - bag.logits(baseline)[target])
    gap = float(delta.reshape(-1)[0])
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
