"""Attention-MIL models: a torch-free registry, one module per architecture, checkpoint loading
and one-pass inference.

Layout:

* :mod:`.registry` -- :class:`ModelSpec`, :func:`register_model`, :func:`parse_model_type` and
  the one list of names (imports no torch; the config validates against it);
* :mod:`.layers` -- shared blocks (gated and Nystrom attention, PPEG, feed-forward);
* :mod:`.clam`, :mod:`.abmil`, :mod:`.transmil`, :mod:`.dsmil`, :mod:`.ilra`, :mod:`.rrt`,
  :mod:`.transformer`, :mod:`.wikg`, :mod:`.dftd`, :mod:`.mil_fc` -- one architecture each,
  registering itself with its own reduction;
* :mod:`.checkpoint` -- reading and normalising state dicts, the strict load, ``load_model``;
* :mod:`.inference` -- :func:`run_attention` and the overlap pass's :func:`attention_logits`.

A new model is one file calling :func:`register_model` plus one line in
:data:`.registry.BUILTIN_MODELS` (or a :func:`register_model` call from outside the package).
Names are re-exported lazily, so importing :mod:`clam_heat.models.registry` (as the config
does) never imports torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # registry (torch-free)
    "BUILTIN_MODELS": "registry",
    "ENCODER_DIM_MAPPING": "registry",
    "QUADRATIC_BAG_LIMIT": "registry",
    "REFUSED": "registry",
    "ModelChoice": "registry",
    "ModelSpec": "registry",
    "get_model_spec": "registry",
    "model_type_problem": "registry",
    "parse_model_type": "registry",
    "register_model": "registry",
    "unregister_model": "registry",
    "registered_models": "registry",
    # layers
    "FeedForward": "layers",
    "GatedAttention": "layers",
    "MilLabModel": "layers",
    "NystromAttention": "layers",
    "PlainAttention": "layers",
    "PPEG": "layers",
    # architectures
    "SIZES": "clam",
    "ClamMB": "clam",
    "ClamSB": "clam",
    "clam_state_dict_from_mil_lab": "clam",
    "clean_clam_state_dict": "clam",
    "ABMIL": "abmil",
    "TransMIL": "transmil",
    "DSMIL": "dsmil",
    "ILRA": "ilra",
    "RRT": "rrt",
    "TransformerMIL": "transformer",
    "WiKG": "wikg",
    "DFTD": "dftd",
    # checkpoints
    "build_model": "checkpoint",
    "checkpoint_n_classes": "checkpoint",
    "load_checkpoint_state": "checkpoint",
    "load_model": "checkpoint",
    "normalise_mil_lab_state_dict": "checkpoint",
    "resolve_device": "checkpoint",
    "state_dict_mismatch": "checkpoint",
    # inference
    "AttentionModel": "inference",
    "AttentionOutput": "inference",
    "attention_logits": "inference",
    "needs_whole_bag": "inference",
    "run_attention": "inference",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
