"""The one list of model names, and how each name is built: torch-free on purpose.

:mod:`clam_heat.config` validates ``model_arguments.model_type`` against this module, so it must
import without torch. Built-in architectures are listed in :data:`BUILTIN_MODELS` as
``name -> module`` (a module under :mod:`clam_heat.models`); the module is imported, and
registers itself through :func:`register_model`, only when the name is first built or loaded.
Any other network joins at run time with :func:`register_model` (from a plug-in or a test); once
registered its name validates in a config like a built-in one.

A new model is one file under ``clam_heat/models/`` calling :func:`register_model` plus one line
in :data:`BUILTIN_MODELS`.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - types only; this module never imports torch
    import torch
    from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "CONFIG_ONLY_NAMES",
    "ENCODER_DIM_MAPPING",
    "MIL_LAB_CONFIGS",
    "QUADRATIC_BAG_LIMIT",
    "REFUSED",
    "ModelChoice",
    "ModelSpec",
    "get_model_spec",
    "model_type_problem",
    "parse_model_type",
    "register_model",
    "registered_models",
    "unregister_model",
]

#: Built-in models, in the order they are listed and tried when a checkpoint's layout is
#: guessed (MIL-Lab's ``clam`` before ``abmil``: it carries ``global_attn`` keys too).
BUILTIN_MODELS: dict[str, str] = {
    "clam_sb": "clam",
    "clam_mb": "clam",
    "clam": "clam",
    "abmil": "abmil",
    "transmil": "transmil",
    "dsmil": "dsmil",
    "ilra": "ilra",
    "rrt": "rrt",
    "transformer": "transformer",
    "wikg": "wikg",
    "dftd": "dftd",
    "mil_fc": "mil_fc",
    "mil_fc_mc": "mil_fc",
}

#: MIL-Lab's encoder -> feature width table (docs/rules/formats.md#mil-lab-names), plus TRIDENT's
#: spellings of the two encoders MIL-Lab names differently (``uni_v1`` = ``uni``,
#: ``hoptimus0`` = ``hoptimus``).
ENCODER_DIM_MAPPING: dict[str, int] = {
    "uni": 1024,
    "uni_v2": 1536,
    "ctranspath": 768,
    "conch_v1": 512,
    "conch_v15": 768,
    "gigapath": 1536,
    "resnet50": 1024,
    "virchow": 2560,
    "virchow2": 2560,
    "phikon": 768,
    "phikon_v2": 1024,
    "hoptimus": 1536,
    "hoptimus1": 1536,
    "musk": 1024,
    "uni_v1": 1024,
    "hoptimus0": 1536,
}

#: Model names that exist but cannot give a per-patch heatmap, with the reason.
REFUSED: dict[str, str] = {
    "mil": (
        "CLAM's MIL_fc has no attention map (it scores patches independently; name it mil_fc "
        "or mil_fc_mc and draw it with heatmap_arguments.method: instance)"
    ),
}

#: Models whose MIL-Lab config (the name's second part) sets behaviour that is not in the
#: checkpoint's shapes, with the configs clam-heat runs: DTFD's ``base_afs`` distils by another
#: rule than ``base`` from the same keys, so it is refused rather than run as ``base``.
MIL_LAB_CONFIGS: dict[str, tuple[str, ...]] = {"dftd": ("base",)}

#: Names a CLAM config may carry although no heatmap can be drawn for them: they validate (a
#: CLAM config loads unchanged) and the model loader refuses them with the reason above.
CONFIG_ONLY_NAMES: tuple[str, ...] = ("mil",)

#: Default bag-size limit for models whose cost grows with N² (override per call).
QUADRATIC_BAG_LIMIT = 20_000

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_MIL_LAB_HINT = "<model>.<config>.<encoder>.<task>"

StateDict = Mapping[str, "torch.Tensor"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, read its checkpoints and reduce its attention.

    ``builder(in_dim=, n_classes=, **hparams)`` returns the module. ``infer_hparams(state)`` reads
    ``hparams`` from a prepared state dict. ``prepare_state(raw)`` normalises a checkpoint's keys
    to the built module's (default: strip ``module.`` and ensure ``key_prefix``). ``guess_cause``
    ``(state, model, choice)`` names the likely cause of a failed strict load (default: the
    generic MIL-Lab-layout guess). ``count_classes(raw)`` reads the class count of a checkpoint
    of this kind, or None. ``detect(normalised)`` says whether a checkpoint's keys look like this
    model (default: any key starting with one of ``signature``).

    ``attention(model, h, branch)`` is the model's own reduction: ``h`` (N, D) -> ``(logits
    (C,), attention (N,))``, the attention of class ``branch`` when the model has one map per
    class (``per_class``), of the class it predicts when ``branch`` is None; None means the
    :class:`~clam_heat.models.inference.AttentionModel` protocol (``model(h)`` returns that
    pair). ``per_patch``: a patch's score does not depend on the other patches, so a bag may be
    scored in batches (CLAM, ABMIL); otherwise the whole bag is needed. ``max_bag_size`` guards
    models whose cost grows with N². ``input_key`` is the weight whose second dimension is the
    feature width. ``config_keys``: config settings the builder takes (CLAM: ``model_size``,
    ``gate``); values read from the checkpoint override them. ``checkpoint_label``: how a
    checkpoint of this model is named when it is loaded as another model ("this is a CLAM
    checkpoint").

    What the attribution methods (:mod:`clam_heat.explain`) may use: ``has_attention`` (False:
    the model has no per-patch attention map, so ``attention`` does not apply; its reduction's
    per-patch score is only a placeholder); ``linear_head(model, h)`` -> ``(attention logits
    r (K, N), embedded (N, E), W (C, K*E), b (C,))`` when the bag logits are
    ``W @ concat_k(softmax(r[k]) @ embedded) + b`` (exact signed contributions);
    ``instance_logits(model, h)`` -> (N, C) logits of each patch scored alone (the ``instance``
    method).
    """

    name: str
    builder: Callable[..., nn.Module]
    infer_hparams: Callable[[StateDict], dict[str, Any]] | None = None
    key_prefix: str = "model."
    max_bag_size: int | None = None
    layout: str = "clam-heat"
    signature: tuple[str, ...] = field(default=())
    input_key: str = "model.patch_embed.0.weight"
    prepare_state: Callable[[StateDict], dict[str, torch.Tensor]] | None = None
    guess_cause: Callable[[StateDict, nn.Module, ModelChoice], str] | None = None
    count_classes: Callable[[StateDict], int | None] | None = None
    detect: Callable[[StateDict], bool] | None = None
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    per_patch: bool = False
    per_class: bool = False
    config_keys: tuple[str, ...] = ()
    checkpoint_label: str | None = None
    has_attention: bool = True
    linear_head: Callable[..., tuple[torch.Tensor, ...]] | None = None
    instance_logits: Callable[..., torch.Tensor] | None = None

    def looks_like(self, normalised: StateDict) -> bool:
        """Whether a (``model.``-normalised) checkpoint's keys look like this model."""
        if self.detect is not None:
            return self.detect(normalised)
        return bool(self.signature) and any(k.startswith(self.signature) for k in normalised)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    replace: bool = True,
    **options: Any,
) -> ModelSpec:
    """Make ``name`` usable as ``model_type`` (bare or as the first part of a MIL-Lab name).

    ``options`` are :class:`ModelSpec` fields (``infer_hparams``, ``key_prefix``,
    ``attention``, ``per_patch`` ...). ``signature``: key fragments that identify a checkpoint
    of this model, used to say "this checkpoint looks like X" when a load fails.
    Re-registering a name replaces it unless ``replace`` is False (built-in modules register
    that way, so a user's earlier registration of the same name wins).
    """
    if not _NAME.fullmatch(name) or name in REFUSED:
        raise ValueError(f"cannot register model name {name!r}")
    spec = ModelSpec(name, builder, **options)
    if replace or name not in _REGISTRY:
        _REGISTRY[name] = spec
    return _REGISTRY[name]


def unregister_model(name: str) -> None:
    """Forget a runtime registration (a built-in name comes back from its module on next use)."""
    _REGISTRY.pop(name, None)


def registered_models() -> tuple[str, ...]:
    """Every name accepted as a bare ``model_type``: built-ins in table order, then others."""
    extra = sorted(set(_REGISTRY) - set(BUILTIN_MODELS))
    return (*BUILTIN_MODELS, *extra)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of a registered name, importing its built-in module on first use."""
    if name not in _REGISTRY and name in BUILTIN_MODELS:
        importlib.import_module(f"{__package__}.{BUILTIN_MODELS[name]}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"model {name!r} is not registered") from None


def all_model_specs() -> tuple[ModelSpec, ...]:
    """Every registered spec (built-ins imported), in :func:`registered_models` order."""
    return tuple(get_model_spec(name) for name in registered_models())


@dataclass(frozen=True)
class ModelChoice:
    """A parsed ``model_type``: the registered ``name``, the feature width ``in_dim``, and the
    encoder named in a MIL-Lab name (if any)."""

    name: str
    in_dim: int
    encoder: str | None = None


def _name_part(model_type: str) -> tuple[str, list[str], str | None]:
    """(model name, dotted parts, problem or None) of a ``model_type`` string."""
    text = model_type.strip().lower()
    parts = text.split(".")
    if len(parts) > 4 or any(not p for p in parts):
        return (
            parts[0],
            parts,
            (
                f"a MIL-Lab name has at most four non-empty parts {_MIL_LAB_HINT}, "
                "e.g. abmil.base.uni_v2.none"
            ),
        )
    name = parts[0]
    if len(parts) >= 2 and parts[1] not in MIL_LAB_CONFIGS.get(name, (parts[1],)):
        known = ", ".join(f"{name}.{c}" for c in MIL_LAB_CONFIGS[name])
        return (
            name,
            parts,
            (
                f"MIL-Lab config {parts[1]!r} changes how {name} runs in ways its checkpoint does "
                f"not record; clam-heat runs only {known} (name it only for a model trained with "
                "it)"
            ),
        )
    return name, parts, None


def model_type_problem(model_type: str) -> str | None:
    """Why ``model_type`` cannot name a model, or None; what the config checks (no torch, no
    feature width: the encoder part is checked when the model is loaded).

    >>> model_type_problem("abmil.base.uni_v2.none") is None
    True
    >>> model_type_problem("clam_ss")[-25:]
    "(did you mean 'clam_sb'?)"
    """
    name, parts, problem = _name_part(model_type)
    if problem is not None:
        return problem
    if name in _REGISTRY or name in BUILTIN_MODELS or model_type in CONFIG_ONLY_NAMES:
        return None
    known = (*registered_models(), *CONFIG_ONLY_NAMES)
    if name in REFUSED:
        return (
            f"{REFUSED[name]}, so no attention heatmap can be drawn (use one of {', '.join(known)})"
        )
    close = difflib.get_close_matches(model_type, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"must be one of {', '.join(known)} or a MIL-Lab name {_MIL_LAB_HINT}{hint}"


def parse_model_type(model_type: str, *, embed_dim: int | None) -> ModelChoice:
    """Resolve bare names and MIL-Lab ``<model>.<config>.<encoder>.<task>`` names.

    The encoder part fixes the feature width (``ENCODER_DIM_MAPPING``) and must agree with
    ``embed_dim`` from the config. The config and task parts are accepted as is: sizes come from
    the checkpoint, and the checkpoint file given is always loaded (unlike MIL-Lab, which ignores
    it for task ``none``).

    >>> parse_model_type("abmil.base.uni_v2.none", embed_dim=1536)
    ModelChoice(name='abmil', in_dim=1536, encoder='uni_v2')
    >>> parse_model_type("clam_sb", embed_dim=1024).name
    'clam_sb'
    """
    where = f"model_arguments.model_type {model_type!r}"
    name, parts, problem = _name_part(model_type)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    if name not in _REGISTRY and name not in BUILTIN_MODELS:
        known = ", ".join(registered_models())
        if name in REFUSED:
            raise ConfigError(
                f"{where}: {REFUSED[name]}, so no attention heatmap can be drawn (use one of "
                f"{known})"
            )
        raise ConfigError(f"{where}: unknown model (use one of {known})")
    encoder = parts[2] if len(parts) >= 3 else None
    if encoder is None:
        return ModelChoice(name, _need_dim(embed_dim, where))
    if encoder not in ENCODER_DIM_MAPPING:
        raise ConfigError(
            f"{where}: unknown encoder {encoder!r} (known: {', '.join(ENCODER_DIM_MAPPING)}); "
            f"use the bare name {name!r} and set model_arguments.embed_dim to the feature width"
        )
    in_dim = ENCODER_DIM_MAPPING[encoder]
    if embed_dim is not None and embed_dim != in_dim:
        raise ConfigError(
            f"{where}: encoder {encoder!r} gives {in_dim}-d features but "
            f"model_arguments.embed_dim is {embed_dim}; set embed_dim: {in_dim} or fix the name"
        )
    return ModelChoice(name, in_dim, encoder)


def _need_dim(embed_dim: int | None, where: str) -> int:
    if embed_dim is None or embed_dim <= 0:
        raise ConfigError(f"{where}: model_arguments.embed_dim (feature width) must be set")
    return int(embed_dim)
