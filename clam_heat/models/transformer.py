"""Plain transformer MIL with MIL-Lab's keys and forward.

Attention is the class token's softmax row over the bag, so a bag must be scored whole; full
self-attention costs O(N²), hence the bag-size guard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    EmbedParams,
    MilLabNet,
    count_indices,
    mlp_embed,
    n_linear,
    register_mil_lab,
    shape_of,
)
from .registry import QUADRATIC_BAG_LIMIT


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


class TransformerMIL(MilLabNet):
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

    @dataclass(frozen=True)
    class Params(EmbedParams):
        """Heads and blocks; ``encoder_mlp_dim`` -1: blocks without an MLP."""

        num_heads: int = 8
        num_attention_layers: int = 2
        encoder_mlp_dim: int = -1

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        width = hp.hidden_dim
        self.patch_embed = mlp_embed(in_dim, width, hp.num_fc_layers)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.ModuleList(
            _TransformerBlock(width, hp.num_heads, hp.encoder_mlp_dim)
            for _ in range(hp.num_attention_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls_token.reshape(1, -1), self.patch_embed(h)])
        attention = self.blocks[0].class_row(x)[1:]
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x[0])), attention

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "hidden_dim": shape_of(state, "model.norm.weight", 0),
            "num_attention_layers": count_indices(state, r"model\.blocks\.(\d+)\.norm\.weight")
            or None,
            "num_fc_layers": n_linear(state, "model.patch_embed"),
            "encoder_mlp_dim": shape_of(state, "model.blocks.0.mlp.0.weight", 0) or -1,
        }


register_mil_lab(
    "transformer",
    TransformerMIL,
    signature=("model.blocks.0.attention.in_proj_weight",),
    max_bag_size=QUADRATIC_BAG_LIMIT,
)
