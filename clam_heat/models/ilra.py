"""ILRA-MIL (Xiang & Zhang 2023) with MIL-Lab's keys and forward.

Attention is the pooling query's softmax over the bag after low-rank global attention, so a bag
must be scored whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    MilLabNet,
    MilLabParams,
    count_indices,
    register_mil_lab,
    shape_of,
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


class ILRA(MilLabNet):
    """ILRA-MIL (Xiang & Zhang 2023) with MIL-Lab's keys and forward (``ilra.base``).

    No patch embedding: ``gab_blocks.0`` reads the features directly. Then non-local pooling:
    ``pooling.S`` (1, 1, E) attends over the bag through ``pooling.mha`` (an un-gated block),
    ``classifier`` (E -> C). The head count is not in the checkpoint's shapes: MIL-Lab's base
    value 8 is used. Attention returned: the pooling query's head-averaged softmax attention
    (N,), sums to 1.
    """

    @dataclass(frozen=True)
    class Params(MilLabParams):
        """Low-rank latent size ``topk``; ``ln``: LayerNorms in every attention block."""

        hidden_dim: int = 256
        num_heads: int = 8
        topk: int = 64
        num_attention_layers: int = 2
        ln: bool = True

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        width = hp.hidden_dim
        self.gab_blocks = nn.ModuleList(
            _GAB(in_dim if i == 0 else width, width, hp.num_heads, hp.topk, hp.ln)
            for i in range(hp.num_attention_layers)
        )
        self.pooling = _NonLocalPool(width, hp.num_heads, hp.ln)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = h
        for block in self.gab_blocks:
            x = block(x)
        pooled, weights = self.pooling(x)
        return self.classifier(pooled), weights

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        blocks = count_indices(state, r"model\.gab_blocks\.(\d+)\.latent")
        return {
            "hidden_dim": shape_of(state, "model.gab_blocks.0.latent", 2),
            "topk": shape_of(state, "model.gab_blocks.0.latent", 1),
            "num_attention_layers": blocks or None,
            "ln": "model.pooling.mha.ln0.weight" in state,
        }


register_mil_lab(
    "ilra",
    ILRA,
    signature=("model.gab_blocks.",),
    input_key="model.gab_blocks.0.project_forward.fc_k.weight",
)
