"""Deletion and insertion curves: does removing (adding) patches in a map's order change the
prediction faster than a random order?

For ``steps`` S, step k removes (deletion) or keeps only (insertion) the first ``round(k N /
S)`` patches of the order (highest score first, ties by patch index), the model is rerun on
what is left (:meth:`~clam_heat.explain.bag.Bag.masked_logits`) and the target class's
probability recorded; the area under each curve is the trapezoid mean over k = 0..S. A
faithful map gives a low deletion area and a high insertion area. The baseline is the mean of
``n_random`` random orders drawn from ``numpy.random.default_rng(seed + r)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .bag import Bag

__all__ = ["Curves", "faithfulness_curves", "order_of", "step_counts"]


@dataclass(frozen=True)
class Curves:
    """Probabilities (S + 1,) along the deletion and insertion curves, and their areas."""

    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return _area(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return _area(self.insertion)


def _area(curve: np.ndarray) -> float:
    steps = len(curve) - 1
    return float(np.sum((curve[1:] + curve[:-1]) / 2) / steps)


def step_counts(n: int, steps: int) -> np.ndarray:
    """Patches removed (or kept) at each of the ``steps + 1`` points.

    >>> step_counts(10, 4).tolist()
    [0, 2, 5, 8, 10]
    """
    return np.rint(np.arange(steps + 1) * n / steps).astype(np.int64)


def order_of(scores: np.ndarray) -> np.ndarray:
    """Patch indices from the highest score down (ties: lower index first).

    >>> order_of(np.array([0.1, 0.5, 0.5, -1.0])).tolist()
    [1, 2, 0, 3]
    """
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def _curves(bag: Bag, order: np.ndarray, target: int, steps: int) -> Curves:
    counts = step_counts(bag.n, steps)
    rank = np.empty(bag.n, dtype=np.int64)
    rank[order] = np.arange(bag.n)
    first = rank[None, :] < counts[:, None]  # (S + 1, N): the first k of the order
    masks = torch.from_numpy(np.concatenate([~first, first]).astype(np.float32))
    probs = torch.softmax(bag.masked_logits(masks.to(bag.features.device)).double(), dim=1)
    p = probs[:, target].cpu().numpy()
    return Curves(deletion=p[: steps + 1], insertion=p[steps + 1 :])


def faithfulness_curves(
    bag: Bag,
    maps: Mapping[str, np.ndarray],
    target: int,
    *,
    steps: int = 20,
    n_random: int = 3,
    seed: int = 0,
) -> dict[str, Curves]:
    """Curves of each map (by method name) and, under ``"random"``, the mean of ``n_random``
    seeded random orders (absent when ``n_random`` is 0)."""
    out = {name: _curves(bag, order_of(scores), target, steps) for name, scores in maps.items()}
    if n_random > 0:
        runs: Sequence[Curves] = [
            _curves(bag, np.random.default_rng(seed + r).permutation(bag.n), target, steps)
            for r in range(n_random)
        ]
        out["random"] = Curves(
            deletion=np.mean([c.deletion for c in runs], axis=0),
            insertion=np.mean([c.insertion for c in runs], axis=0),
        )
    return out
