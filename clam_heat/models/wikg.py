"""WiKG-MIL (Li et al. 2024, dynamic graph over patches) with MIL-Lab's keys and forward.

Every patch is a node whose neighbours are its top-k partners in a learned head/tail similarity,
so one patch's embedding depends on the others: a bag must be scored whole, and the time grows
with N² (the N x N similarity, computed a block of rows at a time so memory grows with N).
MIL-Lab's attention output is that neighbour graph (N x N), not a per-patch score, so the model
declares no attention and is drawn by the gradient and occlusion methods (docs/explanations.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import MilLabNet, MilLabParams, register_mil_lab, shape_of
from .registry import QUADRATIC_BAG_LIMIT

#: Rows of the N x N similarity computed at once: each patch's top-k needs only its own row, so
#: the whole matrix (1.6 GB at 20,000 patches) is never held, in the forward or for gradients.
SIMILARITY_ROWS = 2048

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


class _AttentionReadout(nn.Module):
    """torch_geometric's ``GlobalAttention`` as MIL-Lab calls it (one graph, no batch vector):
    a gate network ``gate_nn`` scores each node, softmax over the nodes, weighted sum."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate_nn = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.LeakyReLU(), nn.Linear(dim // 2, 1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) -> pooled (E,), node weights (N,) (sum to 1)."""
        weights = torch.softmax(self.gate_nn(x)[:, 0], dim=0)
        return weights @ x, weights


def top_neighbours(head: torch.Tensor, tail: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Each patch's ``k`` largest similarities ``head_i . tail_j / sqrt(E)`` (N, k) and their
    columns, :data:`SIMILARITY_ROWS` rows of the similarity at a time (differentiable)."""
    scale = head.shape[1] ** -0.5
    parts = [
        torch.topk((head[i : i + SIMILARITY_ROWS] @ tail.T) * scale, k=k, dim=1)
        for i in range(0, head.shape[0], SIMILARITY_ROWS)
    ]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


class WiKG(MilLabNet):
    """WiKG-MIL as MIL-Lab builds it (``wikg.base``), with MIL-Lab's keys and forward.

    Per bag (N patches): ``patch_embed.0`` (Linear, ReLU) to E; each embedding averaged with the
    bag mean; head and tail projections ``W_head`` / ``W_tail``; similarity
    ``head @ tail.T / sqrt(E)`` (N x N); each patch keeps its ``topk`` most similar tails
    (itself included when it ranks), their similarities softmaxed, and a tanh-gated
    knowledge-aware weighting of those neighbours gives its neighbourhood vector; aggregation
    ``bi-interaction`` (``act(linear1(head + nbr)) + act(linear2(head * nbr))``, the base
    config), ``gcn`` (``linear``) or ``sage`` (``linear`` on the concatenation); readout over
    nodes (``readout.gate_nn``: softmax attention pooling; or plain mean / max); ``norm``
    (LayerNorm) and ``classifier``. ``gate_U``, ``gate_V``, ``gate_W`` are in MIL-Lab's
    checkpoints but its forward never uses them, so neither does this one.

    ``topk`` and ``act`` are not in the checkpoint: MIL-Lab's config values (4, leaky ReLU) are
    used. A bag smaller than ``topk`` (MIL-Lab fails on it) uses all its patches as neighbours,
    so occlusion can leave patches out of small bags.

    The per-patch score returned next to the logits is the readout's node weight (mean readout:
    1/N; max readout: zeros): a placeholder for the infer stage, never drawn as attention
    (``has_attention=False``).
    """

    @dataclass(frozen=True)
    class Params(MilLabParams):
        """Neighbours per patch, aggregation, readout and activation (MIL-Lab's base values)."""

        topk: int = 4
        agg_type: str = "bi-interaction"
        pool: str = "attn"
        act: str = "leaky_relu"

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        width = hp.hidden_dim
        if hp.act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(_ACTIVATIONS)}, got {hp.act!r}")
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU())
        self.gate_U = nn.Linear(width, width // 2)
        self.gate_V = nn.Linear(width, width // 2)
        self.gate_W = nn.Linear(width // 2, width)
        self.W_head = nn.Linear(width, width)
        self.W_tail = nn.Linear(width, width)
        if hp.agg_type == "bi-interaction":
            self.linear1 = nn.Linear(width, width)
            self.linear2 = nn.Linear(width, width)
        elif hp.agg_type in ("gcn", "sage"):
            self.linear = nn.Linear(width * (2 if hp.agg_type == "sage" else 1), width)
        else:
            raise ValueError(f"agg_type must be bi-interaction, gcn or sage, got {hp.agg_type!r}")
        self.activation = _ACTIVATIONS[hp.act]()
        if hp.pool == "attn":
            self.readout = _AttentionReadout(width)
        elif hp.pool not in ("mean", "max"):
            raise ValueError(f"pool must be attn, mean or max, got {hp.pool!r}")
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, n_classes)

    def node_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, E) node embeddings after one round of neighbour aggregation."""
        x = self.patch_embed(h)
        x = 0.5 * (x + x.mean(dim=0, keepdim=True))
        head, tail = self.W_head(x), self.W_tail(x)
        top, index = top_neighbours(head, tail, min(self.hparams.topk, x.shape[0]))
        neighbours = tail[index]  # (N, k, E)
        relation = torch.softmax(top, dim=1).unsqueeze(-1) * neighbours
        gate = torch.tanh(head.unsqueeze(1) + relation)
        knowledge = torch.softmax((gate * neighbours).sum(dim=-1), dim=1)  # (N, k)
        nbr = (knowledge.unsqueeze(-1) * neighbours).sum(dim=1)
        act = self.activation
        if self.hparams.agg_type == "bi-interaction":
            return act(self.linear1(head + nbr)) + act(self.linear2(head * nbr))
        if self.hparams.agg_type == "gcn":
            return act(self.linear(head + nbr))
        return act(self.linear(torch.cat([head, nbr], dim=1)))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.node_embeddings(h)
        if self.hparams.pool == "attn":
            pooled, weights = self.readout(x)
        elif self.hparams.pool == "mean":
            pooled, weights = x.mean(dim=0), x.new_full((x.shape[0],), 1.0 / x.shape[0])
        else:
            pooled, weights = x.max(dim=0).values, x.new_zeros(x.shape[0])
        return self.classifier(self.norm(pooled)), weights

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        agg = None
        if "model.linear1.weight" in state:
            agg = "bi-interaction"
        elif "model.linear.weight" in state:
            width, fan_in = state["model.linear.weight"].shape
            agg = "sage" if fan_in == 2 * width else "gcn"
        return {
            "hidden_dim": shape_of(state, "model.W_head.weight", 0),
            "agg_type": agg,
            "pool": "attn" if "model.readout.gate_nn.0.weight" in state else None,
        }


register_mil_lab(
    "wikg",
    WiKG,
    signature=("model.W_head.", "model.W_tail."),
    max_bag_size=QUADRATIC_BAG_LIMIT,
    has_attention=False,
)
