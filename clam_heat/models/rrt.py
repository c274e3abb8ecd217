"""RRT-MIL as MIL-Lab builds it, with MIL-Lab's keys and forward.

Attention is the pooling softmax over the bag after Nystrom layers, so a bag must be scored whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (
    PPEG,
    FeedForward,
    MilLabNet,
    MilLabParams,
    NystromAttention,
    count_indices,
    register_mil_lab,
    shape_of,
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


class _RRTLayer(nn.Module):
    """``x + attn(norm(x))`` with Nystrom attention (256 landmarks), then, with ``ffn``,
    ``x + mlp.fc2(gelu(mlp.fc1(norm2(x))))``."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, ffn_dim: int | None, landmarks: int
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim_head, landmarks=landmarks)
        self.mlp: FeedForward | None = None
        if ffn_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = FeedForward(dim, ffn_dim)

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
        return PPEG(dim, kernel, bias=bias)
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


class RRT(MilLabNet):
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

    @dataclass(frozen=True)
    class Params(MilLabParams):
        """Encoder (heads, ``dim_head``, layers, FFN, landmarks), pooling and position module."""

        num_heads: int = 8
        dim_head: int = 64
        n_layers: int = 2
        pool_dim: int = 128
        pool_gated: bool = False
        pool_bias: bool = False
        ffn_dim: int | None = None
        pos: str = "ppeg"
        pos_kernel: int = 7
        pos_bias: bool = True
        landmarks: int = 256

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        width = hp.hidden_dim
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU())
        self.encoder = _RRTEncoder(
            width,
            heads=hp.num_heads,
            dim_head=hp.dim_head,
            n_layers=hp.n_layers,
            pool=_RRTPool(width, hp.pool_dim, gated=hp.pool_gated, bias=hp.pool_bias),
            ffn_dim=hp.ffn_dim,
            pos_embedding=_rrt_position_module(width, hp.pos, hp.pos_kernel, hp.pos_bias),
            landmarks=hp.landmarks,
        )
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, weights = self.encoder(self.patch_embed(h))
        return self.classifier(pooled), weights

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        heads = shape_of(state, "model.encoder.layer1.attn.res_conv.weight", 0)
        qkv = shape_of(state, "model.encoder.layer1.attn.to_qkv.weight", 0)
        pool = "model.encoder.pool_fn.attention."
        gated = f"{pool}attention_a.0.weight" in state
        first = f"{pool}attention_a.0" if gated else f"{pool}attention.0"
        pos = "none"
        if "model.encoder.pos_embedding.proj1.weight" in state:
            pos = "ppeg"
        elif "model.encoder.pos_embedding.proj.weight" in state:
            pos = "peg"
        return {
            "hidden_dim": shape_of(state, "model.patch_embed.0.weight", 0),
            "num_heads": heads,
            "dim_head": qkv // (3 * heads) if heads and qkv else None,
            "n_layers": 1 + count_indices(state, r"model\.encoder\.layers\.(\d+)\.norm\.weight"),
            "pool_dim": shape_of(state, f"{first}.weight", 0),
            "pool_gated": gated,
            "pool_bias": f"{first}.bias" in state,
            "ffn_dim": shape_of(state, "model.encoder.layer1.mlp.fc1.weight", 0),
            "pos": pos,
            "pos_kernel": shape_of(state, "model.encoder.pos_embedding.proj.weight", 2),
            "pos_bias": "model.encoder.pos_embedding.proj.bias" in state,
        }


register_mil_lab("rrt", RRT, signature=("model.encoder.layer1.", "model.encoder.pool_fn."))
