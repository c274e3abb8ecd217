"""ABMIL: gated-attention MIL (Ilse et al.) in MIL-Lab's layout.

The layout: docs/rules/formats.md#mil-lab-layout.

A patch's attention logit depends on that patch alone, so bags may be scored in batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (
    EmbedParams,
    GatedAttention,
    MilLabNet,
    PlainAttention,
    count_indices,
    register_mil_lab,
    shape_of,
)


class ABMIL(MilLabNet):
    """Gated-attention MIL (Ilse et al.) in MIL-Lab's layout and forward
    (docs/rules/formats.md#mil-lab-layout).

    Keys: ``patch_embed.{0,3,..}`` (Linear in->E, ReLU, Dropout per layer),
    ``global_attn.attention_a.0`` / ``attention_b.0`` (E->A), ``global_attn.attention_c``
    (A->K heads), ``classifier`` (K*E -> C); un-gated: ``global_attn.module.{0,3}``.
    Attention returned: pre-softmax logits (N,), averaged over heads when K > 1.
    """

    @dataclass(frozen=True)
    class Params(EmbedParams):
        """Attention width, gating and heads; ``dropout`` after each embedding layer."""

        attn_dim: int = 384
        gate: bool = True
        num_heads: int = 1
        dropout: float = 0.25

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(hp.num_fc_layers):
            layers += [nn.Linear(width, hp.hidden_dim), nn.ReLU(), nn.Dropout(hp.dropout)]
            width = hp.hidden_dim
        self.patch_embed = nn.Sequential(*layers)
        attn_cls = GatedAttention if hp.gate else PlainAttention
        self.global_attn = attn_cls(hp.hidden_dim, hp.attn_dim, True, hp.num_heads)
        self.classifier = nn.Linear(hp.hidden_dim * hp.num_heads, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.embed(h)
        raw = self.attention_raw(embedded)  # (K, N) pre-softmax
        logits = self.pooled_logits(torch.softmax(raw, dim=1) @ embedded)
        return logits, self.pick_attention(raw, logits, None)

    # the pooling in parts (models.inference.PooledAttention): large bags go chunk by chunk

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(h)

    def attention_raw(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.global_attn(embedded).transpose(0, 1)

    def pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled.reshape(-1))

    def pick_attention(
        self, raw: torch.Tensor, logits: torch.Tensor, branch: int | None
    ) -> torch.Tensor:
        return raw.mean(dim=0)

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        gate = "model.global_attn.attention_a.0.weight" in state
        first = "attention_a.0" if gate else "module.0"
        last = (
            "attention_c"
            if gate
            else ("module.3" if "model.global_attn.module.3.weight" in state else "module.2")
        )
        return {
            "hidden_dim": shape_of(state, "model.patch_embed.0.weight", 0),
            "attn_dim": shape_of(state, f"model.global_attn.{first}.weight", 0),
            "num_heads": shape_of(state, f"model.global_attn.{last}.weight", 0),
            "num_fc_layers": count_indices(state, r"model\.patch_embed\.(\d+)\.weight") or None,
            "gate": gate,
        }


def _linear_head(model: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ABMIL's classifier is linear in the pooled heads: (attention logits (K, N), embedded
    (N, E), W (C, K*E), b (C,))."""
    net = model.model
    embedded = net.patch_embed(h)
    raw = net.global_attn(embedded).transpose(0, 1)
    return raw, embedded, net.classifier.weight, net.classifier.bias


register_mil_lab(
    "abmil", ABMIL, signature=("model.global_attn.",), per_patch=True, linear_head=_linear_head
)
