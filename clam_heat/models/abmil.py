"""ABMIL: gated-attention MIL (Ilse et al.) in MIL-Lab's layout (formats §2.2).

A patch's attention logit depends on that patch alone, so bags may be scored in batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .layers import (
    GatedAttention,
    PlainAttention,
    count_indices,
    drop_none,
    register_mil_lab,
    shape_of,
)


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
        return drop_none(
            hidden_dim=shape_of(state, "model.patch_embed.0.weight", 0),
            attn_dim=shape_of(state, f"model.global_attn.{first}.weight", 0),
            num_heads=shape_of(state, f"model.global_attn.{last}.weight", 0),
            num_fc_layers=count_indices(state, r"model\.patch_embed\.(\d+)\.weight") or None,
            gate=gate,
        )


register_mil_lab("abmil", ABMIL, signature=("model.global_attn.",), per_patch=True)
