"""CLAM (``clam_sb``, ``clam_mb``) and MIL-Lab's ``clam``, registered like any other model.

Written from the layout in docs/rules/formats.md#checkpoints, not from CLAM's code, so a CLAM
``s_<fold>_checkpoint.pt`` loads strictly: ``attention_net.0`` (Linear E->512),
``attention_net.3`` (gated attention: ``attention_a.0``, ``attention_b.0``, ``attention_c``;
plain: ``module.0`` and ``module.2``, or ``module.3`` when trained with dropout), ``classifiers``
and ``instance_classifiers.<k>``. Dropout layers occupy the same positions as in CLAM so indices
match, and are inactive in ``eval()``. MIL-Lab's ``clam`` checkpoints (``model.patch_embed.0``
...) are renamed to this layout by the mapping of docs/rules/formats.md#clam-to-mil-lab and
built as CLAM_SB.

Reduction: the raw (pre-softmax) attention row of the asked class (CLAM_MB; the predicted class
``Y_hat`` by default, as CLAM draws ``A[Y_hat]``), or the single row (CLAM_SB). A patch's logit
depends on that patch alone, so bags may be scored in batches (CLAM's ``calc_heatmap`` pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import detect_layout, normalise_mil_lab_state_dict, strip_prefix
from .layers import GatedAttention, PlainAttention, count_indices, shape_of
from .registry import register_model

__all__ = [
    "SIZES",
    "ClamMB",
    "ClamSB",
    "clam_state_dict_from_mil_lab",
    "clean_clam_state_dict",
]

SIZES = {"small": (512, 256), "big": (512, 384)}


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
        embedded = self.embed(h)
        a_raw = self.attention_raw(embedded)
        if attention_only:
            return a_raw
        weights = torch.softmax(a_raw, dim=1)
        pooled = weights @ embedded
        logits = self._bag_logits(pooled)
        y_hat = torch.topk(logits, 1, dim=1).indices
        y_prob = torch.softmax(logits, dim=1)
        return logits, y_prob, y_hat, a_raw, {}

    # the pooling in parts, so a large bag can be scored a chunk of patches at a time
    # (models.inference.PooledAttention); forward() is built from the same parts

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """(n, E) features -> (n, width) embedded patches."""
        return self.attention_net[:3](h)

    def attention_raw(self, embedded: torch.Tensor) -> torch.Tensor:
        """(n, width) -> (K, n) pre-softmax attention (K = 1, or one row per class for MB)."""
        return self.attention_net[3](embedded).transpose(0, 1)

    def pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(K, width) attention-pooled bag -> (C,) logits."""
        return self._bag_logits(pooled)[0]

    def pick_attention(
        self, a_raw: torch.Tensor, logits: torch.Tensor, branch: int | None
    ) -> torch.Tensor:
        """CLAM's reduction on parts: row ``branch`` (``Y_hat`` when None) of A_raw."""
        if a_raw.shape[0] == 1:
            return a_raw[0]
        row = int(torch.topk(logits.reshape(1, -1), 1, dim=1).indices.item())
        return a_raw[row if branch is None else branch]


class ClamSB(_ClamBase):
    """CLAM single-branch: one attention map, ``classifiers`` = Linear(512, C)."""

    model_type = "clam_sb"

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

    model_type = "clam_mb"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifiers = nn.ModuleList(nn.Linear(self.width, 1) for _ in range(self.n_classes))

    @staticmethod
    def _attention_outputs(n_classes: int) -> int:
        return n_classes

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        columns = [clf(pooled[c]) for c, clf in enumerate(self.classifiers)]
        return torch.cat(columns).reshape(1, self.n_classes)


# ------------------------------------------------------------------------------- checkpoints


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
        key = strip_prefix(key).replace("attention_net.module.", "attention_net.")
        cleaned[key] = value
    return cleaned


_MIL_LAB_CLAM_RENAMES = (
    ("model.patch_embed.", "attention_net."),
    ("model.global_attn.", "attention_net.3."),
    ("model.classifier.", "classifiers."),
    ("model.instance_classifiers.", "instance_classifiers."),
)


def clam_state_dict_from_mil_lab(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a (normalised) MIL-Lab ``clam`` state dict to CLAM_SB's layout.

    The mapping: docs/rules/formats.md#clam-to-mil-lab.

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


def _guess_cause(state: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """Compare a CLAM checkpoint with a CLAM model and name the config key that most likely
    differs (model_type, embed_dim, model_size, n_classes)."""
    keys = set(state)
    if any(k.startswith("model.") for k in keys):
        kind = detect_layout(state)
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
    n_mb = count_indices(state, r"classifiers\.(\d+)\.weight")
    if n_mb:
        return n_mb
    n_inst = count_indices(state, r"instance_classifiers\.(\d+)\.weight")
    return n_inst or None


#: MIL-Lab heads whose first dimension is the class count (DSMIL's bag head is a 3-d Conv1d
#: weight of (C, C, D); its instance head is the plain one).


# ---------------------------------------------------------------------------------- registry


def _attention(
    model: nn.Module, h: torch.Tensor, branch: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAM's reduction: row ``branch`` of A_raw (``Y_hat`` when None); the only row for SB."""
    logits, _, y_hat, a_raw, _ = model(h)
    row = int(y_hat.item()) if branch is None else branch
    return logits[0], a_raw[row] if a_raw.shape[0] > 1 else a_raw[0]


def _linear_head(model: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CLAM's head is linear in the pooled features: (attention logits (K, N), embedded (N, 512),
    W (C, K*512), b (C,)), with K = 1 (SB) or one branch per class (MB, W block-diagonal)."""
    embedded = model.attention_net[:3](h)
    raw = model.attention_net[3](embedded).transpose(0, 1)
    if isinstance(model.classifiers, nn.Linear):
        return raw, embedded, model.classifiers.weight, model.classifiers.bias
    heads = list(model.classifiers)
    width = embedded.shape[1]
    weight = torch.zeros(len(heads), len(heads) * width, dtype=h.dtype, device=h.device)
    for c, head in enumerate(heads):
        weight[c, c * width : (c + 1) * width] = head.weight[0]
    return raw, embedded, weight, torch.cat([head.bias for head in heads])


def _clam_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Gate and attention dropout read from a CLAM-layout state dict."""
    gated = not any(k.startswith("attention_net.3.module.") for k in state)
    hparams: dict[str, Any] = {"gate": gated}
    if not gated and "attention_net.3.module.3.weight" in state:
        hparams["attention_dropout"] = True
    return hparams


def _mil_lab_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """MIL-Lab ``clam``: CLAM's hparams plus the widths it was trained with (default 512/384)."""
    hparams = _clam_hparams(state)
    hidden_key = "attention_net.3." + ("attention_a.0" if hparams["gate"] else "module.0")
    hparams["width"] = shape_of(state, "attention_net.0.weight", 0) or 512
    hparams["hidden"] = shape_of(state, f"{hidden_key}.weight", 0) or 384
    return hparams


def _prepare_mil_lab(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLAM's own layout is accepted for MIL-Lab ``clam`` too; MIL-Lab's keys are renamed."""
    if any(k.startswith("attention_net.") for k in raw):
        return clean_clam_state_dict(raw)
    return clam_state_dict_from_mil_lab(normalise_mil_lab_state_dict(raw))


def _count_classes(raw: Mapping[str, torch.Tensor]) -> int | None:
    return _checkpoint_classes(clean_clam_state_dict(raw))


def _builder(cls: type[_ClamBase]) -> Any:
    def build(
        *, in_dim: int, n_classes: int, model_size: str | None = "small", **hparams: Any
    ) -> nn.Module:
        return cls(size_arg=model_size or "small", n_classes=n_classes, embed_dim=in_dim, **hparams)

    build.__doc__ = f"Build {cls.__name__} (CLAM's initiate_model without the checkpoint)."
    return build


def _build_mil_lab(
    *, in_dim: int, n_classes: int, width: int = 512, hidden: int = 384, **hparams: Any
) -> nn.Module:
    """MIL-Lab ``clam``: CLAM_SB at MIL-Lab's widths (default 512/384)."""
    return ClamSB(n_classes=n_classes, embed_dim=in_dim, width=width, hidden=hidden, **hparams)


def _has_attention_net(norm: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("model.attention_net.") for k in norm)


_CLAM = {
    "prepare_state": clean_clam_state_dict,
    "infer_hparams": _clam_hparams,
    "guess_cause": lambda state, model, choice: _guess_cause(state, model),
    "count_classes": _count_classes,
    "attention": _attention,
    "linear_head": _linear_head,
    "per_patch": True,
    "key_prefix": "",
    "input_key": "attention_net.0.weight",
    "config_keys": ("model_size", "gate"),
    "checkpoint_label": "CLAM",
}
register_model(
    "clam_sb",
    _builder(ClamSB),
    replace=False,
    detect=lambda norm: _has_attention_net(norm) and "model.classifiers.0.weight" not in norm,
    **_CLAM,
)
register_model(
    "clam_mb",
    _builder(ClamMB),
    replace=False,
    detect=lambda norm: _has_attention_net(norm) and "model.classifiers.0.weight" in norm,
    per_class=True,
    **_CLAM,
)
register_model(
    "clam",
    _build_mil_lab,
    replace=False,
    **{
        **_CLAM,
        "prepare_state": _prepare_mil_lab,
        "infer_hparams": _mil_lab_hparams,
        "config_keys": ("gate",),
        "checkpoint_label": None,
        "detect": lambda norm: any(k.startswith("model.instance_classifiers.") for k in norm),
    },
)
