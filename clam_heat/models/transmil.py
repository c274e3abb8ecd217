"""TransMIL (Shao et al. 2021) with MIL-Lab's keys and forward.

The attention of a patch depends on the whole bag (Nystrom attention, PPEG on the bag's square),
so a bag must be scored whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (
    PPEG,
    EmbedParams,
    MilLabNet,
    NystromAttention,
    NystromBlock,
    count_indices,
    mlp_embed,
    n_linear,
    register_mil_lab,
    shape_of,
)


class TransMIL(MilLabNet):
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

    @dataclass(frozen=True)
    class Params(EmbedParams):
        """Heads and Nystrom blocks (head width and landmarks follow from ``hidden_dim``)."""

        num_heads: int = 4
        num_attention_layers: int = 2

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        width = hp.hidden_dim
        self.patch_embed = mlp_embed(in_dim, width, hp.num_fc_layers)
        self.pos_layer = PPEG(width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.ModuleList(
            NystromBlock(
                width,
                NystromAttention(
                    width, heads=hp.num_heads, dim_head=width // hp.num_heads, landmarks=width // 2
                ),
                "attention",
            )
            for _ in range(hp.num_attention_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, n_classes)

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
        return {
            "hidden_dim": shape_of(state, "model.norm.weight", 0),
            "num_heads": shape_of(state, "model.blocks.0.attention.res_conv.weight", 0),
            "num_attention_layers": count_indices(state, r"model\.blocks\.(\d+)\.norm\.weight")
            or None,
            "num_fc_layers": n_linear(state, "model.patch_embed"),
        }


register_mil_lab("transmil", TransMIL, signature=("model.pos_layer.",))
