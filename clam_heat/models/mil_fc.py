"""CLAM's instance-level baselines ``mil_fc`` (two classes) and ``mil_fc_mc`` (more than two).

Written from the layout in docs/rules/heatmaps.md#bag-inference: ``fc.0`` (Linear E->512, ReLU,
Dropout) embeds each patch on its own and one linear head scores it (``classifier`` (2, 512) for
``mil_fc``, ``classifiers`` (C, 512) for ``mil_fc_mc``). The bag's logits are those of one patch:
the patch with the highest class-1 probability (``mil_fc``), or the patch of the highest
probability over every (patch, class) pair (``mil_fc_mc``).

These models pool no attention, so they declare ``has_attention=False``: the ``attention``
method does not apply and the ``instance`` method draws their per-patch logits
(:attr:`~.registry.ModelSpec.instance_logits`). The reduction the infer stage calls returns the
predicted class's per-patch logit as the blockmap's score, so a row still records a prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .clam import clean_clam_state_dict
from .registry import register_model

__all__ = ["MilFC"]


class MilFC(nn.Module):
    """MIL_fc / MIL_fc_mc: a per-patch classifier whose top patch gives the bag's logits."""

    def __init__(
        self, *, in_dim: int, n_classes: int, head: str, width: int = 512, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.head = head
        self.fc = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))
        setattr(self, head, nn.Linear(width, n_classes))

    def instance_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, C) logits of each patch scored alone."""
        return getattr(self, self.head)(self.fc(h))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` (N, E) -> (bag logits (C,), per-patch logits of the predicted class (N,))."""
        logits = self.instance_logits(h)
        probs = torch.softmax(logits, dim=1)
        if self.head == "classifier":  # MIL_fc: the patch most likely to be class 1
            top = int(torch.argmax(probs[:, 1]).item())
        else:  # MIL_fc_mc: the (patch, class) of highest probability
            top = int(torch.argmax(probs.reshape(-1)).item()) // self.n_classes
        bag = logits[top]
        return bag, logits[:, int(torch.argmax(bag).item())]


def _builder(head: str, check: Any) -> Any:
    def build(*, in_dim: int, n_classes: int, width: int = 512, **_: Any) -> nn.Module:
        check(n_classes)
        return MilFC(in_dim=in_dim, n_classes=n_classes, head=head, width=width)

    build.__doc__ = f"Build CLAM's {'MIL_fc' if head == 'classifier' else 'MIL_fc_mc'}."
    return build


def _two(n: int) -> None:
    if n != 2:
        raise ValueError(f"mil_fc has exactly 2 classes (got n_classes {n}); use mil_fc_mc")


def _many(n: int) -> None:
    if n <= 2:
        raise ValueError(f"mil_fc_mc needs more than 2 classes (got n_classes {n}); use mil_fc")


def _hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    weight = state.get("fc.0.weight")
    return {"width": int(weight.shape[0])} if weight is not None else {}


_COMMON: dict[str, Any] = {
    "prepare_state": clean_clam_state_dict,
    "infer_hparams": _hparams,
    "key_prefix": "",
    "input_key": "fc.0.weight",
    "per_patch": False,  # the bag's logits come from its top patch
    "has_attention": False,
    "instance_logits": lambda model, h: model.instance_logits(h),
    "checkpoint_label": "CLAM MIL_fc",
}
register_model(
    "mil_fc",
    _builder("classifier", _two),
    replace=False,
    detect=lambda norm: "model.fc.0.weight" in norm and "model.classifier.weight" in norm,
    **_COMMON,
)
register_model(
    "mil_fc_mc",
    _builder("classifiers", _many),
    replace=False,
    detect=lambda norm: "model.fc.0.weight" in norm and "model.classifiers.weight" in norm,
    **_COMMON,
)
