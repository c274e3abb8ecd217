"""DSMIL: dual-stream MIL (Li et al. 2021) with MIL-Lab's keys and forward.

One attention map per class (a column of A); the reduction returns the asked class's column, the
predicted class's by default. A patch's attention depends on the bag (critical patch, softmax
over patches), so a bag must be scored whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (
    EmbedParams,
    MilLabNet,
    mlp_embed,
    n_linear,
    register_mil_lab,
    shape_of,
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


class DSMIL(MilLabNet):
    """Dual-stream MIL (Li et al. 2021) with MIL-Lab's keys and forward (``dsmil.base``).

    Stream 1: ``i_classifier.inst_classifier`` scores each patch per class; each class's top
    patch is its critical instance. Stream 2: ``b_classifier.q`` (E -> attn_dim) compares every
    patch with each critical one, softmax over patches (scaled by sqrt(attn_dim)) gives A (N, C);
    ``b_classifier.v.1`` values pooled by A, ``b_classifier.norm`` (LayerNorm), then
    ``classifier`` = Conv1d(C, C, kernel E). Logits: mean of bag and max-instance scores.
    ``b_classifier.fcc`` (Conv1d(3, 3, E)) exists in MIL-Lab's checkpoints but is never used.
    Attention returned: A's column of the predicted class (sums to 1).
    """

    @dataclass(frozen=True)
    class Params(EmbedParams):
        """Width of the query that compares patches with the critical ones."""

        attn_dim: int = 384

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        self.patch_embed = mlp_embed(in_dim, hp.hidden_dim, hp.num_fc_layers)
        self.i_classifier = _InstanceHead(hp.hidden_dim, n_classes)
        self.b_classifier = _BagHead(hp.hidden_dim, hp.attn_dim)
        self.classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hp.hidden_dim)

    def class_attention(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` (N, D) -> logits (C,), attention A (N, C) of every class."""
        embedded = self.patch_embed(h)
        instance = self.i_classifier(embedded)  # (N, C)
        pooled, attention = self.b_classifier(embedded, instance)
        bag = self.classifier(pooled[None])[0, :, 0]  # (C,)
        return 0.5 * (bag + instance.max(dim=0).values), attention

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.class_attention(h)
        return logits, attention[:, int(logits.argmax())]

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "hidden_dim": shape_of(state, "model.b_classifier.norm.weight", 0),
            "attn_dim": shape_of(state, "model.b_classifier.q.weight", 0),
            "num_fc_layers": n_linear(state, "model.patch_embed"),
        }


def _attention(
    model: nn.Module, h: torch.Tensor, branch: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSMIL's reduction: column ``branch`` of A (the predicted class's when None)."""
    logits, attention = model.model.class_attention(h)
    column = int(logits.argmax()) if branch is None else branch
    return logits, attention[:, column]


register_mil_lab(
    "dsmil",
    DSMIL,
    signature=("model.i_classifier.", "model.b_classifier."),
    attention=_attention,
    per_class=True,
)
