"""The one list of attribution methods: name -> what it needs from a model and how it is drawn.

Torch-free on purpose (the config validates ``heatmap_arguments.method`` against it). A method
is one module under :mod:`clam_heat.explain` with an ``attribute(bag, target, options)``
function plus one line in :data:`METHODS`. What a method needs from a model is a
:class:`~clam_heat.models.registry.ModelSpec` capability (``has_attention``, ``linear_head``,
``instance_logits``), so no method names a model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "METHODS",
    "MethodSpec",
    "applies",
    "method_names",
    "method_problem",
    "methods_for",
    "refusal",
]


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method.

    ``module``: the module under :mod:`clam_heat.explain` whose ``attribute`` computes it.
    ``signed``: scores can be negative (evidence against the class), drawn with a diverging
    colormap centred on zero. ``needs``: the :class:`~clam_heat.models.registry.ModelSpec`
    field that must be set (truthy) for the method to apply, None when it applies to every
    model. ``summary``: one line for messages and the docs.
    """

    name: str
    module: str
    signed: bool
    needs: str | None
    summary: str


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("attention", "attention", False, "has_attention", "the model's own attention"),
        MethodSpec(
            "contribution",
            "contribution",
            True,
            "linear_head",
            "exact signed share of the class logit (linear heads only)",
        ),
        MethodSpec(
            "gradient_x_input",
            "gradients",
            True,
            None,
            "gradient of the class logit times the features",
        ),
        MethodSpec(
            "integrated_gradients",
            "gradients",
            True,
            None,
            "path integral of gradients from a baseline bag",
        ),
        MethodSpec("occlusion", "occlusion", True, None, "logit change when a patch is left out"),
        MethodSpec(
            "instance",
            "instance",
            True,
            "instance_logits",
            "per-patch logits of instance-level models",
        ),
    )
}


def method_names() -> tuple[str, ...]:
    """Every method name, in table order.

    >>> method_names()[:2]
    ('attention', 'contribution')
    """
    return tuple(METHODS)


def method_problem(name: str) -> str | None:
    """Why ``name`` is not a method (with the closest name), or None.

    >>> method_problem("occlusion") is None
    True
    >>> method_problem("integrated_gradient").endswith("(did you mean 'integrated_gradients'?)")
    True
    """
    if name in METHODS:
        return None
    close = difflib.get_close_matches(name, METHODS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown method {name!r}; methods are {', '.join(METHODS)}{hint}"


def applies(method: str, model_spec: Any) -> bool:
    """Whether ``method`` can be computed for a model with this ``ModelSpec``."""
    needs = METHODS[method].needs
    return needs is None or bool(getattr(model_spec, needs, None))


def methods_for(model_spec: Any) -> tuple[str, ...]:
    """The methods that apply to a model, in table order."""
    return tuple(name for name in METHODS if applies(name, model_spec))


def refusal(method: str, model_spec: Any) -> str:
    """One line: why ``method`` does not apply to the model, and which methods do."""
    reasons = {
        "has_attention": "has no per-patch attention map",
        "linear_head": "has no classifier that is linear in attention-pooled features",
        "instance_logits": "does not score patches on their own",
    }
    needs = METHODS[method].needs or ""
    return (
        f"heatmap_arguments.method {method}: model {model_spec.name} "
        f"{reasons.get(needs, 'does not support it')}; use one of "
        f"{', '.join(methods_for(model_spec))}"
    )
