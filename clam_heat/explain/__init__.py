"""Attribution maps beyond attention, for every model that can give them, and how faithful
each map is (docs/explanations.md).

Layout (one file per method, as :mod:`clam_heat.models` has one per architecture):

* :mod:`.registry` -- the torch-free method table (name, signed, what it needs from a model);
* :mod:`.bag` -- a bag seen through a model: differentiable logits and logits with patches
  left out;
* :mod:`.attention`, :mod:`.contribution`, :mod:`.gradients` (gradient x input, integrated
  gradients), :mod:`.occlusion`, :mod:`.instance` -- one ``attribute`` each;
* :mod:`.compute` -- :func:`explain_bag`, the one entry the stages call;
* :mod:`.faithfulness` -- deletion and insertion curves and their areas;
* :mod:`.scale` -- signed scores onto the heatmap's 0-100 scale, centred on zero.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "METHODS": "registry",
    "MethodSpec": "registry",
    "applies": "registry",
    "method_names": "registry",
    "methods_for": "registry",
    "Attribution": "bag",
    "Bag": "bag",
    "ExplainOptions": "bag",
    "check_methods": "compute",
    "explain_bag": "compute",
    "faithfulness_curves": "faithfulness",
    "signed_percent": "scale",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
