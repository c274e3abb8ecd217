"""Attention-MIL models, checkpoint loading and one-pass bag inference.

Two families, chosen by ``model_arguments.model_type`` (see :func:`parse_model_type`):

**CLAM** (``clam_sb``, ``clam_mb``). Written from the layout in the spec (clam-heatmaps §5), not
from CLAM's code, so a CLAM ``s_<fold>_checkpoint.pt`` loads strictly: ``attention_net.0``
(Linear E->512), ``attention_net.3`` (gated attention: ``attention_a.0``, ``attention_b.0``,
``attention_c``; plain: ``module.0`` and ``module.2``, or ``module.3`` when trained with dropout),
``classifiers`` and ``instance_classifiers.<k>``. Dropout layers occupy the same positions as in
CLAM so indices match, and are inactive in ``eval()``. MIL-Lab's ``clam`` checkpoints
(``model.patch_embed.0`` ...) are renamed to this layout by the mapping of formats §3.3.

**MIL-Lab-style attention models** (``abmil``, ``transmil``, ``dsmil``, ``ilra``, ``rrt``,
``transformer``, or full MIL-Lab names such as ``abmil.base.uni_v2.none``). Each is an outer
module holding the network in ``.model``, so every state-dict key starts with ``model.`` as in
MIL-Lab; ``module.`` prefixes and a missing ``model.`` prefix are normalised on load. Hidden sizes
are read from the checkpoint's tensor shapes, so a checkpoint loads strictly whatever width it
was trained with, while the input width and class count are checked against the config.

Key-layout compatibility, honestly stated:

* ``abmil``: MIL-Lab's layout as given in formats §2.2 (``model.patch_embed.0``,
  ``model.global_attn.attention_{a,b}.0``, ``model.global_attn.attention_c``,
  ``model.classifier``; 10 tensors) with MIL-Lab's forward (Linear-ReLU embedding, gated
  attention, softmax pooling, linear head).
* ``clam`` (MIL-Lab name): the CLAM mapping of formats §3.3.
* ``transmil``, ``dsmil``, ``ilra``, ``rrt``, ``transformer``: MIL-Lab's exact keys, shapes and
  forward maths (written here from MIL-Lab's network definitions; MIL-Lab is not needed), so a
  checkpoint saved from MIL-Lab's ``create_model(...)`` loads strictly. Verified against
  reference numbers in ``tests/data/mil_lab/`` (keys, shapes, logits, attention). Hyper-parameters
  the shapes do not reveal (ILRA's and Transformer's head counts, RRT's pooling activation) take
  MIL-Lab's base values. Each class documents its keys and the attention it returns.

Any other network can join through :func:`register_model`; it must follow
:class:`AttentionModel`: ``forward(h (N, D)) -> (logits (C,), attention (N,))``.
Models whose attention is not a per-patch score (WiKG's graph, DFTD's shuffled pseudo-bags,
CLAM's attention-free ``mil``) are refused with a message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, FeatureError

__all__ = [
    "ABMIL",
    "DSMIL",
    "ENCODER_DIM_MAPPING",
    "ILRA",
    "RRT",
    "NystromAttention",
    "AttentionModel",
    "AttentionOutput",
    "ClamMB",
    "ClamSB",
    "MilLabModel",
    "ModelChoice",
    "ModelSpec",
    "TransMIL",
    "TransformerMIL",
    "build_model",
    "checkpoint_n_classes",
    "clam_state_dict_from_mil_lab",
    "clean_clam_state_dict",
    "load_checkpoint_state",
    "load_model",
    "normalise_mil_lab_state_dict",
    "parse_model_type",
    "register_model",
    "registered_models",
    "resolve_device",
    "run_attention",
]

SIZES = {"small": (512, 256), "big": (512, 384)}

#: MIL-Lab's encoder -> feature width table (formats §2.1), plus TRIDENT's spellings of the two
#: encoders MIL-Lab names differently (``uni_v1`` = ``uni``, ``hoptimus0`` = ``hoptimus``).
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
    "mil": "CLAM's MIL_fc has no attention map (it scores patches independently)",
    "mil_fc": "CLAM's MIL_fc has no attention map (it scores patches independently)",
    "mil_fc_mc": "CLAM's MIL_fc_mc has no attention map (it scores patches independently)",
    "wikg": "WiKG's attention is a patch-to-patch graph, not a per-patch score",
    "dftd": "DFTD attends over shuffled pseudo-bag instances that do not map to patches",
}

#: Default bag-size limit for models whose cost grows with N² (override per call).
QUADRATIC_BAG_LIMIT = 20_000


# =============================================================================================
# CLAM


class GatedAttention(nn.Module):
    """Gated attention (tanh branch x sigmoid branch -> K logits per patch)."""

    def __init__(self, in_dim: int, hidden: int, dropout: bool, n_out: int) -> None:
        super().__init__()
        a: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Tanh()]
        b: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Sigmoid()]
        if dropout:
            a.append(nn.Dropout(0.25))
            b.append(nn.Dropout(0.25))
        self.attention_a = nn.Sequential(*a)
        self.attention_b = nn.Sequential(*b)
        self.attention_c = nn.Linear(hidden, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class PlainAttention(nn.Module):
    """Un-gated attention: Linear, tanh, (dropout), Linear -> K logits per patch."""

    def __init__(self, in_dim: int, hidden: int, dropout: bool, n_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(0.25))
        layers.append(nn.Linear(hidden, n_out))
        self.module = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


class _ClamBase(nn.Module):
    def __init__(
        self,
        *,
        gate: bool = True,
        size_arg: str = "small",
        dropout: float = 0.0,
        n_classes: int = 2,
        embed_dim: int = 1024,
        attention_dropout: bool = False,
        width: int | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if size_arg not in SIZES:
            raise ValueError(f"size_arg must be one of {sorted(SIZES)}, got {size_arg!r}")
        self.width = width or SIZES[size_arg][0]
        self.hidden = hidden or SIZES[size_arg][1]
        attn_cls = GatedAttention if gate else PlainAttention
        self.n_classes = n_classes
        self.embed_dim = embed_dim
        self.attention_net = nn.Sequential(
            nn.Linear(embed_dim, self.width),
            nn.ReLU(),
            nn.Dropout(dropout),
            attn_cls(
                self.width, self.hidden, attention_dropout, self._attention_outputs(n_classes)
            ),
        )
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(self.width, 2) for _ in range(n_classes)
        )

    @property
    def in_dim(self) -> int:
        """Feature width the model expects (CLAM calls it ``embed_dim``)."""
        return self.embed_dim

    @staticmethod
    def _attention_outputs(n_classes: int) -> int:
        raise NotImplementedError

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, h: torch.Tensor, attention_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict] | torch.Tensor:
        """``h`` (N, E) -> (logits (1, C), Y_prob (1, C), Y_hat (1, 1), A_raw (K, N), {}).

        ``A_raw`` is the pre-softmax attention, as CLAM returns it; ``attention_only`` returns it
        alone.
        """
        if h.dim() != 2:
            raise ValueError(f"expected features of shape (N, E), got {tuple(h.shape)}")
        embedded = self.attention_net[:3](h)
        a_raw = self.attention_net[3](embedded).transpose(0, 1)
        if attention_only:
            return a_raw
        weights = torch.softmax(a_raw, dim=1)
        pooled = weights @ embedded
        logits = self._bag_logits(pooled)
        y_hat = torch.topk(logits, 1, dim=1).indices
        y_prob = torch.softmax(logits, dim=1)
        return logits, y_prob, y_hat, a_raw, {}


class ClamSB(_ClamBase):
    """CLAM single-branch: one attention map, ``classifiers`` = Linear(512, C)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifiers = nn.Linear(self.width, self.n_classes)

    @staticmethod
    def _attention_outputs(n_classes: int) -> int:
        return 1

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifiers(pooled)


class ClamMB(_ClamBase):
    """CLAM multi-branch: one attention map and one Linear(512, 1) classifier per class."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifiers = nn.ModuleList(nn.Linear(self.width, 1) for _ in range(self.n_classes))

    @staticmethod
    def _attention_outputs(n_classes: int) -> int:
        return n_classes

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        columns = [clf(pooled[c]) for c, clf in enumerate(self.classifiers)]
        return torch.cat(columns).reshape(1, self.n_classes)


CLAM_TYPES = {"clam_sb": ClamSB, "clam_mb": ClamMB}


# =============================================================================================
# protocol, registry and model-type names


@runtime_checkable
class AttentionModel(Protocol):
    """What :func:`run_attention` needs from a non-CLAM model.

    ``forward(h)``: ``h`` (N, D) float32 -> ``(logits (C,), attention (N,))`` where attention is
    one score per patch (higher = more important), for the class the model predicts when its
    attention is per class. ``in_dim`` is D, checked against the features before the forward.
    """

    in_dim: int
    n_classes: int

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and how to read hidden sizes from a checkpoint.

    ``builder(in_dim=, n_classes=, **hparams)`` returns an :class:`AttentionModel` module.
    ``infer_hparams(state)`` reads ``hparams`` from a normalised state dict (keys as the built
    module names them). ``key_prefix`` is ensured on every key when loading (``"model."`` for the
    MIL-Lab layout). ``max_bag_size`` guards models whose cost grows with N². ``input_key`` is
    the weight whose second dimension is the feature width (named when a checkpoint's width
    differs from the config's).
    """

    name: str
    builder: Callable[..., nn.Module]
    infer_hparams: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None = None
    key_prefix: str = "model."
    max_bag_size: int | None = None
    layout: str = "clam-heat"
    signature: tuple[str, ...] = field(default=())
    input_key: str = "model.patch_embed.0.weight"


_REGISTRY: dict[str, ModelSpec] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    infer_hparams: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None = None,
    key_prefix: str = "model.",
    max_bag_size: int | None = None,
    layout: str = "clam-heat",
    signature: tuple[str, ...] = (),
    input_key: str = "model.patch_embed.0.weight",
) -> ModelSpec:
    """Make ``name`` usable as ``model_type`` (bare or as the first part of a MIL-Lab name).

    ``signature``: key fragments that identify a checkpoint of this model, used to say "this
    checkpoint looks like X" when a load fails. Re-registering a name replaces it.
    """
    if not _NAME.fullmatch(name) or name in CLAM_TYPES or name == "clam":
        raise ValueError(f"cannot register model name {name!r}")
    spec = ModelSpec(
        name, builder, infer_hparams, key_prefix, max_bag_size, layout, signature, input_key
    )
    _REGISTRY[name] = spec
    return spec


def registered_models() -> tuple[str, ...]:
    """Names accepted as bare ``model_type`` besides clam_sb / clam_mb."""
    return tuple(sorted(_REGISTRY))


@dataclass(frozen=True)
class ModelChoice:
    """A parsed ``model_type``: ``family`` is ``clam`` (CLAM_SB/MB), ``mil_lab_clam`` (MIL-Lab
    CLAM renamed to CLAM's layout) or ``registry``; ``in_dim`` is the feature width."""

    family: str
    name: str
    in_dim: int
    encoder: str | None = None


def parse_model_type(model_type: str, *, embed_dim: int | None) -> ModelChoice:
    """Resolve CLAM names, bare names and MIL-Lab ``<model>.<config>.<encoder>.<task>`` names.

    The encoder part fixes the feature width (``ENCODER_DIM_MAPPING``) and must agree with
    ``embed_dim`` from the config. The config and task parts are accepted as is: sizes come from
    the checkpoint, and the checkpoint file given is always loaded (unlike MIL-Lab, which ignores
    it for task ``none``).

    >>> parse_model_type("abmil.base.uni_v2.none", embed_dim=1536)
    ModelChoice(family='registry', name='abmil', in_dim=1536, encoder='uni_v2')
    >>> parse_model_type("clam_sb", embed_dim=1024).family
    'clam'
    """
    text = model_type.strip().lower()
    where = f"model_arguments.model_type {model_type!r}"
    if text in CLAM_TYPES:
        return ModelChoice("clam", text, _need_dim(embed_dim, where))
    parts = text.split(".")
    name = parts[0]
    if len(parts) > 4 or any(not p for p in parts):
        raise ConfigError(
            f"{where}: a MIL-Lab name has at most four non-empty parts "
            "<model>.<config>.<encoder>.<task>, e.g. abmil.base.uni_v2.none"
        )
    if name in _REGISTRY:
        family = "registry"
    elif name == "clam":
        family = "mil_lab_clam"
    elif name in REFUSED:
        raise ConfigError(
            f"{where}: {REFUSED[name]}, so no attention heatmap can be drawn (use clam_sb, "
            f"clam_mb or one of {', '.join(registered_models())})"
        )
    else:
        known = ", ".join(["clam_sb", "clam_mb", "clam", *registered_models()])
        raise ConfigError(f"{where}: unknown model (use one of {known})")
    encoder = parts[2] if len(parts) >= 3 else None
    if encoder is None:
        return ModelChoice(family, name, _need_dim(embed_dim, where))
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
    return ModelChoice(family, name, in_dim, encoder)


def _need_dim(embed_dim: int | None, where: str) -> int:
    if embed_dim is None or embed_dim <= 0:
        raise ConfigError(f"{where}: model_arguments.embed_dim (feature width) must be set")
    return int(embed_dim)


# =============================================================================================
# MIL-Lab-style networks


class MilLabModel(nn.Module):
    """Outer module: the network sits in ``.model`` so every key starts with ``model.``.

    ``forward(h (N, D)) -> (logits (C,), attention (N,))`` (the :class:`AttentionModel`
    protocol). ``max_bag_size`` is the default bag-size guard used by :func:`run_attention`.
    """

    def __init__(
        self, net: nn.Module, *, name: str, in_dim: int, n_classes: int, max_bag_size: int | None
    ) -> None:
        super().__init__()
        self.model = net
        self.name = name
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.max_bag_size = max_bag_size

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if h.dim() == 3 and h.shape[0] == 1:
            h = h[0]
        if h.dim() != 2:
            raise ValueError(f"expected features of shape (N, D), got {tuple(h.shape)}")
        return self.model(h)


def _shape(state: Mapping[str, torch.Tensor], key: str, dim: int) -> int | None:
    tensor = state.get(key)
    return int(tensor.shape[dim]) if tensor is not None and tensor.dim() > dim else None


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in state if (m := regex.fullmatch(k))})


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al.) in MIL-Lab's layout and forward (formats §2.2).

    Keys: ``patch_embed.{0,3,..}`` (Linear in->E, ReLU, Dropout per layer),
    ``global_attn.attention_a.0`` / ``attention_b.0`` (E->A), ``global_attn.attention_c``
    (A->K heads), ``classifier`` (K*E -> C); un-gated: ``global_attn.module.{0,3}``.
    Attention returned: pre-softmax logits (N,), averaged over heads when K > 1.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 512,
        attn_dim: int = 384,
        gate: bool = True,
        num_heads: int = 1,
        num_fc_layers: int = 1,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_fc_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.patch_embed = nn.Sequential(*layers)
        attn_cls = GatedAttention if gate else PlainAttention
        self.global_attn = attn_cls(hidden_dim, attn_dim, True, num_heads)
        self.classifier = nn.Linear(hidden_dim * num_heads, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.patch_embed(h)
        raw = self.global_attn(embedded).transpose(0, 1)  # (K, N) pre-softmax
        pooled = (torch.softmax(raw, dim=1) @ embedded).reshape(-1)
        return self.classifier(pooled), raw.mean(dim=0)

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        gate = "model.global_attn.attention_a.0.weight" in state
        first = "attention_a.0" if gate else "module.0"
        last = (
            "attention_c"
            if gate
            else ("module.3" if "model.global_attn.module.3.weight" in state else "module.2")
        )
        return _drop_none(
            hidden_dim=_shape(state, "model.patch_embed.0.weight", 0),
            attn_dim=_shape(state, f"model.global_attn.{first}.weight", 0),
            num_heads=_shape(state, f"model.global_attn.{last}.weight", 0),
            num_fc_layers=_count(state, r"model\.patch_embed\.(\d+)\.weight") or None,
            gate=gate,
        )


def _nystrom_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Approximate Moore-Penrose pseudo-inverse of each (m, m) matrix in ``x`` (..., m, m) by
    Newton-Schulz iterations, matmuls only (the Nystromformer recipe MIL-Lab runs).

    The starting guess is ``x^T`` divided by (largest absolute row sum) x (largest absolute
    column sum) taken over the **whole** batch of matrices, not per matrix: that is what
    MIL-Lab's attention computes, and with 6 iterations the result depends on it.

    >>> a = torch.softmax(torch.randn(2, 5, 5, dtype=torch.float64), dim=-1)
    >>> eye = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    >>> bool(torch.allclose(_nystrom_pinv(a, 30) @ a, eye, atol=1e-6))
    True
    """
    magnitude = x.abs()
    scale = magnitude.sum(dim=-1).max() * magnitude.sum(dim=-2).max()
    z = x.transpose(-1, -2) / scale
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nystrom self-attention (Xiong et al. 2021) over one bag of tokens, as MIL-Lab's TransMIL
    and RRT use it (the ``nystrom_attention`` package's maths, written here from the paper).

    The sequence is zero-padded **at the front** to a multiple of ``landmarks``; landmarks are
    the means of consecutive groups of ``ceil(n / landmarks)`` tokens (queries pre-scaled by
    ``dim_head ** -0.5``); softmax(Q K_l^T) pinv(softmax(Q_l K_l^T)) softmax(Q_l K^T) V plus a
    depthwise (33, 1) convolution of V along the sequence; the padding rows are dropped at the
    end. Cost O(n * landmarks).

    Keys: ``to_qkv`` (3 * heads * dim_head, dim; no bias), ``to_out.0`` (dim, heads * dim_head),
    ``res_conv`` (heads, 1, 33, 1).
    """

    def __init__(
        self, dim: int, *, heads: int, dim_head: int, landmarks: int, pinv_iters: int = 6
    ) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.landmarks, self.pinv_iters = max(1, landmarks), pinv_iters
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (n, dim) -> (n, dim)."""
        n = x.shape[0]
        m = self.landmarks
        pad = -n % m
        if pad:
            x = torch.cat([x.new_zeros(pad, x.shape[1]), x])
        length = n + pad
        q, k, v = (
            self.to_qkv(x).reshape(length, 3, self.heads, self.dim_head).permute(1, 2, 0, 3)
        )  # each (heads, length, dim_head)
        q = q * self.dim_head**-0.5
        group = length // m
        q_marks = q.reshape(self.heads, m, group, self.dim_head).mean(dim=2)
        k_marks = k.reshape(self.heads, m, group, self.dim_head).mean(dim=2)
        kernel_1 = torch.softmax(q @ k_marks.transpose(-1, -2), dim=-1)  # (h, length, m)
        kernel_2 = torch.softmax(q_marks @ k_marks.transpose(-1, -2), dim=-1)  # (h, m, m)
        kernel_3 = torch.softmax(q_marks @ k.transpose(-1, -2), dim=-1)  # (h, m, length)
        out = (kernel_1 @ _nystrom_pinv(kernel_2, self.pinv_iters)) @ (kernel_3 @ v)
        out = out + self.res_conv(v[None])[0]
        out = out.permute(1, 0, 2).reshape(length, self.heads * self.dim_head)
        return self.to_out(out)[pad:]


def _patch_embed(in_dim: int, width: int, n_layers: int, dropout: float = 0.0) -> nn.Sequential:
    """MIL-Lab's ``patch_embed`` (``create_mlp`` ending in an activation): (Linear, ReLU,
    Dropout) x (n_layers - 1), then Linear, ReLU -- Linear weights at indices 0, 3, 6, ..."""
    layers: list[nn.Module] = []
    for _ in range(n_layers - 1):
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, width), nn.ReLU())


def _n_linear(state: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    """How many Linear layers a ``patch_embed``-style Sequential under ``prefix`` holds."""
    return _count(state, re.escape(prefix) + r"\.(\d+)\.weight") or None


class _PPEG(nn.Module):
    """TransMIL's position encoding: the tokens laid row by row on a side x side grid, plus
    depthwise 7x7, 5x5 and 3x3 convolutions of that grid (``proj``, ``proj1``, ``proj2``)."""

    def __init__(self, dim: int, kernel: int = 7, *, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=bias)
        self.proj1 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=bias)
        self.proj2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``tokens`` (side², dim) -> (side², dim)."""
        grid = tokens.T.reshape(1, -1, side, side)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return grid.flatten(2)[0].T


class _NystromBlock(nn.Module):
    """Pre-norm residual Nystrom attention: ``x + attention(norm(x))`` (keys ``norm``,
    ``<attention_name>.*``)."""

    def __init__(self, dim: int, attention: NystromAttention, attention_name: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self._attention_name = attention_name
        self.add_module(attention_name, attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + getattr(self, self._attention_name)(self.norm(x))


class TransMIL(nn.Module):
    """TransMIL (Shao et al. 2021) with MIL-Lab's keys and forward (``transmil.base``).

    The embedded bag is padded to ceil(sqrt(N))² tokens by repeating its first patches, a class
    token is prepended, then Nystrom block 0, PPEG (after block 0 only), blocks 1.., LayerNorm
    and the head on the class token. Nystrom: ``dim_head = hidden_dim // num_heads``,
    ``hidden_dim // 2`` landmarks.

    Keys: ``cls_token`` (1, 1, E), ``patch_embed.0``, ``pos_layer.proj{,1,2}``,
    ``blocks.<i>.norm``, ``blocks.<i>.attention.{to_qkv,to_out.0,res_conv}``, ``norm``,
    ``classifier``. Attention returned: MIL-Lab's score, each token's dot product with the class
    token after block 0 (unnormalised, any sign), first N entries (padding copies dropped).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 512,
        num_heads: int = 4,
        num_attention_layers: int = 2,
        num_fc_layers: int = 1,
    ) -> None:
        super().__init__()
        self.patch_embed = _patch_embed(in_dim, hidden_dim, num_fc_layers)
        self.pos_layer = _PPEG(hidden_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.blocks = nn.ModuleList(
            _NystromBlock(
                hidden_dim,
                NystromAttention(
                    hidden_dim,
                    heads=num_heads,
                    dim_head=hidden_dim // num_heads,
                    landmarks=hidden_dim // 2,
                ),
                "attention",
            )
            for _ in range(num_attention_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        tokens = self.patch_embed(h)
        side = math.isqrt(n - 1) + 1 if n > 1 else 1
        tokens = torch.cat([tokens, tokens[: side * side - n]])
        x = torch.cat([self.cls_token.reshape(1, -1), tokens])
        attention = x.new_zeros(n)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                attention = x[1 : n + 1] @ x[0]
                x = torch.cat([x[:1], self.pos_layer(x[1:], side)])
        return self.classifier(self.norm(x[0])), attention

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return _drop_none(
            hidden_dim=_shape(state, "model.norm.weight", 0),
            num_heads=_shape(state, "model.blocks.0.attention.res_conv.weight", 0),
            num_attention_layers=_count(state, r"model\.blocks\.(\d+)\.norm\.weight") or None,
            num_fc_layers=_n_linear(state, "model.patch_embed"),
        )


class _InstanceHead(nn.Module):
    """DSMIL's stream 1 (``i_classifier``): one score per patch and class."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.inst_classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inst_classifier(x)


class _BagHead(nn.Module):
    """DSMIL's stream 2 (``b_classifier``): attention of every patch to each class's critical
    (top-scoring) patch, softmax over patches, pooled values, LayerNorm. ``fcc`` is built as in
    MIL-Lab (always Conv1d(3, 3, E)) only so its checkpoints load; it is never used."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, attn_dim)
        self.v = nn.Sequential(nn.Identity(), nn.Linear(dim, dim))  # [0] is a p=0 dropout
        self.norm = nn.LayerNorm(dim)
        self.fcc = nn.Conv1d(3, 3, kernel_size=dim)

    def forward(self, x: torch.Tensor, instance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (N, E), ``instance`` (N, C) -> pooled (C, E), attention (N, C)."""
        queries = self.q(x)
        critical = queries[instance.argmax(dim=0)]  # (C, attn_dim)
        scores = queries @ critical.T / math.sqrt(queries.shape[1])
        attention = torch.softmax(scores, dim=0)  # each column sums to 1
        return self.norm(attention.T @ self.v(x)), attention


class DSMIL(nn.Module):
    """Dual-stream MIL (Li et al. 2021) with MIL-Lab's keys and forward (``dsmil.base``).

    Stream 1: ``i_classifier.inst_classifier`` scores each patch per class; each class's top
    patch is its critical instance. Stream 2: ``b_classifier.q`` (E -> attn_dim) compares every
    patch with each critical one, softmax over patches (scaled by sqrt(attn_dim)) gives A (N, C);
    ``b_classifier.v.1`` values pooled by A, ``b_classifier.norm`` (LayerNorm), then
    ``classifier`` = Conv1d(C, C, kernel E). Logits: mean of bag and max-instance scores.
    ``b_classifier.fcc`` (Conv1d(3, 3, E)) exists in MIL-Lab's checkpoints but is never used.
    Attention returned: A's column of the predicted class (sums to 1).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 512,
        attn_dim: int = 384,
        num_fc_layers: int = 1,
    ) -> None:
        super().__init__()
        self.patch_embed = _patch_embed(in_dim, hidden_dim, num_fc_layers)
        self.i_classifier = _InstanceHead(hidden_dim, n_classes)
        self.b_classifier = _BagHead(hidden_dim, attn_dim)
        self.classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.patch_embed(h)
        instance = self.i_classifier(embedded)  # (N, C)
        pooled, attention = self.b_classifier(embedded, instance)
        bag = self.classifier(pooled[None])[0, :, 0]  # (C,)
        logits = 0.5 * (bag + instance.max(dim=0).values)
        return logits, attention[:, int(logits.argmax())]

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return _drop_none(
            hidden_dim=_shape(state, "model.b_classifier.norm.weight", 0),
            attn_dim=_shape(state, "model.b_classifier.q.weight", 0),
            num_fc_layers=_n_linear(state, "model.patch_embed"),
        )


class _ILRAAttention(nn.Module):
    """ILRA's attention block: ``O = fc_q(Q) + MHA(fc_q(Q), fc_k(K), fc_v(K))``, LayerNorm
    ``ln0``, ``O + relu(fc_o(O))``, LayerNorm ``ln1``, then (gated) ``O * silu(gate.0(Q))``.
    ``multihead_attention`` is torch's nn.MultiheadAttention (packed ``in_proj_weight``)."""

    def __init__(
        self, dim_q: int, dim_k: int, dim: int, heads: int, *, ln: bool, gated: bool
    ) -> None:
        super().__init__()
        self.multihead_attention = nn.MultiheadAttention(dim, heads)
        self.fc_q = nn.Linear(dim_q, dim)
        self.fc_k = nn.Linear(dim_k, dim)
        self.fc_v = nn.Linear(dim_k, dim)
        self.ln0: nn.Module = nn.LayerNorm(dim) if ln else nn.Identity()
        self.ln1: nn.Module = nn.LayerNorm(dim) if ln else nn.Identity()
        self.fc_o = nn.Linear(dim, dim)
        self.gate = nn.Sequential(nn.Linear(dim_q, dim), nn.SiLU()) if gated else None

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, *, weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``query`` (S_q, dim_q), ``context`` (S_k, dim_k) -> (S_q, dim), head-averaged
        softmax weights (S_q, S_k) when asked."""
        q = self.fc_q(query)
        mixed, attn = self.multihead_attention(
            q,
            self.fc_k(context),
            self.fc_v(context),
            need_weights=weights,
            average_attn_weights=True,
        )
        out = self.ln0(q + mixed)
        out = self.ln1(out + F.relu(self.fc_o(out)))
        if self.gate is not None:
            out = out * self.gate(query)
        return out, attn


class _GAB(nn.Module):
    """ILRA's low-rank global attention: ``latent`` (1, topk, E) reads the bag
    (``project_forward``), the bag reads it back (``project_backward``); O(N * topk)."""

    def __init__(self, dim_in: int, dim: int, heads: int, topk: int, ln: bool) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, topk, dim) * dim**-0.5)
        self.project_forward = _ILRAAttention(dim, dim_in, dim, heads, ln=ln, gated=True)
        self.project_backward = _ILRAAttention(dim_in, dim, dim, heads, ln=ln, gated=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summary, _ = self.project_forward(self.latent[0], x)
        return self.project_backward(x, summary)[0]


class _NonLocalPool(nn.Module):
    """ILRA's pooling: one learned query ``S`` (1, 1, E) attends over the bag through ``mha``."""

    def __init__(self, dim: int, heads: int, ln: bool) -> None:
        super().__init__()
        self.S = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.mha = _ILRAAttention(dim, dim, dim, heads, ln=ln, gated=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) -> pooled (E,), head-averaged softmax weights (N,)."""
        pooled, weights = self.mha(self.S[0], x, weights=True)
        if weights is None:  # pragma: no cover - need_weights=True always returns them
            raise RuntimeError("nn.MultiheadAttention returned no weights")
        return pooled[0], weights[0]


class ILRA(nn.Module):
    """ILRA-MIL (Xiang & Zhang 2023) with MIL-Lab's keys and forward (``ilra.base``).

    No patch embedding: ``gab_blocks.0`` reads the features directly. Then non-local pooling:
    ``pooling.S`` (1, 1, E) attends over the bag through ``pooling.mha`` (an un-gated block),
    ``classifier`` (E -> C). The head count is not in the checkpoint's shapes: MIL-Lab's base
    value 8 is used. Attention returned: the pooling query's head-averaged softmax attention
    (N,), sums to 1.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 256,
        num_heads: int = 8,
        topk: int = 64,
        num_attention_layers: int = 2,
        ln: bool = True,
    ) -> None:
        super().__init__()
        self.gab_blocks = nn.ModuleList(
            _GAB(in_dim if i == 0 else hidden_dim, hidden_dim, num_heads, topk, ln)
            for i in range(num_attention_layers)
        )
        self.pooling = _NonLocalPool(hidden_dim, num_heads, ln)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = h
        for block in self.gab_blocks:
            x = block(x)
        pooled, weights = self.pooling(x)
        return self.classifier(pooled), weights

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return _drop_none(
            hidden_dim=_shape(state, "model.gab_blocks.0.latent", 2),
            topk=_shape(state, "model.gab_blocks.0.latent", 1),
            num_attention_layers=_count(state, r"model\.gab_blocks\.(\d+)\.latent") or None,
            ln="model.pooling.mha.ln0.weight" in state,
        )


class _RRTPool(nn.Module):
    """RRT's attention pooling (``pool_fn.attention``): plain ``attention.{0,2}`` (Linear,
    ReLU, Linear) or gated ``attention_a.0`` / ``attention_b.0`` / ``attention_c``; softmax
    over patches. Bias-free in MIL-Lab's base config."""

    def __init__(self, dim: int, attn_dim: int, *, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gated = gated
        if gated:
            self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim, bias=bias), nn.ReLU())
            self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim, bias=bias), nn.Sigmoid())
            self.attention_c = nn.Linear(attn_dim, 1, bias=bias)
        else:
            self.attention = nn.Sequential(
                nn.Linear(dim, attn_dim, bias=bias), nn.ReLU(), nn.Linear(attn_dim, 1, bias=bias)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) -> softmax weights (N,)."""
        if self.gated:
            raw = self.attention_c(self.attention_a(x) * self.attention_b(x))
        else:
            raw = self.attention(x)
        return torch.softmax(raw[:, 0], dim=0)


class _FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))`` (RRT's optional FFN)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _RRTLayer(nn.Module):
    """``x + attn(norm(x))`` with Nystrom attention (256 landmarks), then, with ``ffn``,
    ``x + mlp.fc2(gelu(mlp.fc1(norm2(x))))``."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, ffn_dim: int | None, landmarks: int
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim_head, landmarks=landmarks)
        self.mlp: _FeedForward | None = None
        if ffn_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = _FeedForward(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class _PoolHolder(nn.Module):
    """``pool_fn``: holds the pooling network as ``attention`` (MIL-Lab's DAttention)."""

    def __init__(self, attention: _RRTPool) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class _PEG(nn.Module):
    """RRT's single-convolution position encoding (``proj`` only); built, never called."""

    def __init__(self, dim: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=bias)


def _rrt_position_module(dim: int, pos: str, kernel: int, bias: bool) -> nn.Module | None:
    """The ``pos_embedding`` RRT's encoder builds (``ppeg``, ``peg`` or ``none``)."""
    if pos == "ppeg":
        return _PPEG(dim, kernel, bias=bias)
    if pos == "peg":
        return _PEG(dim, kernel, bias)
    if pos == "none":
        return None
    raise ValueError(f"pos must be ppeg, peg or none, got {pos!r}")


class _RRTEncoder(nn.Module):
    """``layer1``, ``layers.<i>``, ``norm``, then attention pooling ``pool_fn``.
    ``pos_embedding`` only carries checkpoint keys: MIL-Lab's forward never calls it."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        n_layers: int,
        pool: _RRTPool,
        ffn_dim: int | None,
        pos_embedding: nn.Module | None,
        landmarks: int,
    ) -> None:
        super().__init__()
        self.pool_fn = _PoolHolder(pool)
        self.norm = nn.LayerNorm(dim)
        self.layer1 = _RRTLayer(dim, heads, dim_head, ffn_dim, landmarks)
        self.layers = nn.Sequential(
            *(_RRTLayer(dim, heads, dim_head, ffn_dim, landmarks) for _ in range(n_layers - 1))
        )
        self.pos_embedding = pos_embedding

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) -> pooled (E,), softmax pooling weights (N,)."""
        x = self.norm(self.layers(self.layer1(x)))
        weights = self.pool_fn(x)
        return weights @ x, weights


class RRT(nn.Module):
    """RRT-MIL as MIL-Lab builds it (``rrt.base``), with MIL-Lab's keys and forward.

    With MIL-Lab's defaults the encoder layers are **Nystrom** attention layers (its
    ``TransLayer1`` never receives the region-attention switch): ``patch_embed.0`` (Linear,
    ReLU), ``encoder.layer1`` and ``encoder.layers.<i>`` (``norm``, ``attn.*``; 8 heads of
    ``dim_head`` 64, 256 landmarks), ``encoder.norm``, attention pooling
    ``encoder.pool_fn.attention.*``, ``classifier``. ``encoder.pos_embedding.*`` (PPEG) is in
    the checkpoint but MIL-Lab's forward never calls it, so neither does this one.
    ``landmarks`` is fixed at 256 in MIL-Lab and is not in the checkpoint, so loading always
    uses 256 (a smaller value only makes small test models cheap to train).
    Attention returned: the softmax pooling weights (N,), sum to 1.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 512,
        num_heads: int = 8,
        dim_head: int = 64,
        n_layers: int = 2,
        pool_dim: int = 128,
        pool_gated: bool = False,
        pool_bias: bool = False,
        ffn_dim: int | None = None,
        pos: str = "ppeg",
        pos_kernel: int = 7,
        pos_bias: bool = True,
        landmarks: int = 256,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.encoder = _RRTEncoder(
            hidden_dim,
            heads=num_heads,
            dim_head=dim_head,
            n_layers=n_layers,
            pool=_RRTPool(hidden_dim, pool_dim, gated=pool_gated, bias=pool_bias),
            ffn_dim=ffn_dim,
            pos_embedding=_rrt_position_module(hidden_dim, pos, pos_kernel, pos_bias),
            landmarks=landmarks,
        )
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, weights = self.encoder(self.patch_embed(h))
        return self.classifier(pooled), weights

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        heads = _shape(state, "model.encoder.layer1.attn.res_conv.weight", 0)
        qkv = _shape(state, "model.encoder.layer1.attn.to_qkv.weight", 0)
        pool = "model.encoder.pool_fn.attention."
        gated = f"{pool}attention_a.0.weight" in state
        first = f"{pool}attention_a.0" if gated else f"{pool}attention.0"
        pos = "none"
        if "model.encoder.pos_embedding.proj1.weight" in state:
            pos = "ppeg"
        elif "model.encoder.pos_embedding.proj.weight" in state:
            pos = "peg"
        return _drop_none(
            hidden_dim=_shape(state, "model.patch_embed.0.weight", 0),
            num_heads=heads,
            dim_head=qkv // (3 * heads) if heads and qkv else None,
            n_layers=1 + _count(state, r"model\.encoder\.layers\.(\d+)\.norm\.weight"),
            pool_dim=_shape(state, f"{first}.weight", 0),
            pool_gated=gated,
            pool_bias=f"{first}.bias" in state,
            ffn_dim=_shape(state, "model.encoder.layer1.mlp.fc1.weight", 0),
            pos=pos,
            pos_kernel=_shape(state, "model.encoder.pos_embedding.proj.weight", 2),
            pos_bias="model.encoder.pos_embedding.proj.bias" in state,
        )


class _TransformerBlock(nn.Module):
    """Pre-norm layer: ``x + MHA(norm(x))`` (torch's nn.MultiheadAttention, key
    ``attention``), then with an encoder MLP ``x + mlp(norm2(x))`` (``mlp.{0,3}``, each Linear
    followed by ReLU)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads)
        self.mlp: nn.Module | None = None
        if mlp_dim > 0:
            self.mlp = nn.Sequential(
                nn.Linear(dim, mlp_dim),
                nn.ReLU(),
                nn.Dropout(0.0),
                nn.Linear(mlp_dim, dim),
                nn.ReLU(),
            )
            self.norm2 = nn.LayerNorm(dim)

    def class_row(self, x: torch.Tensor) -> torch.Tensor:
        """Head-averaged softmax attention of token 0 over all L tokens (L,), O(L) memory."""
        mha = self.attention
        length, dim = x.shape
        heads = mha.num_heads
        normed = self.norm(x)
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
        q = F.linear(normed[:1], w_q, b_q).reshape(heads, 1, -1)
        k = F.linear(normed, w_k, b_k).reshape(length, heads, -1).transpose(0, 1)
        scores = (q @ k.transpose(-1, -2))[:, 0] / math.sqrt(dim // heads)
        return torch.softmax(scores, dim=-1).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class TransformerMIL(nn.Module):
    """Plain transformer MIL with MIL-Lab's keys and forward (``transformer.base``).

    ``patch_embed.0``, ``cls_token`` (1, 1, E), ``blocks.<i>.norm``,
    ``blocks.<i>.attention.{in_proj_weight,in_proj_bias,out_proj}`` (optionally
    ``blocks.<i>.mlp.{0,3}`` and ``norm2``), ``norm``, ``classifier`` on the class token. The
    head count is not in the checkpoint's shapes: MIL-Lab's base value 8 is used. Logits follow
    MIL-Lab's training path (its ``return_attention=True`` path adds the class token's update to
    every token in layer 1, so its logits there differ slightly). Full self-attention costs
    O(N²), hence the bag-size guard. Attention returned: layer 1's head-averaged softmax
    attention of the class token over the N patches (row 0, columns 1..N).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 512,
        num_heads: int = 8,
        num_attention_layers: int = 2,
        num_fc_layers: int = 1,
        encoder_mlp_dim: int = -1,
    ) -> None:
        super().__init__()
        self.patch_embed = _patch_embed(in_dim, hidden_dim, num_fc_layers)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.blocks = nn.ModuleList(
            _TransformerBlock(hidden_dim, num_heads, encoder_mlp_dim)
            for _ in range(num_attention_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls_token.reshape(1, -1), self.patch_embed(h)])
        attention = self.blocks[0].class_row(x)[1:]
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x[0])), attention

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return _drop_none(
            hidden_dim=_shape(state, "model.norm.weight", 0),
            num_attention_layers=_count(state, r"model\.blocks\.(\d+)\.norm\.weight") or None,
            num_fc_layers=_n_linear(state, "model.patch_embed"),
            encoder_mlp_dim=_shape(state, "model.blocks.0.mlp.0.weight", 0) or -1,
        )


def _builder(
    net_cls: type[nn.Module], name: str, max_bag_size: int | None
) -> Callable[..., nn.Module]:
    def build(*, in_dim: int, n_classes: int, **hparams: Any) -> nn.Module:
        net = net_cls(in_dim, n_classes, **hparams)
        return MilLabModel(
            net, name=name, in_dim=in_dim, n_classes=n_classes, max_bag_size=max_bag_size
        )

    build.__doc__ = f"Build {name} wrapped so its keys start with 'model.'."
    return build


for _name, _cls, _limit, _signature, _input_key in (
    ("abmil", ABMIL, None, ("model.global_attn.",), None),
    ("transmil", TransMIL, None, ("model.pos_layer.",), None),
    ("dsmil", DSMIL, None, ("model.i_classifier.", "model.b_classifier."), None),
    (
        "ilra",
        ILRA,
        None,
        ("model.gab_blocks.",),
        "model.gab_blocks.0.project_forward.fc_k.weight",
    ),
    ("rrt", RRT, None, ("model.encoder.layer1.", "model.encoder.pool_fn."), None),
    (
        "transformer",
        TransformerMIL,
        QUADRATIC_BAG_LIMIT,
        ("model.blocks.0.attention.in_proj_weight",),
        None,
    ),
):
    register_model(
        _name,
        _builder(_cls, _name, _limit),
        infer_hparams=_cls.infer_hparams,  # type: ignore[attr-defined]
        max_bag_size=_limit,
        layout="mil-lab",
        signature=_signature,
        input_key=_input_key or "model.patch_embed.0.weight",
    )


# =============================================================================================
# checkpoints


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` on a CPU-only host is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(
            f"runner_arguments.device is {device!r} but no CUDA device is available "
            "(use device: auto or cpu)"
        )
    return torch.device(device)


def clean_clam_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply CLAM's loader clean-up: drop ``instance_loss_fn`` keys, remove ``.module``.

    Only the DataParallel-style ``attention_net.module.`` prefix is rewritten, so a non-gated
    net's own ``attention_net.3.module.0`` keys survive (CLAM's blanket rename breaks them).

    >>> sorted(clean_clam_state_dict({"attention_net.module.0.weight": 1,
    ...     "instance_loss_fn.labels": 2, "attention_net.3.module.0.bias": 3}))
    ['attention_net.0.weight', 'attention_net.3.module.0.bias']
    """
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "instance_loss_fn" in key:
            continue
        while key.startswith("module."):
            key = key[len("module.") :]
        key = key.replace("attention_net.module.", "attention_net.")
        cleaned[key] = value
    return cleaned


def normalise_mil_lab_state_dict(
    state: Mapping[str, torch.Tensor], prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Strip DataParallel ``module.`` prefixes (outside or inside ``model.``), add a missing
    ``model.`` prefix (a state dict saved from the inner network) and drop ``instance_loss_fn``.

    >>> sorted(normalise_mil_lab_state_dict({"module.model.classifier.weight": 1,
    ...     "patch_embed.0.weight": 2, "model.module.global_attn.attention_c.bias": 3}))
    ['model.classifier.weight', 'model.global_attn.attention_c.bias', 'model.patch_embed.0.weight']
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "instance_loss_fn" in key:
            continue
        while key.startswith("module."):
            key = key[len("module.") :]
        if prefix:
            if key.startswith(prefix):
                key = key[len(prefix) :]
            while key.startswith("module."):
                key = key[len("module.") :]
            key = prefix + key
        out[key] = value
    return out


_MIL_LAB_CLAM_RENAMES = (
    ("model.patch_embed.", "attention_net."),
    ("model.global_attn.", "attention_net.3."),
    ("model.classifier.", "classifiers."),
    ("model.instance_classifiers.", "instance_classifiers."),
)


def clam_state_dict_from_mil_lab(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a (normalised) MIL-Lab ``clam`` state dict to CLAM_SB's layout (formats §3.3).

    >>> sorted(clam_state_dict_from_mil_lab({"model.patch_embed.0.weight": 1,
    ...     "model.global_attn.attention_c.bias": 2, "model.classifier.weight": 3}))
    ['attention_net.0.weight', 'attention_net.3.attention_c.bias', 'classifiers.weight']
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in _MIL_LAB_CLAM_RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def load_checkpoint_state(
    path: Path, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True`` (never executes pickled code).

    Unwraps a top-level ``state_dict`` / ``model_state_dict`` / ``model`` / ``state_dict_ema`` /
    ``model_ema`` entry, as MIL-Lab's loader does.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (set model_arguments.ckpt_path to your "
            "s_<fold>_checkpoint.pt)"
        )
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({first}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    for wrapper in ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (save model.state_dict())")
    if not obj:
        raise CheckpointError(f"{path}: the state dict is empty (save model.state_dict())")
    return dict(obj)


def _detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which model a checkpoint's keys look like, if recognisable."""
    norm = normalise_mil_lab_state_dict(state)
    if any(k.startswith("model.attention_net.") for k in norm):
        return "clam_mb" if "model.classifiers.0.weight" in norm else "clam_sb"
    if any(k.startswith("model.instance_classifiers.") for k in norm):
        return "clam"
    for spec in _REGISTRY.values():
        if spec.signature and any(k.startswith(spec.signature) for k in norm):
            return spec.name
    return None


def _guess_cause(state: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """Compare a CLAM checkpoint with a CLAM model and name the config key that most likely
    differs (model_type, embed_dim, model_size, n_classes)."""
    keys = set(state)
    if any(k.startswith("model.") for k in keys):
        kind = _detect_layout(state)
        hint = f" (it looks like {kind})" if kind else ""
        return (
            f"keys start with 'model.': this is a MIL-Lab checkpoint{hint}; set model_type to "
            "its MIL-Lab name, e.g. <model>.base.<encoder>.none"
        )
    if "classifiers.weight" in keys and isinstance(model, ClamMB):
        return "checkpoint is CLAM_SB; set model_type: clam_sb"
    if "classifiers.0.weight" in keys and isinstance(model, ClamSB):
        return "checkpoint is CLAM_MB; set model_type: clam_mb"
    if not isinstance(model, _ClamBase):
        return "check model_type, model_size, embed_dim and n_classes"
    first = state.get("attention_net.0.weight")
    if first is not None and first.dim() == 2 and first.shape[1] != model.embed_dim:
        return (
            f"checkpoint expects embed_dim {first.shape[1]}, config says {model.embed_dim} "
            "(set model_arguments.embed_dim to the encoder's feature width)"
        )
    hidden_key = next(
        (
            k
            for k in ("attention_net.3.attention_a.0.weight", "attention_net.3.module.0.weight")
            if k in state
        ),
        None,
    )
    if hidden_key is not None:
        hidden = int(state[hidden_key].shape[0])
        if hidden != model.hidden:
            size = next((name for name, (_, d) in SIZES.items() if d == hidden), None)
            if size is not None:
                return f"checkpoint is model_size {size!r}; set model_arguments.model_size: {size}"
            return f"checkpoint's attention width is {hidden}, not a CLAM model_size"
    n_ckpt = _checkpoint_classes(state)
    if n_ckpt is not None and n_ckpt != model.n_classes:
        return (
            f"checkpoint has {n_ckpt} classes, config n_classes is {model.n_classes} "
            "(set exp_arguments.n_classes and label_dict to match)"
        )
    return "check model_type, model_size, embed_dim and n_classes"


def _checkpoint_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count of a CLAM checkpoint from its heads (SB classifier rows, MB branches)."""
    if "classifiers.weight" in state:
        return int(state["classifiers.weight"].shape[0])
    n_mb = _count(state, r"classifiers\.(\d+)\.weight")
    if n_mb:
        return n_mb
    n_inst = _count(state, r"instance_classifiers\.(\d+)\.weight")
    return n_inst or None


#: MIL-Lab heads whose first dimension is the class count (DSMIL's bag head is a 3-d Conv1d
#: weight of (C, C, D); its instance head is the plain one).
_MIL_LAB_HEADS = ("model.classifier.weight", "model.i_classifier.inst_classifier.weight")


def checkpoint_n_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count of a checkpoint, read from its classifier head; None when no head is known.

    Works on CLAM (single- and multi-branch, DataParallel ``module.`` or ``.module`` included)
    and MIL-Lab layouts, so flag-only runs need no ``--n-classes``.

    >>> import torch
    >>> checkpoint_n_classes({"module.classifiers.weight": torch.zeros(3, 256)})
    3
    >>> checkpoint_n_classes({"model.classifier.weight": torch.zeros(4, 512)})
    4
    >>> checkpoint_n_classes({"attention_net.0.weight": torch.zeros(8, 8)}) is None
    True
    """
    found = _checkpoint_classes(clean_clam_state_dict(_strip_module_prefix(state)))
    if found is not None:
        return found
    mil_lab = normalise_mil_lab_state_dict(state)
    for key in _MIL_LAB_HEADS:
        head = mil_lab.get(key)
        if head is not None and head.dim() >= 2:
            return int(head.shape[0])
    return None


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _guess_cause_registry(
    state: Mapping[str, torch.Tensor], model: nn.Module, choice: ModelChoice
) -> str:
    """Likely cause of a failed strict load of a registry model (wrong model, width, classes)."""
    kind = _detect_layout(state)
    if kind in CLAM_TYPES:
        return f"this is a CLAM checkpoint; set model_type: {kind}"
    if kind is not None and kind != choice.name:
        return f"checkpoint looks like {kind}, not {choice.name}; set model_type: {kind}"
    spec = _REGISTRY.get(choice.name)
    first = state.get(spec.input_key if spec is not None else "model.patch_embed.0.weight")
    if first is not None and first.dim() == 2 and first.shape[1] != choice.in_dim:
        source = f"encoder {choice.encoder!r}" if choice.encoder else "model_arguments.embed_dim"
        return f"checkpoint expects {first.shape[1]}-d features, {source} gives {choice.in_dim}"
    head = state.get("model.classifier.weight")
    n_classes = getattr(model, "n_classes", None)
    if head is None and not any(k.startswith("model.classifier") for k in state):
        return (
            "checkpoint has no classifier head (e.g. FEATHER pc108-24k pretrained weights); "
            "fine-tune a head and save model.state_dict()"
        )
    if head is not None and n_classes is not None and head.shape[0] != n_classes:
        return (
            f"checkpoint has {head.shape[0]} classes, config n_classes is {n_classes} "
            "(set exp_arguments.n_classes to match)"
        )
    if spec is not None and spec.layout != "mil-lab":
        return (
            f"{choice.name} uses clam-heat's own key layout (see clam_heat.models."
            f"{type(getattr(model, 'model', model)).__name__}); checkpoints from other "
            "implementations need converting"
        )
    return "check model_type, embed_dim and n_classes"


def _short(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_mismatch(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, own_label: str = "model "
) -> str | None:
    """What stops a strict load of ``state`` into a module whose state dict is ``own``, or None.

    One short clause list (missing keys, unexpected keys, the first shape mismatch), shared by
    checkpoint and encoder-weight loading so both report mismatches the same way.

    >>> a = {"w": torch.zeros(2), "x": torch.zeros(1)}
    >>> b = {"w": torch.zeros(3), "y": torch.zeros(1)}
    >>> state_dict_mismatch(a, b)
    'missing x; unexpected y; shape mismatch w (3,) vs model (2,)'
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected {_short(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(
            f"shape mismatch {k} {tuple(state[k].shape)} vs {own_label}{tuple(own[k].shape)}"
        )
    return "; ".join(parts) or None


def _strict_load(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    ckpt_path: Path,
    model_type: str,
    guess: Callable[[], str],
) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing what differs."""
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"{ckpt_path}: does not fit {model_type} ({problem}); likely cause: {guess()}"
        )
    model.load_state_dict(state, strict=True)


def build_model(
    model_type: str,
    *,
    n_classes: int,
    embed_dim: int,
    model_size: str | None = "small",
    gate: bool = True,
    **hparams: Any,
) -> nn.Module:
    """Instantiate a model without weights (CLAM's ``initiate_model`` minus the checkpoint).

    CLAM types take ``model_size``/``gate`` (and ``attention_dropout``); MIL-Lab ``clam`` takes
    ``width``/``hidden`` (MIL-Lab defaults 512/384); registry models take their class's keyword
    arguments as ``hparams`` (e.g. ``hidden_dim``, MIL-Lab's ``embed_dim``, for ABMIL).
    """
    choice = parse_model_type(model_type, embed_dim=embed_dim)
    if choice.family == "clam":
        return CLAM_TYPES[choice.name](
            gate=gate,
            size_arg=model_size or "small",
            n_classes=n_classes,
            embed_dim=choice.in_dim,
            **hparams,
        )
    if choice.family == "mil_lab_clam":
        hparams.setdefault("width", 512)
        hparams.setdefault("hidden", 384)
        return ClamSB(gate=gate, n_classes=n_classes, embed_dim=choice.in_dim, **hparams)
    return _REGISTRY[choice.name].builder(in_dim=choice.in_dim, n_classes=n_classes, **hparams)


def load_model(
    ckpt_path: Path,
    model_type: str,
    *,
    n_classes: int,
    embed_dim: int,
    model_size: str | None = "small",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the configured model, load the checkpoint strictly, move it to ``device``, eval().

    A mismatch raises :class:`CheckpointError` listing missing/unexpected keys and the likely
    cause (wrong model_type, model_size, embed_dim or n_classes).
    """
    ckpt_path = Path(ckpt_path)
    if isinstance(device, str):
        device = resolve_device(device)
    choice = parse_model_type(model_type, embed_dim=embed_dim)
    raw = load_checkpoint_state(ckpt_path, device)
    model: nn.Module
    if choice.family in ("clam", "mil_lab_clam"):
        if choice.family == "clam" or any(k.startswith("attention_net.") for k in raw):
            state = clean_clam_state_dict(raw)  # CLAM layout, also accepted for MIL-Lab clam
        else:
            state = clam_state_dict_from_mil_lab(normalise_mil_lab_state_dict(raw))
        gated = not any(k.startswith("attention_net.3.module.") for k in state)
        extra: dict[str, Any] = {}
        if not gated and "attention_net.3.module.3.weight" in state:
            extra["attention_dropout"] = True
        if choice.family == "mil_lab_clam":
            hidden_key = "attention_net.3.attention_a.0.weight"
            if not gated:
                hidden_key = "attention_net.3.module.0.weight"
            extra["width"] = _shape(state, "attention_net.0.weight", 0) or 512
            extra["hidden"] = _shape(state, hidden_key, 0) or 384
            model = ClamSB(gate=gated, n_classes=n_classes, embed_dim=choice.in_dim, **extra)
        else:
            model = CLAM_TYPES[choice.name](
                gate=gated,
                size_arg=model_size or "small",
                n_classes=n_classes,
                embed_dim=choice.in_dim,
                **extra,
            )
        clam_model = model
        _strict_load(
            model,
            state,
            ckpt_path=ckpt_path,
            model_type=model_type,
            guess=lambda: _guess_cause(state, clam_model),
        )
    else:
        spec = _REGISTRY[choice.name]
        state = normalise_mil_lab_state_dict(raw, spec.key_prefix)
        hparams = spec.infer_hparams(state) if spec.infer_hparams is not None else {}
        try:
            model = spec.builder(in_dim=choice.in_dim, n_classes=n_classes, **hparams)
        except (ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{ckpt_path}: cannot build {model_type} with sizes read from the checkpoint "
                f"{hparams} ({err}); likely cause: "
                f"{_guess_cause_registry(state, nn.Module(), choice)}"
            ) from None
        built = model
        _strict_load(
            model,
            state,
            ckpt_path=ckpt_path,
            model_type=model_type,
            guess=lambda: _guess_cause_registry(state, built, choice),
        )
    return model.to(device).eval()


# =============================================================================================
# inference


@dataclass(frozen=True)
class AttentionOutput:
    """One bag's inference result.

    ``attention``: (N,) float32 per-patch score of the branch used for heatmaps (CLAM: raw
    pre-softmax; CLAM_MB: the predicted class's branch; other models: as their class documents).
    ``probs``: (C,) float32 class probabilities. ``top_ids``: (C,) int64 class indices sorted by
    probability, descending (CLAM's ``Pred_c`` order). ``logits``: (C,) float32.
    ``pred``: ``top_ids[0]``.
    """

    attention: np.ndarray
    probs: np.ndarray
    top_ids: np.ndarray
    logits: np.ndarray

    @property
    def pred(self) -> int:
        return int(self.top_ids[0])


def _input_width(model: nn.Module) -> int | None:
    for name in ("in_dim", "embed_dim"):
        value = getattr(model, name, None)
        if isinstance(value, int):
            return value
    return None


def run_attention(
    model: nn.Module,
    features: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    max_bag_size: int | None = None,
) -> AttentionOutput:
    """One forward pass over a bag (CLAM runs it twice) under ``inference_mode``.

    ``features``: (N, D) float32 with D equal to the model's input width, else
    :class:`FeatureError` naming both. ``max_bag_size`` overrides the model's own guard (set
    for models whose cost grows with N²); a larger bag is a :class:`FeatureError`.
    """
    if features.ndim != 2:
        raise FeatureError(f"features must be 2-D (N, D), got shape {features.shape}")
    n = int(features.shape[0])
    if n == 0:
        raise FeatureError("empty bag (0 patches): nothing to score")
    width = _input_width(model)
    if width is not None and features.shape[1] != width:
        raise FeatureError(
            f"feature width {features.shape[1]} does not match model_arguments.embed_dim "
            f"{width} (features come from a different encoder than the checkpoint)"
        )
    limit = max_bag_size if max_bag_size is not None else getattr(model, "max_bag_size", None)
    if limit is not None and n > limit:
        name = getattr(model, "name", type(model).__name__)
        raise FeatureError(
            f"bag has {n} patches, above the {limit}-patch limit for {name} (its attention "
            "cost grows with N^2); patch at a lower magnification or with larger patches"
        )
    param = next(iter(model.parameters()), None)
    if param is not None:
        target, dtype = param.device, param.dtype
    else:
        target = resolve_device(device) if isinstance(device, str) else device
        dtype = torch.float32
    with torch.inference_mode():
        h = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        h = h.to(device=target, dtype=dtype)
        if isinstance(model, _ClamBase):
            logits, y_prob, y_hat, a_raw, _ = model(h)
            pred = int(y_hat.item())
            attention = a_raw[pred] if a_raw.shape[0] > 1 else a_raw[0]
            logits, probs = logits[0], y_prob[0]
        else:
            logits, attention = model(h)
            logits, attention = logits.reshape(-1), attention.reshape(-1)
            probs = torch.softmax(logits.float(), dim=0)
        if attention.numel() != n:
            raise CheckpointError(
                f"{type(model).__name__} returned {attention.numel()} attention scores for a bag "
                f"of {n} patches (a registered model must return attention of shape (N,))"
            )
        top_ids = torch.argsort(probs, descending=True, stable=True)
        attention_np = attention.float().cpu().numpy().astype(np.float32)
        if not np.isfinite(attention_np).all():
            raise CheckpointError(
                "the model produced NaN/Inf attention (corrupt checkpoint weights or features "
                "far outside the training range)"
            )
        return AttentionOutput(
            attention=attention_np,
            probs=probs.float().cpu().numpy().astype(np.float32),
            top_ids=top_ids.cpu().numpy().astype(np.int64),
            logits=logits.float().cpu().numpy().astype(np.float32),
        )
