"""``attention``: the model's own per-patch score (what CLAM draws), through its reduction."""

from __future__ import annotations

from ..models.inference import attention_logits
from .bag import Attribution, Bag, ExplainOptions


def attribute(bag: Bag, target: int, options: ExplainOptions, method: str) -> Attribution:
    """The attention of class ``target``'s branch (models with one map per class), else the
    model's single map; unsigned, as CLAM draws it."""
    per_class = bag.spec is not None and bag.spec.per_class
    scores = attention_logits(bag.model, bag.features, branch=target if per_class else None)
    return Attribution(scores, target)
