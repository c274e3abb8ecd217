"""Compute maps: a bag, a model, method names and a target class -> one :class:`Attribution`
per method, each through its registered module (under one fixed torch thread count, so serial,
local and Dask runs write the same bytes)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, FeatureError
from ..models.inference import _as_bag, fixed_threads
from .bag import Attribution, Bag, ExplainOptions
from .registry import METHODS, applies, method_problem, refusal

__all__ = ["check_methods", "explain_bag"]


def check_methods(model: nn.Module, methods: Sequence[str]) -> None:
    """A one-line :class:`ConfigError` for an unknown method or one the model cannot give."""
    bag = Bag(model, torch.zeros(0, 1))
    for name in methods:
        problem = method_problem(name)
        if problem:
            raise ConfigError(f"heatmap_arguments.method: {problem}")
        if bag.spec is not None and not applies(name, bag.spec):
            raise ConfigError(refusal(name, bag.spec))
        if bag.spec is None and METHODS[name].needs not in (None, "has_attention"):
            raise ConfigError(
                f"heatmap_arguments.method {name}: {type(model).__name__} is not a registered "
                "model, so it declares no capabilities; use attention, gradient_x_input, "
                "integrated_gradients or occlusion"
            )


def explain_bag(
    model: nn.Module,
    features: np.ndarray,
    methods: Sequence[str],
    *,
    targets: Sequence[int] | None = None,
    options: ExplainOptions | None = None,
    coords: np.ndarray | None = None,
    patch_size: int | None = None,
) -> dict[tuple[str, int], Attribution]:
    """Maps of ``features`` (N, D) under each method for each target class (default: the
    predicted class), keyed by ``(method, target)``."""
    if features.ndim == 2 and features.shape[0] == 0:
        raise FeatureError("empty bag (0 patches): nothing to explain")
    check_methods(model, methods)
    options = options or ExplainOptions()
    out: dict[tuple[str, int], Attribution] = {}
    with fixed_threads():
        h = _as_bag(model, features, None, "cpu")
        bag = Bag(model, h, coords=coords, patch_size=patch_size)
        if targets is None:
            targets = [predicted(bag)]
        for name in methods:
            module = importlib.import_module(f"{__package__}.{METHODS[name].module}")
            for target in targets:
                result = module.attribute(bag, int(target), options, name)
                if not np.isfinite(result.scores).all():
                    raise FeatureError(f"method {name} gave NaN/Inf scores for class {target}")
                result.attrs.setdefault("method", name)
                out[(name, int(target))] = result
    return out


def predicted(bag: Bag) -> int:
    """The predicted class: the first of the largest logits (CLAM's ``Y_hat``)."""
    logits = bag.full_logits().float()
    return int(torch.argsort(logits, descending=True, stable=True)[0])
